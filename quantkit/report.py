"""Report stage: `results.json` + `summary.md` per run; comparisons across runs: tables with standard errors and
noise marks (markdown, CSV, self-contained HTML) and accuracy-vs-size/speed plots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.choose import lower_is_better
from quantkit.runfolder import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_recipe

# Which of a task's metrics a table shows first (display only: values, stderr and each metric's direction come
# from lm-eval's results as the evaluate stage stored them). A task not listed shows its first metric.
PRIMARY_METRICS: dict[str, list[str]] = {
    "wiki_ppl": ["word_perplexity"],
    "lambada": ["acc", "perplexity"],
    "hellaswag": ["acc_norm"],
    "arc_easy": ["acc"],
    "arc_challenge": ["acc_norm"],
    "piqa": ["acc"],
    "winogrande": ["acc"],
    "mmlu": ["acc"],
    "gsm8k_olmes": ["exact_match_strict-match"],
}
NOT_METRIC_KEYS = ("n", "higher_is_better", "alias", "samples")


def _metrics(run_dir: Path) -> dict:
    path = run_dir / "eval" / "lm_eval.json"
    return read_json(path)["tasks"] if path.is_file() else {}


def find_baseline(run_dir: Path) -> Path | None:
    """A sibling run of the same model with method 'none' that has evaluation results."""
    recipe = read_recipe(run_dir)
    if recipe["quantize"]["method"] == "none":
        return None
    for other in sorted(run_dir.parent.iterdir()):
        if other == run_dir or not (other / "recipe.yaml").is_file() or not _metrics(other):
            continue
        r = read_recipe(other)
        if r["quantize"]["method"] == "none" and r["model"]["source"] == recipe["model"]["source"]:
            return other
    return None


def collect_results(run_dir: Path) -> dict[str, Any]:
    recipe = read_recipe(run_dir)
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
        "effective_bits": quant.get("effective_bits"),
        "bench": read_json(bench_path) if bench_path.is_file() else None,
        "baseline": {"run": str(baseline_dir), "metrics": _metrics(baseline_dir)} if baseline_dir else None,
        "versions": quant.get("versions", {}),
        "auto_quantize": _auto_summary(run_dir),
    }


def _auto_summary(run_dir: Path) -> dict[str, Any] | None:
    """Method auto: achieved and target bits and layers per format (the per-layer list stays in the file)."""
    path = run_dir / "quantize" / "auto_quantize.json"
    if not path.is_file():
        return None
    choice = read_json(path)
    return {k: choice[k] for k in ("effective_bits", "effective_bits_target", "layer_counts")} | {
        "file": "quantize/auto_quantize.json"}


def method_text(run: dict) -> str:
    """The method cell: for auto, the bits it reached and how many layers took each format."""
    auto = run.get("auto_quantize")
    if not auto:
        return run["method"]
    counts = ", ".join(f"{m} {n}" for m, n in sorted(auto["layer_counts"].items()))
    return f"{run['method']} ({auto['effective_bits']:.2f} bits: {counts})"


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
             *([f"- per-layer formats: {method_text(results)} for a budget of "
                f"{results['auto_quantize']['effective_bits_target']} bits ({results['auto_quantize']['file']})"]
               if results.get("auto_quantize") else []),
             f"- stage times (s): {', '.join(f'{k} {v}' for k, v in results['timings_s'].items())}", "",
             "## Accuracy", "", compare_table(rows, baseline=rows[-1] if results["baseline"] else None)]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    return results


def _settings_text(settings: dict) -> str:
    keys = [k for k in settings if k not in ("method",) and settings[k] not in (None, [], {})]
    return "(" + ", ".join(f"{k}={settings[k]}" for k in keys) + ")" if keys else ""


def _sizes_text(sizes: dict) -> str:
    return ", ".join(f"{k.removesuffix('_bytes')} {v / 2**20:.1f} MiB" for k, v in sizes.items()) or "not exported"


def load_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    return read_json(path) if path.is_file() else collect_results(Path(run_dir))


# ----------------------------------------------------------------------------- cells: value, delta, noise

NOISE_SIGMAS = 2.0  # a delta smaller than this many standard errors is marked as noise


@dataclass
class Cell:
    """One table cell: a run's metric and its difference from the baseline, with the noise on that difference."""

    task: str
    metric: str
    lower_better: bool
    value: float | None
    stderr: float | None = None
    base: float | None = None
    delta: float | None = None       # run - baseline, metric units
    delta_se: float | None = None    # sqrt(se_run^2 + se_base^2); None where lm-eval gives no stderr
    n: int | None = None
    n_base: int | None = None

    @property
    def noise(self) -> bool | None:
        """True: |delta| < 2 standard errors; None: unknown (no stderr, or no baseline)."""
        if self.delta is None or not self.delta_se:
            return None
        return abs(self.delta) < NOISE_SIGMAS * self.delta_se

    @property
    def n_differs(self) -> bool:
        return self.delta is not None and self.n is not None and self.n_base is not None and self.n != self.n_base

    @property
    def worse(self) -> bool | None:
        if self.delta is None:
            return None
        return self.delta > 0 if self.lower_better else self.delta < 0

    def value_text(self) -> str:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return "–"
        return f"{self.value:.3f}" if self.lower_better else f"{100 * self.value:.2f}"

    def delta_text(self) -> str:
        """Perplexities: relative change in %; accuracies: change in points; '± se' where known."""
        if self.delta is None or self.base is None:
            return ""
        if self.lower_better:
            if not self.base:
                return ""
            se = f" ± {100 * self.delta_se / abs(self.base):.1f}%" if self.delta_se else ""
            return f"{100 * self.delta / abs(self.base):+.1f}%{se}"
        se = f" ± {100 * self.delta_se:.2f}" if self.delta_se else ""
        return f"{100 * self.delta:+.2f}{se}"

    def markdown(self) -> str:
        delta = self.delta_text()
        text = self.value_text() + (f" ({delta})" if delta else "")
        if self.noise:
            text = f"~ {text}"
        if self.n_differs:
            text += " †"
        return text


