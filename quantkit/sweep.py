"""`quantkit sweep SWEEP.yaml`: one base recipe, many points (a matrix of overrides and/or explicit points).

```yaml
name: smollm2-sweep                 # sweep folder: <output_dir>/<name> (default: the file's stem)
base: ../baseline.yaml              # the recipe every point starts from (path relative to this file)
output_dir: runs                    # default: the base recipe's output_dir
set: {quantize.exclude: [lm_head]}  # overrides for every point
baseline: true                      # add the unquantized point (method none) and run it first
matrix:                             # each mapping is a cartesian product; a list of mappings adds them up
  - {quantize.method: int8_sq, quantize.smoothquant_alpha: [0.5, 0.8, 1.0], quantize.activations: per_token}
points:                             # explicit points, for combinations a product would get wrong
  - {quantize.method: fp8, quantize.kv_cache: fp8}
budget: {max_loss: {wiki_ppl.word_perplexity: 1%}, by: size}
plots: [wiki_ppl.word_perplexity, hellaswag.acc_norm]
```

Each point becomes the run folder `<sweep folder>/<name>`, its name made from its overrides
(`int4_awq-lite-g64`, `fp8-kvfp8`, `none`). A point whose overrides make no valid recipe (a knob its
method does not have, a block size the model's shapes do not allow, a CUDA-only method on a CPU) is
skipped with the reason. The sweep shares the tokenizer, calibration batches and a copy of the loaded
weights between points (`pipeline.RunCache`), runs the baseline once and first, records a failing point
with its error and goes on.

State lives in `<sweep folder>/sweep.json` (written atomically). A point is complete when sweep.json says
`done` for the same recipe and its folder holds that recipe and results.json: a rerun skips it without
loading anything. Any other point goes through the pipeline again, whose per-stage fingerprints skip the
stages that finished; temporary files a killed process left are removed first. Ctrl-C (or SIGTERM) stops
the point in progress, marks it `interrupted` and leaves only finished files behind.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import gc
import itertools
import json
import logging
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantkit.errors import QuantkitError, RecipeError
from quantkit.runfolder import atomic_write_json, atomic_write_text, fingerprint, read_json

log = logging.getLogger("quantkit")

STATE = "sweep.json"
LOCK = ".sweep.lock"
COMPARE_DIR = "compare"
KNOBS = ("block_size", "awq_algorithm", "smoothquant_alpha", "activations", "kv_cache")


class BudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_loss: dict[str, Any] | list[str] = Field(description="{task.metric: '1%' | 0.02 | '2pt'} or a list")
    by: Literal["size", "speed"] = "size"
    conservative: bool = False


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    base: str = Field(description="recipe file every point starts from, relative to the sweep file")
    output_dir: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    baseline: bool = True
    matrix: dict[str, Any] | list[dict[str, Any]] = Field(default_factory=list)
    points: list[dict[str, Any]] = Field(default_factory=list)
    budget: BudgetSpec | None = None
    plots: list[str] = Field(default_factory=lambda: ["wiki_ppl.word_perplexity"])


@dataclass
class Point:
    name: str
    overrides: dict[str, Any]
    recipe: Any = None             # quantkit.recipe.Recipe, None when invalid
    invalid: str | None = None     # why it is skipped

    @property
    def run_dir(self) -> Path | None:
        return self.recipe.run_dir() if self.recipe is not None else None


@dataclass
class Sweep:
    file: Path
    spec: SweepSpec
    folder: Path
    points: list[Point]
    limits: list = field(default_factory=list)


# ----------------------------------------------------------------------------- point names


_ABBREV: dict[str, Any] = {
    "quantize.method": lambda v: str(v),
    "quantize.awq_algorithm": lambda v: str(v).removeprefix("awq_"),
    "quantize.block_size": lambda v: f"g{v}",
    "quantize.smoothquant_alpha": lambda v: f"a{v}" if isinstance(v, (int, float)) else f"alpha_{v}",
    "quantize.activations": lambda v: str(v),
    "quantize.kv_cache": lambda v: f"kv{v}",
}


def point_name(overrides: dict[str, Any]) -> str:
    """Deterministic, readable folder name from a point's overrides (known knobs first, then sorted keys)."""
    keys = [k for k in _ABBREV if k in overrides] + sorted(k for k in overrides if k not in _ABBREV)
    parts = []
    for key in keys:
        value = overrides[key]
        if key in _ABBREV:
            if value is not None:  # null = the method's default: nothing to tell apart
                parts.append(_ABBREV[key](value))
        else:
            text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
            parts.append(f"{key.rsplit('.', 1)[-1]}_{text}")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts)).strip("_.-") or "base"
    return name if re.match(r"^[A-Za-z0-9]", name) else f"p{name}"


