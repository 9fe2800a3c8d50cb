"""Hand-off bundle: one self-contained folder a deployment team can verify, build and serve.

    OUT/
      README.md            model card (source, method, settings, calibration, accuracy, sizes, versions, how-to)
      recipe.yaml          the resolved recipe of the run
      results.json         accuracy results, when the run has them
      checkpoints/trtllm/  TensorRT-LLM checkpoint (config.json, rank*.safetensors)
      checkpoints/hf/      HF unified checkpoint (+ tokenizer)
      build/plan.json      engine plan, paths relative to the bundle
      build/build.sh       the exact trtllm-build command (cd's to the bundle root first)
      SHA256SUMS           `sha256sum -c SHA256SUMS` verifies every file above

Written to a temporary sibling folder and renamed into place, so OUT is either complete or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import QuantkitError
from quantkit.runfolder import dir_bytes

NOT_METRICS = {"n", "samples", "limit", "alias"}  # counts and labels that results.json keeps next to metrics
CHECKPOINTS = {"trtllm": "TensorRT-LLM checkpoint", "hf": "HF unified checkpoint (ModelOpt)"}
VERSION_PACKAGES = ("quantkit", "nvidia-modelopt", "torch", "transformers", "safetensors", "lm-eval",
                    "tensorrt_llm")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_sha256sums(root: Path) -> Path:
    """`sha256sum` format (hash, two spaces, path relative to root), every file but the list itself."""
    lines = [f"{_sha256(p)}  {p.relative_to(root).as_posix()}" for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != "SHA256SUMS"]
    out = root / "SHA256SUMS"
    out.write_text("\n".join(lines) + "\n")
    return out




def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    out["python"] = platform.python_version()
    return out


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- model card


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "—" if x is None else str(x)


def _metric_rows(results: dict | None) -> list[str]:
    """Markdown rows task | metric | this run (± stderr) | baseline | delta."""
    if not isinstance(results, dict) or not isinstance(results.get("metrics"), dict) or not results["metrics"]:
        return []
    baseline = results.get("baseline")
    if isinstance(baseline, dict) and isinstance(baseline.get("metrics"), dict):
        baseline = baseline["metrics"]
    from quantkit.choose import lower_is_better

    rows = []
    for task, metrics in sorted(results["metrics"].items()):
        if not isinstance(metrics, dict):
            continue
        for metric, value in metrics.items():
            if (metric.endswith("_stderr") or metric in NOT_METRICS or not isinstance(value, (int, float))
                    or isinstance(value, bool)):
                continue
            label = metric + (" ↓" if lower_is_better(task, metric, [results]) else "")
            err = metrics.get(f"{metric}_stderr")
            mine = _fmt(float(value)) + (f" ± {_fmt(float(err))}" if isinstance(err, (int, float)) else "")
            base = baseline.get(task, {}).get(metric) if isinstance(baseline, dict) and isinstance(
                baseline.get(task), dict) else None
            if isinstance(base, (int, float)):
                delta = float(value) - float(base)
                rel = f" ({100 * delta / base:+.1f}%)" if base else ""
                rows.append(f"| {task} | {label} | {mine} | {_fmt(float(base))} | {delta:+.4g}{rel} |")
            else:
                rows.append(f"| {task} | {label} | {mine} | not measured | — |")
    return rows


def _method_lines(recipe: dict) -> list[str]:
    q = recipe.get("quantize") or {}
    method = q.get("method", "unknown")
    lines = []
    try:
        from quantkit.methods import get_method, resolved_settings
        from quantkit.recipe import QuantizeSection

        m = get_method(method)
        settings = resolved_settings(QuantizeSection.model_validate(q))
        lines.append(f"- **Method:** `{method}`: {m.description} (ModelOpt preset `{m.preset}`)"
                     if m.preset else f"- **Method:** `{method}`: {m.description}")
        uses_data = m.uses_calibration_data
    except Exception:  # a recipe from another quantkit version: show what it says
        settings, uses_data = {k: v for k, v in q.items() if k != "method"}, True
        lines.append(f"- **Method:** `{method}`")
    shown = {k: v for k, v in settings.items() if k != "method"}
    lines.append("- **Settings:** " + (", ".join(f"{k}={'none' if v is None else _fmt(v)}" for k, v in shown.items())
                                       or "none"))
    cal = recipe.get("calibration") or {}
    if method == "none":
        lines.append("- **Calibration:** none (unquantized baseline)")
    elif not uses_data:
        lines.append("- **Calibration:** no data used (weight-only statistics; data-free method)")
    elif cal:
        n, s = cal.get("n_samples"), cal.get("seq_len")
        tokens = f" = {n * s:,} tokens" if isinstance(n, int) and isinstance(s, int) else ""
        lines.append(f"- **Calibration:** `{cal.get('dataset', 'not recorded')}`, {n} samples x {s} tokens{tokens}, "
                     f"batch {cal.get('batch_size')}, seed {cal.get('seed')}")
    else:
        lines.append("- **Calibration:** not recorded")
    return lines


def render_model_card(bundle: Path, recipe: dict, results: dict | None, plan: dict | None,
                      violations: list, versions: dict[str, str]) -> str:
    meta = recipe.get("metadata") or {}
    model = recipe.get("model") or {}
    name = meta.get("name") or bundle.name
    out = [f"# {name}", ""]
    if meta.get("description"):
        out += [meta["description"], ""]
    out += [
        f"- **Source model:** `{model.get('source', 'not recorded')}` (loaded as {model.get('dtype', '?')})",
        *_method_lines(recipe),
    ]
    if plan:
        out.append(f"- **TensorRT-LLM quant_algo:** `{plan.get('quant_algo') or 'none'}`, KV cache "
                   f"`{plan.get('kv_cache_quant_algo') or 'none'}`, dtype `{plan.get('dtype')}`, "
                   f"tp {plan['mapping']['tp_size']} x pp {plan['mapping']['pp_size']}")
    out += ["", "## Accuracy", ""]
    rows = _metric_rows(results)
    if rows:
        base_note = "" if (results or {}).get("baseline") else " (no baseline run recorded)"
        lim = (recipe.get("evaluate") or {}).get("limit")
        out += [f"Against the unquantized baseline{base_note}; "
                + (f"evaluated on at most {lim} examples per task." if lim else "full tasks."), "",
                "| task | metric | this model | baseline | delta |", "|---|---|---|---|---|", *rows]
    else:
        out.append("Not measured (the run has no results.json metrics).")
    out += ["", "## Checkpoints", "", "| format | folder | files | size |", "|---|---|---|---|"]
    for key, label in CHECKPOINTS.items():
        d = bundle / "checkpoints" / key
        if d.is_dir():
            n = sum(1 for p in d.rglob("*") if p.is_file())
            out.append(f"| {label} | `checkpoints/{key}/` | {n} | {_human(dir_bytes(d))} |")
        else:
            out.append(f"| {label} | not exported | — | — |")
    verdict = ("passes every rule" if not violations else
               f"FAILS with {len(violations)} violation(s), e.g. {violations[0]}")
    out += ["", f"`quantkit check` on this bundle: {verdict}.", ""]
    out += ["## Build and serve", ""]
    if plan:
        out += [f"Target line: **{plan['target']['line']}**. {plan['target']['why']}.", ""]
        if plan.get("engine"):
            opts = plan["engine"]["options"]
            out += [f"Engines ({plan['engine']['tensorrt_llm']}) on a machine with an NVIDIA GPU:", "",
                    "```bash", "bash build/build.sh            # writes build/engines/", "```", "",
                    "| trtllm-build option | value | why |", "|---|---|---|"]
            out += [f"| `--{k}` | `{_fmt(v)}` | {plan['engine']['reasons'].get(k, '')} |" for k, v in opts.items()]
            out += ["", "Serve the engines: "
                    "`trtllm-serve build/engines --tokenizer checkpoints/hf --backend tensorrt`.", ""]
        if plan.get("serve"):
            from quantkit.build import serve_argv

            argv = serve_argv(plan, {**plan["paths"], "hf_checkpoint": "checkpoints/hf"})
            out += [f"Without an engine build ({plan['serve']['tensorrt_llm']}):", "", "```bash",
                    " ".join(argv or []), "```", "",
                    "or in Python: `from tensorrt_llm import LLM; LLM(model='checkpoints/hf', tensor_parallel_size="
                    f"{plan['mapping']['tp_size']}).generate('Hello')`.", ""]
        consumers = plan.get("hf_consumers") or []
        if consumers:
            from quantkit.build import hf_consumers

            out += ["Runtimes that load the HF checkpoint (`checkpoints/hf`), per their documented formats:", ""]
            for c in hf_consumers(plan["quant_algo"], "checkpoints/hf", plan["mapping"]["tp_size"]):
                out += [f"- {c['runtime']}: `{c['command']}` ({c['source']})"]
            out.append("")
        for note in plan.get("notes", []):
            out.append(f"- {note}")
        if plan.get("engine"):
            from quantkit.trtllm_layout import describe

            out += ["", "### TensorRT-LLM layers of `checkpoints/trtllm`", "", *describe(plan["quant_algo"])]
    else:
        out.append("No build plan (no checkpoint to plan for).")
    out += ["", "## Tool versions", "", "| tool | version |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in versions.items()]
    if isinstance(results, dict) and isinstance(results.get("versions"), dict):
        out += ["", "Recorded with the evaluation run: "
                + ", ".join(f"{k} {v}" for k, v in results["versions"].items())]
    out += ["", "## Verify", "", "```bash", "sha256sum -c SHA256SUMS", "quantkit check .", "```", ""]
    return "\n".join(out)


def _producers(bundle: Path) -> dict[str, str]:
    out = {}
    for key, cfg_name in (("trtllm", "config.json"), ("hf", "hf_quant_config.json")):
        data = _load_json(bundle / "checkpoints" / key / cfg_name) or {}
        prod = data.get("producer") if isinstance(data, dict) else None
        if isinstance(prod, dict) and prod.get("name"):
            out[f"{key} checkpoint written by"] = f"{prod['name']} {prod.get('version', '?')}"
    return out


# --------------------------------------------------------------------------- packaging


def package_run(run_dir: Path, out: Path, *, force: bool = False, allow_violations: bool = False) -> Path:
    """Write the hand-off bundle of RUN into OUT and return OUT."""
    from quantkit.build import make_build_plan, write_build_files
    from quantkit.check import check_checkpoint
    from quantkit.recipe import BuildSection

    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    exports = {k: run_dir / "export" / k for k in CHECKPOINTS if (run_dir / "export" / k).is_dir()}
    if not exports:
        raise QuantkitError(f"'{run_dir}' has no export/trtllm or export/hf", where="package",
                            fix="pass a run folder whose export stage has run")
    if out == run_dir or run_dir.is_relative_to(out) or out.is_relative_to(run_dir / "export"):
        raise QuantkitError(f"OUT '{out}' overlaps the run folder '{run_dir}'", where="package",
                            fix="write the bundle somewhere outside the run's export/ folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise QuantkitError(f"'{out}' exists and is not empty", where="package",
                            fix="pass --force to replace it, or choose another OUT")

    recipe = _load_yaml(run_dir / "recipe.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for key, src in exports.items():
            shutil.copytree(src, tmp / "checkpoints" / key)
        for name in ("recipe.yaml", "results.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        try:
            build = BuildSection.model_validate(recipe.get("build") or {})
        except Exception:  # keep packaging an older run; defaults are documented in the plan
            build = BuildSection()
        first = tmp / "checkpoints" / ("trtllm" if "trtllm" in exports else "hf")
        # A deployment plan (no gather_context_logits), with paths rewritten to the bundle.
        plan = make_build_plan(first, build, hf_dir=(tmp / "checkpoints" / "hf") if "hf" in exports else None,
                               engine_dir=tmp / "build" / "engines")
        write_build_files(tmp, plan)
        plan = json.loads((tmp / "build" / "plan.json").read_text())
        violations = check_checkpoint(tmp)
        if violations and not allow_violations:
            shown = "; ".join(str(v) for v in violations[:3])
            raise QuantkitError(
                f"the checkpoints fail `quantkit check` ({len(violations)} violation(s), e.g. {shown}), so the "
                "bundle would not build", where="package",
                fix="fix the export and re-run it, or pass --allow-violations to package anyway")
        versions = {**_versions(), **_producers(tmp)}
        results = _load_json(run_dir / "results.json")
        (tmp / "README.md").write_text(render_model_card(tmp, recipe, results, plan, violations, versions))
        write_sha256sums(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("package", help="write a self-contained hand-off bundle of a run",
                              description="Copy a run's checkpoints, build plan and results into OUT with a model "
                              "card and SHA256SUMS. Refuses a non-empty OUT unless --force.")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("out", type=Path, help="bundle folder to create")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--allow-violations", action="store_true",
                   help="package even when the checkpoints fail quantkit check (the card says so)")
    p.set_defaults(func=run_package_cli)


def run_package_cli(args) -> int:
    try:
        out = package_run(args.run, args.out, force=args.force, allow_violations=args.allow_violations)
    except QuantkitError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    with contextlib.suppress(OSError):
        n = sum(1 for line in (out / "SHA256SUMS").read_text().splitlines() if line)
        print(f"wrote {out} ({n} files, {_human(dir_bytes(out))}); verify with: cd {out} && sha256sum -c SHA256SUMS")
    return 0