def make_cell(run: dict, baseline: dict | None, task: str, metric: str, lower_better: bool) -> Cell:
    got = run.get("metrics", {}).get(task, {})
    cell = Cell(task, metric, lower_better, got.get(metric), got.get(f"{metric}_stderr"), n=got.get("n"))
    if baseline is None or baseline is run or baseline.get("run") == run.get("run"):
        return cell
    ref = baseline.get("metrics", {}).get(task, {})
    cell.base, cell.n_base = ref.get(metric), ref.get("n")
    if cell.value is not None and cell.base is not None:
        cell.delta = cell.value - cell.base
        se_base = ref.get(f"{metric}_stderr")
        if cell.stderr is not None and se_base is not None:
            # Independent-samples error: conservative, since both runs score the same examples (paired).
            cell.delta_se = math.hypot(cell.stderr, se_base)
    return cell


def task_metrics(row: dict) -> list[str]:
    """A task's metric names in lm-eval's order (no stderr, counts or directions)."""
    return [k for k, v in row.items() if k not in NOT_METRIC_KEYS and not k.endswith("_stderr")
            and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))]


def table_columns(runs: list[dict]) -> list[tuple[str, str, bool]]:
    """(task, metric, lower_better) for every task any run has, the listed tasks first in their order."""
    tasks = [t for t in PRIMARY_METRICS if any(t in r.get("metrics", {}) for r in runs)]
    tasks += sorted({t for r in runs for t in r.get("metrics", {})} - set(tasks))
    cols = []
    for t in tasks:
        names = PRIMARY_METRICS.get(t) or next((task_metrics(r["metrics"][t])[:1] for r in runs
                                                 if task_metrics(r.get("metrics", {}).get(t) or {})), [])
        cols += [(t, m, lower_is_better(t, m, runs)) for m in names]
    return cols