def _canonical(overrides: dict[str, Any]) -> str:
    return json.dumps(overrides, sort_keys=True, default=str)


def expand_overrides(spec: SweepSpec) -> list[dict[str, Any]]:
    """The baseline (if asked), every matrix product, then the explicit points; duplicates dropped."""
    combos: list[dict[str, Any]] = [{"quantize.method": "none"}] if spec.baseline else []
    for group in [spec.matrix] if isinstance(spec.matrix, dict) else spec.matrix:
        keys = list(group)
        axes = [v if isinstance(v, list) else [v] for v in group.values()]  # a scalar is a one-value axis
        combos += [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes)]
    combos += [dict(p) for p in spec.points]
    seen: dict[str, dict] = {}
    for c in combos:
        seen.setdefault(_canonical(c), c)
    return list(seen.values())


# ----------------------------------------------------------------------------- loading


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = copy.deepcopy(value)


def recipe_fingerprint(recipe_data: dict) -> str:
    """What makes a point's results: the whole resolved recipe except where the folder lives."""
    return fingerprint({k: v for k, v in recipe_data.items() if k != "output_dir"})


def _validation_text(exc: ValidationError) -> str:
    out = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        msg = err["msg"].removeprefix("Value error, ")
        named = re.match(r"field '(\w+)': (.*)", msg, re.S)
        if named:
            loc, msg = [*loc, named.group(1)], named.group(2)
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(f"{'.'.join(loc)}: {msg}")
    return "; ".join(out)


def resolve_point(base: dict, common: dict[str, Any], overrides: dict[str, Any], name: str, folder: Path,
                  description: str = "") -> Point:
    """The point's recipe, or the reason it is not a valid one.

    Knobs the point's method does not have are dropped when they come from the base or the sweep's `set`
    (e.g. the base's block size on an fp8 point); a knob the point itself states for the wrong method makes
    the point invalid, so a matrix never silently runs something other than what it says.
    """
    from quantkit.methods import METHODS
    from quantkit.recipe import Recipe

    data = copy.deepcopy(base)
    for key, value in {**common, **overrides}.items():
        _set_dotted(data, key, value)
    method = METHODS.get(str(data.get("quantize", {}).get("method")))
    if method is not None:
        for knob in KNOBS:
            if knob not in method.knobs and f"quantize.{knob}" not in overrides:
                data["quantize"][knob] = None
    data["metadata"] = {"name": name, "description": (description + ": " if description else "")
                        + (", ".join(f"{k.removeprefix('quantize.')}={v}" for k, v in overrides.items()) or "base")}
    data["output_dir"] = str(folder)
    try:
        return Point(name, overrides, recipe=Recipe.model_validate(data))
    except ValidationError as exc:
        return Point(name, overrides, invalid=_validation_text(exc))


