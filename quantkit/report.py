"""Report stage: `results.json` + `summary.md` per run, and comparison tables across runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from quantkit.runfolder import atomic_write_json, atomic_write_text, read_json

# The metric a table shows per task (as lm-eval names it), and whether lower is better.
PRIMARY_METRICS: dict[str, list[tuple[str, bool]]] = {
    "wiki_ppl": [("word_perplexity", True)],
    "lambada": [("acc", False), ("perplexity", True)],
    "hellaswag": [("acc_norm", False)],
    "arc_easy": [("acc", False)],
    "arc_challenge": [("acc_norm", False)],
    "piqa": [("acc", False)],
    "winogrande": [("acc", False)],
}


def _recipe(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "recipe.yaml").read_text())


def _metrics(run_dir: Path) -> dict:
    path = run_dir / "eval" / "lm_eval.json"
    return read_json(path)["tasks"] if path.is_file() else {}


def find_baseline(run_dir: Path) -> Path | None:
    """A sibling run of the same model with method 'none' that has evaluation results."""
    recipe = _recipe(run_dir)
    if recipe["quantize"]["method"] == "none":
        return None
    for other in sorted(run_dir.parent.iterdir()):
        if other == run_dir or not (other / "recipe.yaml").is_file() or not _metrics(other):
            continue
        r = _recipe(other)
        if r["quantize"]["method"] == "none" and r["model"]["source"] == recipe["model"]["source"]:
            return other
    return None


def collect_results(run_dir: Path) -> dict[str, Any]:
    recipe = _recipe(run_dir)
    manifest_path = run_dir / "manifest.json"
    stages = read_json(manifest_path)["stages"] if manifest_path.is_file() else {}
    quant = stages.get("quantize", {})
    export = stages.get("export", {})
    baseline_dir = find_baseline(run_dir)
    bench_path = run_dir / "bench" / "bench.json"
    return {
        "run": recipe["metadata"]["name"],
        "description": recipe["metadata"].get("description", ""),
        "model": recipe["model"]["source"],
        "method": recipe["quantize"]["method"],
        "settings": quant.get("settings", {"method": recipe["quantize"]["method"]}),
        "calibration": {**recipe["calibration"], "tokens": quant.get("calibration_tokens"),
                        "fingerprint": quant.get("calibration_fingerprint")},
        "metrics": _metrics(run_dir),
        "sizes": {k: export[k] for k in ("trtllm_bytes", "hf_bytes") if k in export},
        "timings_s": {name: entry.get("wall_s") for name, entry in stages.items()},
        "quantize_s": quant.get("quantize_s"),
        "bench": read_json(bench_path) if bench_path.is_file() else None,
        "baseline": {"run": str(baseline_dir), "metrics": _metrics(baseline_dir)} if baseline_dir else None,
        "versions": quant.get("versions", {}),
    }


def write_run_report(run_dir: Path) -> dict[str, Any]:
    results = collect_results(run_dir)
    atomic_write_json(run_dir / "results.json", results)
    rows = [results] + ([{"run": Path(results["baseline"]["run"]).name, "method": "none",
                          "metrics": results["baseline"]["metrics"], "settings": {}, "sizes": {}}]
                        if results["baseline"] else [])
    lines = [f"# {results['run']}", "", results["description"], "",
             f"- model: `{results['model']}`",
             f"- method: `{results['method']}` {_settings_text(results['settings'])}",
             f"- calibration: `{results['calibration']['dataset']}`, {results['calibration']['n_samples']} x "
             f"{results['calibration']['seq_len']} tokens, seed {results['calibration']['seed']}",
             f"- checkpoint sizes: {_sizes_text(results['sizes'])}",
             f"- stage times (s): {', '.join(f'{k} {v}' for k, v in results['timings_s'].items())}", "",
             "## Accuracy", "", compare_table(rows, baseline=rows[-1] if results["baseline"] else None)]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    return results


def _settings_text(settings: dict) -> str:
    keys = [k for k in settings if k not in ("method",) and settings[k] not in (None, [], {})]
    return "(" + ", ".join(f"{k}={settings[k]}" for k in keys) + ")" if keys else ""


def _sizes_text(sizes: dict) -> str:
    return ", ".join(f"{k.removesuffix('_bytes')} {v / 2**20:.1f} MiB" for k, v in sizes.items()) or "not exported"


def _fmt(value: float | None, lower_better: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if lower_better else f"{100 * value:.2f}"


def _delta(value: float | None, base: float | None, lower_better: bool) -> str:
    if value is None or base is None:
        return ""
    if lower_better:  # perplexity: relative change
        return f" ({100 * (value - base) / base:+.1f}%)"
    return f" ({100 * (value - base):+.2f})"  # accuracy: points


def load_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    return read_json(path) if path.is_file() else collect_results(run_dir)


def compare_table(runs: list[dict], baseline: dict | None = None) -> str:
    """Markdown: one row per run, one column per task metric; deltas against the baseline run.

    Accuracies are in percent with the delta in points; perplexities with the relative delta.
    """
    tasks = [t for t in PRIMARY_METRICS if any(t in r["metrics"] for r in runs)]
    tasks += sorted({t for r in runs for t in r["metrics"]} - set(tasks))
    columns = [(t, m, lb) for t in tasks for m, lb in PRIMARY_METRICS.get(t, [("acc", False)])]
    header = ["run", "method", "settings", "size MiB"] + [f"{t} {m}{' ↓' if lb else ''}" for t, m, lb in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        size = run.get("sizes", {}).get("hf_bytes")
        cells = [run["run"], run["method"], _settings_text(run.get("settings", {})),
                 f"{size / 2**20:.0f}" if size else "–"]
        for task, metric, lb in columns:
            value = run["metrics"].get(task, {}).get(metric)
            base = baseline["metrics"].get(task, {}).get(metric) if baseline and baseline is not run else None
            cells.append(_fmt(value, lb) + _delta(value, base, lb))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_runs(run_dirs: list[Path], baseline_dir: Path | None = None) -> str:
    runs = [load_run(d) for d in run_dirs]
    baseline = None
    if baseline_dir is not None:
        baseline = load_run(baseline_dir)
        if baseline_dir not in run_dirs:
            runs.insert(0, baseline)
    else:
        baseline = next((r for r in runs if r["method"] == "none"), None)
    return compare_table(runs, baseline)