def legend(runs: list[dict], baseline: dict | None) -> str:
    """How to read the deltas and marks; says which tasks have no standard error."""
    if baseline is None:
        return "No baseline run (method none) among these runs: no deltas."
    cols = table_columns(runs)
    no_se = sorted({t for t, m, _ in cols
                    if all(r.get("metrics", {}).get(t, {}).get(f"{m}_stderr") is None for r in runs)})
    n_diff = any(make_cell(r, baseline, t, m, lb).n_differs for r in runs for t, m, lb in cols)
    lines = [
        f"Deltas against `{baseline['run']}`: accuracies in % with the change in points, perplexities (↓ better) "
        "with the relative change. `± x` is one standard error of the difference, sqrt(se_run² + se_baseline²) "
        "from lm-eval's stderr (conservative: both runs score the same examples).",
        f"`~` marks a difference smaller than {NOISE_SIGMAS:g} standard errors: not distinguishable from noise, "
        "do not ship on it.",
    ]
    if no_se:
        lines.append(f"No standard error for {', '.join(no_se)}: lm-eval reports none for a corpus perplexity "
                     "(one number over the whole held-out text), so those deltas carry no noise mark; "
                     "small changes there are still real changes on that text, but of unknown spread across texts.")
    if n_diff:
        lines.append("`†` the run was scored on a different number of examples than the baseline: the delta "
                     "compares different example sets.")
    return "\n\n".join(lines)


def _size_mib(run: dict) -> str:
    from quantkit.choose import size_bytes

    size = size_bytes(run)
    return f"{size / 2**20:.0f}" if size else "–"


def _speed(run: dict) -> str:
    from quantkit.choose import decode_tok_s

    speed = decode_tok_s(run)
    return f"{speed:.1f}" if speed else "–"


def compare_table(runs: list[dict], baseline: dict | None = None, with_legend: bool = True) -> str:
    """Markdown: one row per run, one column per task metric; deltas against the baseline run, with their
    standard error and a `~` where the delta is within noise. A legend follows the table."""
    columns = table_columns(runs)
    has_speed = any(_speed(r) != "–" for r in runs)
    header = ["run", "method", "settings", "size MiB"] + (["decode tok/s (b=1)"] if has_speed else [])
    header += [f"{t} {m}{' ↓' if lb else ''}" for t, m, lb in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run["run"], method_text(run), _settings_text(run.get("settings", {})), _size_mib(run)]
        if has_speed:
            cells.append(_speed(run))
        cells += [make_cell(run, baseline, t, m, lb).markdown() for t, m, lb in columns]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    if with_legend and baseline is not None and len(runs) > 1:
        table += "\n\n" + legend(runs, baseline)
    return table