def load_sweep(path: str | Path, overrides: list[str] | None = None, output_dir: str | None = None) -> Sweep:
    """Read SWEEP.yaml, resolve every point (invalid ones keep their reason). `overrides` (--set) apply to all."""
    from quantkit.choose import parse_budget
    from quantkit.recipe import load_recipe, parse_overrides

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"sweep file '{path}' does not exist", fix="check the path") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML ({exc})", where=str(path)) from None
    try:
        spec = SweepSpec.model_validate(raw if isinstance(raw, dict) else {})
    except ValidationError as exc:
        raise RecipeError(f"{path}: {_validation_text(exc)}",
                          fix="keys: name, description, base, output_dir, set, baseline, matrix, points, budget, "
                          "plots") from None
    base_recipe = load_recipe(path.parent / spec.base)
    base = base_recipe.model_dump(mode="json")
    common = dict(spec.set)
    common.update({".".join(keys): value for keys, value in parse_overrides(overrides or [])})
    name = spec.name or path.stem
    folder = Path(output_dir or spec.output_dir or common.get("output_dir") or base_recipe.output_dir) / name
    check = resolve_point(base, common, {}, "base", folder)
    if check.invalid:
        raise RecipeError(f"the base recipe with the sweep's `set` is not a valid recipe: {check.invalid}",
                          where=str(path), fix="fix `base` or `set` (or --set)")
    combos = expand_overrides(spec)
    desc = spec.description or name
    points, recipes = [], set()
    for c in combos:
        point = resolve_point(base, common, c, point_name(c), folder, desc)
        if point.recipe is not None:
            same = recipe_fingerprint(point.recipe.model_dump(mode="json", exclude={"metadata"}))
            if same in recipes:  # e.g. {kv_cache: null} and no kv_cache at all: one run is enough
                continue
            recipes.add(same)
        points.append(point)
    names = [p.name for p in points]
    for i, p in enumerate(points):  # different recipes whose overrides read the same get a short hash each
        if names.count(p.name) > 1:
            points[i] = resolve_point(base, common, p.overrides,
                                      f"{p.name}-{fingerprint(_canonical(p.overrides))[:6]}", folder, desc)
    limits = parse_budget(spec.budget.max_loss) if spec.budget else []
    return Sweep(path, spec, folder, points, limits)


def _shape_problem(point: Point, device: str | None, skeletons: dict) -> str | None:
    """Problems `quantkit run` would only find after loading: CUDA-only methods, block sizes vs shapes."""
    import torch

    from quantkit.methods import get_method

    method = get_method(point.recipe.quantize.method)
    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if method.needs_cuda and not on_cuda:
        return f"method '{method.name}' needs a CUDA GPU; this sweep runs on {device or 'cpu'}"
    if method.preset is None or "block_size" not in method.knobs:
        return None
    from quantkit.quantize import check_shapes

    src = point.recipe.model.source
    if src not in skeletons:
        from transformers import AutoConfig, AutoModelForCausalLM

        from quantkit.models import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(src),
                                            trust_remote_code=point.recipe.model.trust_remote_code)
        with torch.device("meta"):  # shapes only
            skeletons[src] = AutoModelForCausalLM.from_config(config)
    try:
        check_shapes(skeletons[src], point.recipe.quantize)
    except QuantkitError as exc:
        return f"{exc.message} ({exc.fix})" if exc.fix else exc.message
    return None


# ----------------------------------------------------------------------------- state and leftovers


_TEMP = re.compile(r"^\..+(\.partial.*|\.[a-z0-9_]{8})$")  # staging dirs / atomic_write_* temporary names


