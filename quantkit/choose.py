"""Accuracy budget: pick the smallest (or fastest) run whose loss against the baseline stays within a stated
limit per metric, and say why every other run was not picked.

A limit is `task.metric=X%` (relative to the baseline's value) or `task.metric=X` (absolute, in the metric's own
units: 0.02 on an accuracy is 2 points; `2pt` says the same). "Loss" is always measured in the bad direction, so
it is positive when a run is worse: higher perplexity, lower accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from quantkit.errors import QuantkitError

BY = ("size", "speed", "bits")  # bits: average weight bits over the quantized layers


def lower_is_better(task: str, metric: str, runs: Iterable[dict] = ()) -> bool:
    """The one home of a metric's direction: lm-eval's `higher_is_better` for that task, as the evaluate stage
    recorded it in each run's metrics. Run folders written before it was recorded fall back to lm-eval's
    registry of its built-in metrics (acc, perplexity, ...); a metric neither knows counts as higher-better."""
    for run in runs:
        recorded = ((run or {}).get("metrics", {}).get(task) or {}).get("higher_is_better")
        if isinstance(recorded, dict) and metric in recorded:
            return not recorded[metric]
    from lm_eval.api.registry import is_higher_better

    return is_higher_better(metric) is False


@dataclass(frozen=True)
class Limit:
    task: str
    metric: str
    value: float     # a fraction when relative (0.01 = 1%), else metric units
    relative: bool
    text: str        # as the user wrote it
    lower: bool | None = None  # lower is better; set from the runs by `with_directions`

    @property
    def lower_better(self) -> bool:
        return self.lower if self.lower is not None else lower_is_better(self.task, self.metric)

    def with_directions(self, runs: Iterable[dict]) -> Limit:
        return replace(self, lower=lower_is_better(self.task, self.metric, runs))

    @property
    def key(self) -> str:
        return f"{self.task}.{self.metric}"

    def describe(self) -> str:
        lower = self.lower_better
        if self.relative:
            amount = f"{100 * self.value:g}% of the baseline"
        else:  # accuracies are fractions: say points
            amount = f"{self.value:g} (absolute)" if lower else f"{100 * self.value:g} points"
        worse = "rise" if lower else "fall"
        return f"{self.key} may {worse} by at most {amount}"

    def threshold(self, base: float) -> float:
        """The worst value still within the limit, given the baseline's value."""
        allowed = self.value * abs(base) if self.relative else self.value
        return base + allowed if self.lower_better else base - allowed


_LIMIT = re.compile(r"^\s*([\w-]+)\.([\w-]+)\s*[=:<]=?\s*\+?([0-9.]+(?:e-?\d+)?)\s*(%|pts?|points?)?\s*$")


def parse_limit(text: str) -> Limit:
    """'wiki_ppl.word_perplexity=1%' (relative), 'hellaswag.acc_norm=0.02' or '=2pt' (absolute)."""
    m = _LIMIT.match(str(text))
    if not m:
        raise QuantkitError(f"budget '{text}' is not TASK.METRIC=VALUE[%|pt]", where="--max-loss",
                            fix="e.g. --max-loss wiki_ppl.word_perplexity=1% --max-loss hellaswag.acc_norm=0.02")
    task, metric, number, unit = m.groups()
    value = float(number)
    if unit == "%":
        return Limit(task, metric, value / 100, True, text)
    if unit:  # points of an accuracy held as a fraction
        value /= 100
    return Limit(task, metric, value, False, text)


def parse_budget(spec: Any) -> list[Limit]:
    """A list of 'task.metric=X' strings, or a mapping {task.metric: X} (X: '1%', 0.02, '2pt')."""
    if spec is None:
        return []
    if isinstance(spec, dict):
        spec = [f"{k}={v}" for k, v in spec.items()]
    if isinstance(spec, str):
        spec = [spec]
    return [parse_limit(s) for s in spec]


@dataclass
class Loss:
    value: float | None       # run's value
    base: float | None        # baseline's value
    loss: float | None        # in the bad direction (positive = worse), metric units
    se: float | None          # standard error of the difference: sqrt(se_run^2 + se_base^2)
    relative: float | None    # loss / |base|

    def text(self, limit: Limit) -> str:
        if self.loss is None:
            return f"{limit.key} missing"
        if limit.relative:
            amount = f"{100 * self.relative:+.2f}%"
            noise = f" ± {100 * self.se / abs(self.base):.2f}%" if self.se else ""
        else:
            scale, unit = (100, " pts") if not limit.lower_better else (1, "")
            amount = f"{scale * self.loss:+.3g}{unit}"
            noise = f" ± {scale * self.se:.3g}{unit}" if self.se else ""
        return f"{limit.key} loss {amount}{noise}"