def compare_rows(runs: list[dict], baseline: dict | None = None) -> list[dict[str, Any]]:
    """Plain rows for CSV: raw values (fractions for accuracies), stderr, delta, delta_se, within_noise."""
    from quantkit.choose import decode_tok_s, effective_bits

    rows = []
    for run in runs:
        sizes = run.get("sizes") or {}
        row: dict[str, Any] = {"run": run["run"], "method": run["method"],
                               "settings": _settings_text(run.get("settings", {})).strip("()"),
                               "hf_bytes": sizes.get("hf_bytes"), "trtllm_bytes": sizes.get("trtllm_bytes"),
                               "decode_tok_s_b1": decode_tok_s(run),
                               "effective_bits": effective_bits(run)}
        for task, metric, lb in table_columns(runs):
            c = make_cell(run, baseline, task, metric, lb)
            key = f"{task}.{metric}"
            row.update({key: c.value, f"{key}.stderr": c.stderr, f"{key}.n": c.n, f"{key}.delta": c.delta,
                        f"{key}.delta_se": c.delta_se, f"{key}.within_noise": c.noise})
        rows.append(row)
    return rows


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run folders as given; a folder of run folders (a sweep folder) stands for the runs inside it."""
    out: list[Path] = []
    for path in map(Path, paths):
        if (path / "recipe.yaml").is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(p for p in path.iterdir() if (p / "recipe.yaml").is_file() and
                          ((p / "results.json").is_file() or (p / "eval" / "lm_eval.json").is_file()))
        else:
            from quantkit.errors import QuantkitError

            raise QuantkitError(f"'{path}' is not a run folder", where=str(path),
                                fix="pass run folders (holding recipe.yaml) or a sweep folder")
    return list(dict.fromkeys(out))


def load_runs(run_dirs: list[Path], baseline_dir: Path | None = None) -> tuple[list[dict], dict | None]:
    """(runs, baseline): the baseline is `baseline_dir`, else the method-none run, else one a run points to."""
    run_dirs = expand_run_dirs(run_dirs)
    runs = [load_run(d) for d in run_dirs]
    for run, d in zip(runs, run_dirs, strict=True):
        run.setdefault("run_dir", str(d))
    if baseline_dir is not None:
        baseline_dir = Path(baseline_dir)
        baseline = next((r for r, d in zip(runs, run_dirs, strict=True) if d.resolve() == baseline_dir.resolve()),
                        None)
        if baseline is None:
            baseline = load_run(baseline_dir)
            runs.insert(0, baseline)
        return runs, baseline
    baseline = next((r for r in runs if r["method"] == "none"), None)
    if baseline is None:
        ref = next((r["baseline"]["run"] for r in runs if r.get("baseline")), None)
        if ref and (Path(ref) / "recipe.yaml").is_file():
            baseline = load_run(Path(ref))
            runs.insert(0, baseline)
    return runs, baseline


def compare_runs(run_dirs: list[Path], baseline_dir: Path | None = None) -> str:
    runs, baseline = load_runs(run_dirs, baseline_dir)
    return compare_table(runs, baseline)


# ----------------------------------------------------------------------------- plots


def parse_metric(text: str) -> tuple[str, str]:
    task, _, metric = text.partition(".")
    if not metric:
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"metric '{text}' is not TASK.METRIC", where="--metric",
                            fix="e.g. wiki_ppl.word_perplexity or hellaswag.acc_norm")
    return task, metric


def short_labels(names: list[str]) -> dict[str, str]:
    """Drop the prefix every run name shares (e.g. 'smollm2-'), so plot labels stay short."""
    if len(names) < 2:
        return {n: n for n in names}
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    cut = max(prefix.rfind("-"), prefix.rfind("_")) + 1 if prefix else 0
    return {n: (n[cut:] or n) for n in names}


METHOD_COLORS = {"int8_sq": "#1f77b4", "int4_awq": "#2ca02c", "int4_rtn": "#d62728", "fp8": "#9467bd",
                 "fp8_pcpt": "#8c564b", "w4a8_awq": "#17becf", "int8_wo": "#ff7f0e", "nvfp4": "#e377c2"}


def plot_tradeoff(runs: list[dict], baseline: dict | None, x: str = "size",
                  metric: tuple[str, str] = ("wiki_ppl", "word_perplexity"), limits: list | None = None,
                  chosen: str | None = None, title: str | None = None):
    """Accuracy metric against checkpoint size (x='size', MiB) or decode speed (x='speed', tokens/s at batch 1).

    One labelled point per run (colour = method), the baseline as a black star, error bars of one standard error
    where lm-eval has one, the budget as a dashed line with the allowed region shaded, the chosen run ringed.
    Returns the matplotlib Figure, or None when no run has both numbers.
    """
    # An explicit Agg canvas instead of pyplot: no global backend, no GUI, nothing to close (CLI, CI, notebooks).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    from quantkit.choose import decode_tok_s, size_bytes

    task, name = metric
    lower = lower_is_better(task, name, [*runs, baseline])
    scale = 1.0 if lower else 100.0  # accuracies in %
    xs_of = (lambda r: (size_bytes(r) or 0) / 2**20 or None) if x == "size" else decode_tok_s
    points = []
    for r in runs:
        m = r.get("metrics", {}).get(task, {})
        xv, yv = xs_of(r), m.get(name)
        if xv is not None and yv is not None:
            se = m.get(f"{name}_stderr")
            points.append((r, xv, scale * yv, scale * se if se else None))
    if not points:
        return None
    labels = short_labels([r["run"] for r, *_ in points])
    fig = Figure(figsize=(9.5, 6.2), dpi=130)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = [p[2] for p in points]
    if lower and min(ys) > 0 and max(ys) / min(ys) > 1.6:
        ax.set_yscale("log")  # one bad run (RTN) must not flatten the differences among the good ones
        ax.yaxis.set_major_locator(FixedLocator(_nice_ticks(min(ys) * 0.97, max(ys) * 1.03)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    base_y = None
    if baseline is not None:
        bm = baseline.get("metrics", {}).get(task, {}).get(name)
        base_y = scale * bm if bm is not None else None
    if base_y is not None:
        ax.axhline(base_y, color="black", lw=0.8, alpha=0.6, zorder=1)
    budget_handles = []
    for lim in limits or []:
        if (lim.task, lim.metric) != (task, name) or base_y is None:
            continue
        edge = scale * lim.threshold(base_y / scale)
        ax.axhline(edge, color="#2b8a3e", ls="--", lw=1.3, zorder=1)
        ax.axhspan(min(base_y, edge) if lower else edge, edge if lower else max(base_y, edge),
                   color="#2b8a3e", alpha=0.08, zorder=0)
        sign = "+" if lower else "−"
        amount = f"{100 * lim.value:g}%" if lim.relative else \
            (f"{lim.value:g}" if lower else f"{100 * lim.value:g} pts")
        # In the legend, not on the line: a label there collides with whichever run sits at the edge.
        budget_handles.append(Line2D([], [], color="#2b8a3e", ls="--", lw=1.3,
                                     label=f"budget: {sign}{amount} vs baseline (shaded: within)"))
    for r, xv, yv, se in points:
        is_base = baseline is not None and r["run"] == baseline["run"]
        color = "black" if is_base else METHOD_COLORS.get(r["method"], "#7f7f7f")
        if se:
            ax.errorbar(xv, yv, yerr=se, fmt="none", ecolor=color, alpha=0.35, lw=0.9, capsize=2, zorder=2)
        ax.scatter([xv], [yv], s=170 if is_base else 46, marker="*" if is_base else "o", color=color,
                   edgecolor="white", linewidth=0.6, zorder=3)
        if r["run"] == chosen:
            ax.scatter([xv], [yv], s=230, facecolor="none", edgecolor="#2b8a3e", linewidth=2, zorder=4)
    _place_labels(ax, [(xv, yv, labels[r["run"]] + (" (baseline)" if baseline and r["run"] == baseline["run"]
                                                     and "baseline" not in labels[r["run"]] else "")
                        + (" ← chosen" if r["run"] == chosen else "")) for r, xv, yv, _ in points])
    methods = sorted({r["method"] for r, *_ in points if not (baseline and r["run"] == baseline["run"])})
    handles = [Line2D([], [], marker="o", ls="", color=METHOD_COLORS.get(mm, "#7f7f7f"), label=mm)
               for mm in methods]
    if baseline is not None:
        handles.insert(0, Line2D([], [], marker="*", ls="", ms=11, color="black", label="baseline"))
    handles += budget_handles
    ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)
    metric_label = f"{task} {name}" + (" (↓ better)" if lower else " % (↑ better)")
    ax.set_ylabel(metric_label)
    ax.set_xlabel("HF checkpoint size, MiB (← smaller)" if x == "size" else "decode tokens/s at batch 1 (→ faster)")
    n = points[0][0].get("metrics", {}).get(task, {}).get("n")
    ax.set_title(title or f"{task} {name} vs {'checkpoint size' if x == 'size' else 'decode speed'}"
                 + (f"  (n={n} {'articles' if task == 'wiki_ppl' else 'examples'})" if n else ""), fontsize=11)
    ax.grid(True, alpha=0.25, which="both")
    ax.margins(x=0.18, y=0.08)
    fig.tight_layout()
    return fig


def _place_labels(ax, items: list[tuple[float, float, str]], fontsize: float = 8) -> None:
    """Labels right of their points, pushed apart vertically where they would overlap (leader line when moved)."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the data -> pixel transform
    to_px = ax.transData.transform
    height = fontsize * fig.dpi / 72 * 1.4
    shift = 30.0  # px: moved labels sit further right so their leader lines stay visible
    pixels = [to_px((xv, yv)) for xv, yv, _ in items]
    placed = []
    for (xv, yv, text), (px, py) in zip(items, pixels, strict=True):
        width = len(text) * fontsize * fig.dpi / 72 * 0.6 + shift
        # A point with a neighbour close by gets its label set off with a leader line, even if not moved.
        crowded = any(0 < math.hypot(px - qx, py - qy) < 25 for qx, qy in pixels)
        placed.append([px, py - height / 2, width, text, py, (xv, yv), crowded])
    placed.sort(key=lambda p: p[1])
    for _ in range(300):  # relaxation: push overlapping labels apart, keeping their order
        moved = False
        for i, a in enumerate(placed):
            for b in placed[i + 1:]:
                overlap_x = a[0] < b[0] + b[2] and b[0] < a[0] + a[2]
                gap = b[1] - a[1]
                if overlap_x and gap < height:
                    push = (height - gap) / 2 + 0.5
                    a[1] -= push
                    b[1] += push
                    moved = True
        if not moved:
            break
    for _, ly, _, text, py, xy, crowded in placed:
        dy = ly + height / 2 - py
        far = crowded or abs(dy) > height / 3
        ax.annotate(text, xy=xy, xytext=((shift if far else 7) * 72 / fig.dpi, dy * 72 / fig.dpi),
                    textcoords="offset points", fontsize=fontsize, va="center", ha="left",
                    arrowprops={"arrowstyle": "-", "color": "0.45", "lw": 0.7, "shrinkA": 0, "shrinkB": 3}
                    if far else None)