def _folder_recipe_fp(run_dir: Path) -> str | None:
    path = run_dir / "recipe.yaml"
    try:
        return recipe_fingerprint(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def is_complete(point: Point, entry: dict | None) -> bool:
    """Done for this exact recipe: sweep.json says so (written only after the run returned), and the folder
    holds the same recipe and its results.json. Reads two small files; loads nothing."""
    if point.recipe is None or not entry or entry.get("status") != "done":
        return False
    fp = recipe_fingerprint(point.recipe.model_dump(mode="json"))
    run_dir = point.run_dir
    return (entry.get("recipe_fingerprint") == fp and (run_dir / "results.json").is_file()
            and _folder_recipe_fp(run_dir) == fp)


@contextlib.contextmanager
def _locked(folder: Path):
    """One sweep per folder at a time (the OS drops the lock when the process dies, even by SIGKILL)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantkitError(f"another sweep is running in {folder}", where=str(folder),
                                fix="wait for it to finish (or stop it); a rerun continues where it stopped") from None
        yield


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's stop) ends the sweep the way Ctrl-C does: the point in progress is interrupted."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class State:
    """sweep.json: one entry per point, rewritten atomically after every change."""

    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.path = sweep.folder / STATE
        old = read_json(self.path) if self.path.is_file() else {}
        self.previous = {p["name"]: p for p in old.get("points", [])}
        self.entries: dict[str, dict] = {}
        self.status = "running"
        self.choice: dict | None = None

    def set(self, point: Point, **fields: Any) -> None:
        entry = self.entries.setdefault(point.name, {"name": point.name, "overrides": point.overrides})
        entry.update(fields)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {
            "sweep": self.sweep.folder.name, "file": str(self.sweep.file), "status": self.status,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "budget": [lim.text for lim in self.sweep.limits] or None,
            "points": [self.entries[p.name] for p in self.sweep.points if p.name in self.entries],
            "choice": self.choice,
        })


# ----------------------------------------------------------------------------- running


def plan(sweep: Sweep, device: str | None = None, state: State | None = None) -> dict[str, str]:
    """Each point's fate before anything runs: 'done' (complete), 'invalid: why', or 'run'."""
    state = state or State(sweep)
    skeletons: dict = {}
    fates = {}
    for p in sweep.points:
        if p.invalid is None and not is_complete(p, state.previous.get(p.name)):
            p.invalid = _shape_problem(p, device, skeletons)
        if p.invalid is not None:
            fates[p.name] = f"invalid: {p.invalid}"
        elif is_complete(p, state.previous.get(p.name)):
            fates[p.name] = "done"
        else:
            fates[p.name] = "run"
    return fates


def run_sweep(sweep: Sweep, device: str | None = None, retry_failed: bool = True, cache: Any = None) -> State:
    """Run every point that is not complete; see the module docstring. Returns the final state."""
    with _locked(sweep.folder), _sigterm_as_interrupt():
        for leftover in [*sweep.folder.glob(".*"), *(sweep.folder / COMPARE_DIR).glob(".*")]:
            if _TEMP.match(leftover.name) and leftover.is_file():  # a killed sweep's half-written sweep.json/table
                leftover.unlink(missing_ok=True)
        state = State(sweep)
        try:
            return _run_points(sweep, state, device, retry_failed, cache)
        except KeyboardInterrupt:
            state.status = "interrupted"  # also when Ctrl-C lands between points
            state.save()
            raise


def _run_points(sweep: Sweep, state: State, device: str | None, retry_failed: bool, cache: Any) -> State:
    from quantkit.pipeline import RunCache, run_recipe

    fates = plan(sweep, device, state)
    cache = cache if cache is not None else RunCache()
    # The baseline first: every later point's results.json then carries its deltas.
    order = sorted(sweep.points, key=lambda p: p.recipe is None or p.recipe.quantize.method != "none")
    for p in order:
        prev = state.previous.get(p.name, {})
        if fates[p.name].startswith("invalid"):
            state.entries[p.name] = {"name": p.name, "overrides": p.overrides, "status": "invalid",
                                     "reason": p.invalid}
        elif fates[p.name] == "done":
            state.entries[p.name] = {**prev, "skipped": "already complete"}
        elif prev.get("status") == "failed" and not retry_failed:
            state.entries[p.name] = {**prev, "skipped": "failed before (--no-retry-failed)"}
        else:
            state.entries[p.name] = {"name": p.name, "overrides": p.overrides, "status": "pending",
                                     "run_dir": str(p.run_dir)}
    state.save()
    todo = [p for p in order if state.entries[p.name]["status"] == "pending"]
    log.info("sweep %s: %d points, %d complete, %d to run, %d invalid (%s)", sweep.folder, len(sweep.points),
             sum(f == "done" for f in fates.values()), len(todo),
             sum(f.startswith("invalid") for f in fates.values()), state.path)
    for i, p in enumerate(todo, 1):  # run_recipe removes an interrupted point's leftovers itself
        log.info("[sweep %d/%d] %s", i, len(todo), p.name)
        t0 = time.perf_counter()
        state.set(p, status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            run_recipe(p.recipe, device=device, cache=cache)
        except KeyboardInterrupt:
            state.status = "interrupted"
            state.set(p, status="interrupted", wall_s=round(time.perf_counter() - t0, 2))
            log.warning("[sweep] interrupted during %s; a rerun finishes it and the %d point(s) after it",
                        p.name, len(todo) - i)
            raise
        except Exception as exc:
            message = exc.render() if isinstance(exc, QuantkitError) else f"{type(exc).__name__}: {exc}"
            state.set(p, status="failed", error=message, wall_s=round(time.perf_counter() - t0, 2),
                      traceback=traceback.format_exc(limit=-8))
            log.error("[sweep] %s failed: %s (continuing)", p.name, message)
        else:
            state.set(p, status="done", recipe_fingerprint=recipe_fingerprint(p.recipe.model_dump(mode="json")),
                      wall_s=round(time.perf_counter() - t0, 2),
                      finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        finally:
            gc.collect()  # the quantized model of this point goes before the next one loads
            _empty_cuda_cache()
    _refresh_reports(sweep, state)
    state.status = "finished"
    _write_outputs(sweep, state)
    state.save()
    return state


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _refresh_reports(sweep: Sweep, state: State) -> None:
    """A point finished before its baseline (the baseline failed once, then passed) lacks deltas: add them."""
    from quantkit.report import write_run_report

    if not any(p.recipe is not None and p.recipe.quantize.method == "none"
               and state.entries.get(p.name, {}).get("status") == "done" for p in sweep.points):
        return
    for p in sweep.points:
        if state.entries.get(p.name, {}).get("status") != "done" or p.recipe.quantize.method == "none":
            continue
        results = p.run_dir / "results.json"
        if results.is_file() and read_json(results).get("baseline") is None:
            write_run_report(p.run_dir)


def unusable_points(state_or_path: State | Path) -> dict[str, str]:
    """Points with no results: name -> why (failed with its error, invalid with its reason, not run yet)."""
    if isinstance(state_or_path, State):
        entries = list(state_or_path.entries.values())
    else:
        path = Path(state_or_path)
        entries = read_json(path)["points"] if path.is_file() else []
    out = {}
    for e in entries:
        status = e.get("status")
        if status == "invalid":
            out[e["name"]] = f"invalid combination, not run: {e.get('reason')}"
        elif status == "failed":
            out[e["name"]] = f"failed: {str(e.get('error', '')).splitlines()[0][:300]}"
        elif status in ("pending", "running", "interrupted"):
            out[e["name"]] = f"not finished ({status}): rerun the sweep"
    return out


def _write_outputs(sweep: Sweep, state: State) -> None:
    from quantkit.report import parse_metric, write_compare

    done = [p.run_dir for p in sweep.points if state.entries.get(p.name, {}).get("status") == "done"]
    if not done:
        return
    out = write_compare(done, sweep.folder / COMPARE_DIR, metrics=[parse_metric(m) for m in sweep.spec.plots],
                        limits=sweep.limits or None, by=sweep.spec.budget.by if sweep.spec.budget else "size",
                        unusable=unusable_points(state), title=f"sweep {sweep.folder.name}")
    if out["choice"] is not None:
        state.choice = out["choice"].to_json()
        atomic_write_text(sweep.folder / "choice.txt", out["choice"].render() + "\n")


def summary_text(sweep: Sweep, state: State) -> str:
    lines = [f"sweep {sweep.folder} ({state.status}):"]
    for p in sweep.points:
        e = state.entries.get(p.name, {})
        status = e.get("status", "?")
        extra = e.get("skipped") or e.get("reason") or (str(e.get("error", "")).splitlines() or [""])[0]
        took = f" {e['wall_s']} s" if e.get("wall_s") is not None and not e.get("skipped") else ""
        lines.append(f"  {status:11s} {p.name}{took}{'  (' + extra + ')' if extra else ''}")
    if (sweep.folder / COMPARE_DIR / "table.md").is_file():
        lines.append(f"comparison: {sweep.folder / COMPARE_DIR}/ (table.md, table.csv, index.html, plots)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.sweep, args.set, args.output_dir)
    if args.dry_run:
        fates = plan(sweep, args.device)
        print(f"sweep {sweep.folder}: {len(sweep.points)} points")
        for p in sweep.points:
            print(f"  {fates[p.name]:5s}  {p.name}  {p.overrides}" if not fates[p.name].startswith("invalid")
                  else f"  skip   {p.name}  {p.overrides}\n         {fates[p.name]}")
        return 0
    state = run_sweep(sweep, device=args.device, retry_failed=not args.no_retry_failed)
    table = sweep.folder / COMPARE_DIR / "table.md"
    if table.is_file():
        print(table.read_text())
    print(summary_text(sweep, state))
    failed = [e for e in state.entries.values() if e.get("status") == "failed"]
    return 1 if failed else 0


def _cmd_choose(args: argparse.Namespace) -> int:
    from quantkit.choose import choose, parse_budget
    from quantkit.report import load_runs

    limits = parse_budget(args.max_loss)
    runs, baseline = load_runs([Path(r) for r in args.runs], Path(args.baseline) if args.baseline else None)
    unusable: dict[str, str] = {}
    for r in args.runs:
        unusable.update(unusable_points(Path(r) / STATE))
    result = choose(runs, baseline, limits, args.by, args.conservative, unusable)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.render())
    return 0 if result.chosen else 1


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a matrix of recipe overrides; resumable, failures recorded",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="SWEEP.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every point")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--output-dir", default=None, help="parent of the sweep folder (default: the sweep's output_dir)")
    p.add_argument("--dry-run", action="store_true", help="list the points and what would run; run nothing")
    p.add_argument("--no-retry-failed", action="store_true", help="leave points that failed before as they are")
    p.set_defaults(func=_cmd_sweep)

    p = subparsers.add_parser("choose", help="smallest/fastest run within an accuracy budget; why not the others")
    p.add_argument("runs", nargs="+", help="run folders, or a sweep folder")
    p.add_argument("--max-loss", action="append", default=[], metavar="TASK.METRIC=X[%|pt]", required=True,
                   help="e.g. wiki_ppl.word_perplexity=1%% (relative) or hellaswag.acc_norm=0.02 (absolute)")
    from quantkit.choose import BY

    p.add_argument("--by", choices=list(BY), default="size",
                   help="size: smallest HF checkpoint; speed: highest decode tokens/s at batch 1 (quantkit bench); "
                   "bits: fewest effective weight bits (auto runs: their per-layer mix; uniform ones: 4 or 8)")
    p.add_argument("--baseline", default=None, help="run folder to measure losses against (default: method none)")
    p.add_argument("--conservative", action="store_true",
                   help="count loss + 2 standard errors against the budget (where lm-eval has a stderr)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    p.set_defaults(func=_cmd_choose)


if __name__ == "__main__":  # pragma: no cover - `python -m quantkit.sweep` for debugging
    from quantkit.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