def metric_loss(run: dict, baseline: dict, task: str, metric: str) -> Loss:
    got = run.get("metrics", {}).get(task, {})
    ref = baseline.get("metrics", {}).get(task, {})
    value, base = got.get(metric), ref.get(metric)
    if value is None or base is None:
        return Loss(value, base, None, None, None)
    loss = (value - base) if lower_is_better(task, metric, (run, baseline)) else (base - value)
    se_run, se_base = got.get(f"{metric}_stderr"), ref.get(f"{metric}_stderr")
    se = math.hypot(se_run, se_base) if se_run is not None and se_base is not None else None
    if run.get("run") == baseline.get("run"):
        se = None  # the baseline against itself: exactly zero, no noise
    return Loss(value, base, loss, se, loss / abs(base) if base else None)


def size_bytes(run: dict) -> int | None:
    sizes = run.get("sizes") or {}
    bench = run.get("bench") or {}
    return sizes.get("hf_bytes") or sizes.get("trtllm_bytes") or bench.get("checkpoint_bytes")


def decode_tok_s(run: dict, batch_size: int = 1) -> float | None:
    """Decode tokens/s at `batch_size` from `quantkit bench` (results.json 'bench'), or None."""
    bench = run.get("bench") or {}
    for row in bench.get("results", []):
        if row.get("batch_size") == batch_size and row.get("decode_tok_s"):
            return float(row["decode_tok_s"])
    return None


def effective_bits(run: dict) -> float | None:
    """Average weight bits over the quantized layers, as the quantize stage recorded them (method auto: its
    per-layer choice; uniform methods: their weights' width; runs from before that record: auto's file only);
    the baseline is 16."""
    if run.get("effective_bits") is not None:
        return float(run["effective_bits"])
    auto = run.get("auto_quantize") or {}
    if auto.get("effective_bits") is not None:
        return float(auto["effective_bits"])
    return 16.0 if run.get("method") == "none" else None


@dataclass
class Verdict:
    run: str
    ok: bool
    reasons: list[str] = field(default_factory=list)     # why it fails the budget (empty when within)
    losses: list[str] = field(default_factory=list)      # every limit's loss, for the report
    size: int | None = None
    speed: float | None = None
    bits: float | None = None
    chosen: bool = False
    note: str = ""                                       # why an in-budget run was not picked

    def line(self) -> str:
        if self.chosen:
            return f"CHOSEN   {self.run}: {'; '.join(self.losses) or 'no limits'}"
        if self.ok:
            return f"in budget, not picked  {self.run}: {self.note}"
        return f"rejected {self.run}: {'; '.join(self.reasons)}"


@dataclass
class Choice:
    limits: list[Limit]
    by: str
    baseline: str | None
    chosen: str | None
    verdicts: list[Verdict]
    conservative: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "baseline": self.baseline, "chosen": self.chosen, "conservative": self.conservative,
                "limits": [lim.text for lim in self.limits],
                "verdicts": [{"run": v.run, "ok": v.ok, "chosen": v.chosen, "reasons": v.reasons,
                              "losses": v.losses, "note": v.note, "size_bytes": v.size, "decode_tok_s": v.speed,
                              "effective_bits": v.bits}
                             for v in self.verdicts]}

    def render(self) -> str:
        what = {"size": "smallest HF checkpoint", "speed": "fastest decode (tokens/s at batch 1)",
                "bits": "fewest effective weight bits over the quantized layers"}[self.by]
        rule = "loss + 2 standard errors" if self.conservative else "measured loss"
        lines = [f"Budget against {self.baseline or 'no baseline'} ({rule} must stay within every limit): "
                 + ("; ".join(lim.describe() for lim in self.limits) or "no limits"),
                 f"Pick: the {what} within budget.", ""]
        lines += [v.line() for v in sorted(self.verdicts, key=lambda v: (not v.chosen, not v.ok, v.run))]
        if self.chosen and self.chosen == self.baseline:
            lines += ["", f"Chosen: {self.chosen} (the baseline: no quantized run is within the budget)"]
        else:
            lines += ["", f"Chosen: {self.chosen}" if self.chosen else "Chosen: none (no run is within the budget)"]
        return "\n".join(lines)