def _nice_ticks(lo: float, hi: float, most: int = 12) -> list[float]:
    """Evenly spaced round numbers over [lo, hi] (a log axis inside one decade labels too few by itself)."""
    span = hi - lo
    for mag in range(math.floor(math.log10(span)) - 2, math.floor(math.log10(span)) + 2):
        for m in (1, 2, 2.5, 5):
            step = m * 10**mag
            ticks = [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
            if len(ticks) <= most:
                return ticks
    return [lo, hi]


def fig_png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------- compare outputs


def write_compare(run_dirs: list[Path], out_dir: Path, baseline_dir: Path | None = None,
                  metrics: list[tuple[str, str]] | None = None, limits: list | None = None, by: str = "size",
                  unusable: dict[str, str] | None = None, title: str = "quantkit comparison") -> dict[str, Any]:
    """table.md, table.csv, index.html (self-contained: inline CSS, plots as base64 PNG) and the PNG plots.

    Plots: each metric (default wiki_ppl word perplexity) against checkpoint size, and against decode speed
    where any run has `quantkit bench` numbers. With `limits`, the budget is drawn and the choice is reported.
    Returns {"files": [...], "choice": Choice or None, "markdown": str}.
    """
    import base64
    import csv
    import io

    from quantkit.choose import choose, decode_tok_s

    out_dir = Path(out_dir)
    runs, baseline = load_runs(run_dirs, baseline_dir)
    metrics = metrics or [("wiki_ppl", "word_perplexity")]
    choice = choose(runs, baseline, limits, by, unusable=unusable) if limits else None
    md = [f"# {title}", "", compare_table(runs, baseline)]
    if choice is not None:
        md += ["", "## Accuracy budget", "", "```", choice.render(), "```"]
    files: list[Path] = []
    images: list[tuple[str, bytes]] = []
    if limits:
        limits = [lim.with_directions([*runs, baseline]) for lim in limits]
    plotting = _have_matplotlib()
    if not plotting:
        md += ["", "No plots: matplotlib is not installed (pip install matplotlib)."]
    for metric in metrics if plotting else []:
        for x in ("size", "speed"):
            if x == "speed" and not any(decode_tok_s(r) for r in runs):
                continue
            fig = plot_tradeoff(runs, baseline, x, metric, limits, choice.chosen if choice else None)
            if fig is None:
                continue
            png = fig_png(fig)
            name = f"{metric[0]}.{metric[1]}_vs_{x}.png"
            atomic_write_bytes(out_dir / name, png)
            files.append(out_dir / name)
            images.append((name, png))
    if images:
        md += ["", "## Plots", ""] + [f"![{n}]({n})" for n, _ in images]
    markdown = "\n".join(md) + "\n"
    atomic_write_bytes(out_dir / "table.md", markdown.encode())
    rows = compare_rows(runs, baseline)
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "table.csv", buf.getvalue().encode())
    html = _html(title, runs, baseline, choice, [(n, base64.b64encode(png).decode()) for n, png in images])
    atomic_write_bytes(out_dir / "index.html", html.encode())
    files = [out_dir / "table.md", out_dir / "table.csv", out_dir / "index.html", *files]
    return {"files": files, "choice": choice, "markdown": markdown}


def _have_matplotlib() -> bool:
    """False only when matplotlib itself is absent (a broken install still raises)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        import logging

        logging.getLogger("quantkit").warning("matplotlib is not installed: tables, CSV and HTML written, no plots "
                                              "(pip install matplotlib)")
        return False
    return True


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1500px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3} td.name,th.name{text-align:left}
tr.baseline td{background:#f7f7f7;font-weight:600}
tr.chosen td{background:#e6f4ea}
td.noise{color:#888;font-style:italic}
td.worse{color:#b00020} td.better{color:#1b5e20}
.delta{font-size:11px;margin-left:4px}
.legend{font-size:13px;color:#444;max-width:1100px}
pre{background:#f6f8fa;padding:1em;font-size:12px;overflow-x:auto}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
"""


def _html(title: str, runs: list[dict], baseline: dict | None, choice, images: list[tuple[str, str]]) -> str:
    from html import escape

    columns = table_columns(runs)
    has_speed = any(_speed(r) != "–" for r in runs)
    head = ["run", "method", "settings", "size MiB"] + (["decode tok/s (b=1)"] if has_speed else [])
    head += [f"{t}<br>{m}{' ↓' if lb else ''}" for t, m, lb in columns]
    rows = []
    for r in runs:
        klass = "baseline" if baseline and r["run"] == baseline["run"] else ""
        klass = "chosen" if choice and r["run"] == choice.chosen else klass
        cells = [f'<td class="name">{escape(r["run"])}</td>', f'<td class="name">{escape(r["method"])}</td>',
                 f'<td class="name">{escape(_settings_text(r.get("settings", {})))}</td>', f"<td>{_size_mib(r)}</td>"]
        if has_speed:
            cells.append(f"<td>{_speed(r)}</td>")
        for t, m, lb in columns:
            c = make_cell(r, baseline, t, m, lb)
            cls = "noise" if c.noise else ("worse" if c.worse and c.noise is False else
                                           "better" if c.worse is False and c.noise is False else "")
            delta = c.delta_text()
            mark = "~ " if c.noise else ""
            dagger = " †" if c.n_differs else ""
            cells.append(f'<td class="{cls}">{mark}{c.value_text()}'
                         + (f'<span class="delta">({escape(delta)})</span>' if delta else "") + f"{dagger}</td>")
        rows.append(f'<tr class="{klass}">' + "".join(cells) + "</tr>")
    legend_html = "".join(f"<p>{escape(p)}</p>" for p in legend(runs, baseline).split("\n\n"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
             "<table><tr>" + "".join(f'<th class="{"name" if i < 3 else ""}">{h}</th>' for i, h in enumerate(head))
             + "</tr>" + "".join(rows) + "</table>",
             f'<div class="legend">{legend_html}<p>Grey italics: within noise; red: worse than the baseline '
             "beyond 2 standard errors; green: better beyond 2 standard errors; plain: no standard error.</p></div>"]
    if choice is not None:
        parts.append(f"<h2>Accuracy budget</h2><pre>{escape(choice.render())}</pre>")
    for name, b64 in images:
        parts.append(f"<h2>{escape(name.removesuffix('.png'))}</h2><img alt='{escape(name)}' "
                     f"src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