def choose(runs: list[dict], baseline: dict | None, limits: list[Limit], by: str = "size",
           conservative: bool = False, unusable: dict[str, str] | None = None) -> Choice:
    """Judge every run against the budget and pick the best by `by` ('size' or 'speed').

    `runs` are results.json dicts (the baseline may be among them: it is always within budget, so it is picked
    when no quantized run fits). `unusable` maps run names that have no results (failed or invalid sweep points)
    to the reason, so the report lists them too. With `conservative`, a loss counts as loss + 2 standard errors
    where a standard error is known, so a run passes only when it is within budget beyond the noise.
    """
    if by not in BY:
        raise QuantkitError(f"unknown --by '{by}'", where="--by", fix=f"use one of: {', '.join(BY)}")
    if limits and baseline is None:
        raise QuantkitError("an accuracy budget needs a baseline run (method none) to measure losses against",
                            where="choose", fix="add the baseline run folder, or pass --baseline RUN")
    limits = [lim.with_directions([*runs, baseline]) for lim in limits]
    verdicts = []
    for run in runs:
        v = Verdict(run["run"], True, size=size_bytes(run), speed=decode_tok_s(run), bits=effective_bits(run))
        for lim in limits:
            loss = metric_loss(run, baseline, lim.task, lim.metric)
            v.losses.append(loss.text(lim))
            if loss.loss is None:
                v.ok = False
                v.reasons.append(f"{lim.key} not measured in this run or the baseline")
                continue
            counted = loss.loss + (2 * loss.se if conservative and loss.se else 0.0)
            allowed = lim.value * abs(loss.base) if lim.relative else lim.value
            if counted > allowed + 1e-12:
                v.ok = False
                over = f"{100 * counted / abs(loss.base):.2f}% > {100 * lim.value:g}%" if lim.relative else \
                    f"{counted:.4g} > {lim.value:g}"
                noise = ""
                if loss.se:
                    noise = " (within noise: < 2 standard errors)" if abs(loss.loss) < 2 * loss.se else ""
                v.reasons.append(f"{loss.text(lim)}: over budget ({over}){noise}")
        key_value = {"size": v.size, "speed": v.speed, "bits": v.bits}[by]
        if v.ok and key_value is None:
            v.ok = False
            v.reasons.append({"size": "no checkpoint size recorded",
                              "speed": "no speed measured (run `quantkit bench RUN`)",
                              "bits": "no effective bits recorded (a run from before they were: rerun it)"}[by])
        verdicts.append(v)
    for name, reason in (unusable or {}).items():
        verdicts.append(Verdict(name, False, [reason]))

    ok = [v for v in verdicts if v.ok]
    # Ties (same size, e.g. alpha variants) go to the smaller loss: the first limit's loss, then the name.
    def rank(v: Verdict) -> tuple:
        primary = {"size": v.size, "speed": -(v.speed or 0.0), "bits": v.bits}[by]
        secondary = (v.size or 0) if by != "size" else -(v.speed or 0.0)
        return (primary, secondary, _first_loss(v, runs, baseline, limits), v.run)

    best = min(ok, key=rank) if ok else None
    if best is not None:
        best.chosen = True
        for v in ok:
            if v is best:
                continue
            if by == "bits":
                v.note = f"{v.bits:.2f} vs {best.bits:.2f} effective bits"
            elif by == "size":
                v.note = (f"{_mib(v.size)} vs {_mib(best.size)}" if v.size != best.size
                          else f"same size as {best.run} ({_mib(v.size)}), larger loss")
            else:
                v.note = f"{v.speed:.1f} vs {best.speed:.1f} tokens/s"
    return Choice(limits, by, baseline["run"] if baseline else None, best.run if best else None, verdicts,
                  conservative)


def _first_loss(v: Verdict, runs: list[dict], baseline: dict | None, limits: list[Limit]) -> float:
    if not limits or baseline is None:
        return 0.0
    run = next(r for r in runs if r["run"] == v.run)
    loss = metric_loss(run, baseline, limits[0].task, limits[0].metric)
    return loss.relative if loss.relative is not None else math.inf


def _mib(n: int | None) -> str:
    return f"{n / 2**20:.1f} MiB" if n else "size unknown"
