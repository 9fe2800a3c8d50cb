"""GPTQ and auto_quantize on the GPU: issue 13's accuracy tables and GPTQ's calibration cost, in two device calls.

Usage on one H200 (bench/gpu_stage.sh staged; two calls, each meant to stay under 8 minutes; the times are
estimates from the earlier GPU runs, not measured for this script):
  python3 bench/gptq_auto.py int4          # call 1, ~5-7 min: baseline + int4_rtn / int4_awq (awq_clip) / int4_gptq
                                           # (on local_hessian scales) at block 32 and 64, and at
                                           # block 64 int4_hessian, int4_gptq on max scales and int4_gptq
                                           # without act order on 64 x 512 tokens: 10 runs
  python3 bench/gptq_auto.py auto cost     # call 2, ~6-7 min: method auto at 4.5 / 5 / 6 / 8 bits (+ baseline,
                                           # reused from call 1 while the machine is warm), then GPTQ calibration
                                           # time on Llama-3.1-8B shapes (8 random-weight layers, extrapolated to 32;
                                           # ModelOpt's own column update on 2 layers, against quantkit's)
A call cut short keeps its printed rows; rerunning it with the same --out skips the runs that finished.
All SmolLM2 runs go through `quantkit run` (quantkit.pipeline.run_recipe) on the shipped recipes (bundled SmolLM2-135M,
bf16, 64 x 512 wiki calibration tokens) with one shared RunCache (weights, tokenizer and calibration batches loaded
once), accuracy only: full wiki word perplexity (21 held-out articles) and full LAMBADA (5,153 passages) with lm-eval's
stderr, at evaluation batch --batch-size; no checkpoint export (the evaluated model is the one the HF checkpoint holds:
the pipeline applies prepare_for_deployment before evaluating). Every row is printed as a markdown table row as soon
as its run finishes (a timeout keeps the finished rows), and all tables are also written to $OUT/gptq_auto.md.
Block 128 does not divide SmolLM2's hidden size 576, so it is not run there. Run folders go to --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["wiki_ppl", "lambada"]
INT4 = ("int4_rtn", "int4_awq", "int4_gptq")  # shipped recipes, run at every block size
# at block 64 only: local_hessian scales without GPTQ, and GPTQ on ModelOpt's max scales
BEST = [("int4_hessian", "int4_hessian-g64", []),
        ("int4_gptq", "int4_gptq-maxscales-g64", ["quantize.gptq_scales=max"]),  # ModelOpt's own scales
        # int4_gptq before activation order and the larger calibration set: the GPU counterpart of RESULTS' CPU row
        ("int4_gptq", "int4_gptq-storedorder-64x512-g64",
         ["quantize.gptq_act_order=false", "calibration.n_samples=64"])]
HEADER = ("| run | settings | wiki word ppl ↓ | vs baseline | lambada acc % | lambada ppl ↓ | bits | quantize s "
          "| wall s |\n|---|---|---|---|---|---|---|---|---|")


class Bench:
    """One RunCache and one baseline for every run of this process; rows are printed and kept as they finish."""

    def __init__(self, out: Path, batch_size: int, limit: int | None = None) -> None:
        from quantkit.pipeline import RunCache
        from quantkit.recipe import EvaluateSection

        self.out, self.cache = out, RunCache()
        self.evaluate = EvaluateSection(tasks=TASKS, limit=limit, batch_size=batch_size)
        self.lines: list[str] = []
        self.base: dict | None = None

    def run(self, recipe: str, name: str, sets: list[str] | None = None) -> dict:
        from quantkit.pipeline import run_recipe
        from quantkit.recipe import load_recipe
        from quantkit.runfolder import read_json

        r = load_recipe(ROOT / "recipes" / f"{recipe}.yaml",
                        [*(sets or []), f"metadata.name={name}", "export.trtllm=null", "export.hf=false",
                         "build.enabled=false"])
        r.evaluate, r.output_dir = self.evaluate, str(self.out)
        t0 = time.perf_counter()
        res = read_json(run_recipe(r, cache=self.cache) / "results.json")
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        return res

    def baseline(self) -> None:
        if self.base is None:
            self.base = self.run("baseline", "baseline")
            self.row("baseline (bf16)", self.base)

    def row(self, label: str, res: dict) -> None:
        m = res["metrics"]
        ppl, b = m["wiki_ppl"]["word_perplexity"], self.base["metrics"]["wiki_ppl"]["word_perplexity"]
        settings = ", ".join(f"{k} {v}" for k, v in res["settings"].items()
                             if k not in ("method", "exclude", "kv_cache") and v is not None)
        from quantkit.report import method_text

        # the bits every run recorded; auto's cell also names how many layers took each format
        bits = method_text(res) if res.get("auto_quantize") else res.get("effective_bits") or "–"
        line = (f"| {label} | {settings} | {_cell(m, 'wiki_ppl', 'word_perplexity')} | {100 * (ppl / b - 1):+.1f}% "
                f"| {_cell(m, 'lambada', 'acc', 100, 2)} | {_cell(m, 'lambada', 'perplexity')} | {bits} "
                f"| {res.get('quantize_s') or '–'} | {res['wall_s']} |")
        if not self.lines or not self.lines[-1].startswith("|"):
            print(HEADER, flush=True)
            self.lines.append(HEADER)
        print(line, flush=True)
        self.lines.append(line)

    def section(self, title: str) -> None:
        print(f"\n### {title}\n", flush=True)
        self.lines += ["", f"### {title}", ""]


def _cell(metrics: dict, task: str, metric: str, scale: float = 1.0, digits: int = 3) -> str:
    m = metrics.get(task, {})
    if m.get(metric) is None:
        return "–"
    se = m.get(f"{metric}_stderr")
    return f"{scale * m[metric]:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se else "")


def int4(bench: Bench, blocks: list[int], methods: tuple[str, ...] = INT4) -> None:
    bench.section("INT4 weight-only on SmolLM2-135M: RTN, AWQ (awq_clip), GPTQ; at block 64 local-Hessian scales")
    bench.baseline()
    for block in blocks:
        for method in methods:
            name = f"{method}-g{block}"
            bench.row(name, bench.run(method, name, [f"quantize.block_size={block}"]))
    if 64 in blocks:
        for recipe, name, sets in BEST:
            bench.row(name, bench.run(recipe, name, ["quantize.block_size=64", *sets]))


def auto(bench: Bench, bits: list[str]) -> None:
    bench.section("method auto (int4_gptq / fp8 / 16-bit per layer) against the effective-bits budget")
    bench.baseline()
    for b in bits:
        name = f"auto-{b}bits"
        bench.row(name, bench.run("auto", name, [f"quantize.effective_bits={b}"]))


def cost(bench: Bench, layers: int, modelopt_layers: int, all_at_once: bool) -> None:
    """GPTQ wall time on Llama-3.1-8B shapes (random weights), 128 x 512 tokens; ModelOpt's update on fewer layers."""
    sys.path.insert(0, str(Path(__file__).parent))
    from awq_cost import SHAPES, build

    from quantkit.calibration import CalibrationSet
    from quantkit.quantize import ForwardCounter, quantize_model
    from quantkit.recipe import QuantizeSection

    bench.section("GPTQ calibration cost, Llama-3.1-8B shapes (random weights), 128 x 512 tokens")
    header = ("| variant | layers | quantize s | s per layer | est. 32 layers s | peak GPU GiB |\n"
              "|---|---|---|---|---|---|")
    print(header, flush=True)
    bench.lines.append(header)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    import contextlib

    from quantkit import quantize as qz

    own = qz.group_local_gptq
    variants = [("int4_rtn g128 (no data)", {"method": "int4_rtn"}, own, layers),
                ("int4_gptq g128, layer-wise (default)", {"method": "int4_gptq"}, own, layers),
                # the same GPTQ with ModelOpt 0.47's own column update (whole-matrix fake quant per column): slow,
                # hence fewer layers
                ("int4_gptq g128, layer-wise, ModelOpt's update", {"method": "int4_gptq"},
                 lambda **kw: contextlib.nullcontext(),
                 modelopt_layers)]
    if all_at_once:
        variants.append(("int4_gptq g128, all layers at once", {"method": "int4_gptq", "gptq_layerwise": False}, own,
                         layers))
    for label, kw, update, n in variants:
        if not n:
            continue
        qz.group_local_gptq = update
        SHAPES["llama3-8b"]["num_hidden_layers"] = n
        model = build("llama3-8b", device)
        ids = torch.randint(0, model.config.vocab_size, (128, 512), generator=torch.Generator().manual_seed(1))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        quantize_model(model, QuantizeSection(block_size=128, **kw), CalibrationSet(ids, 8, "random"), ForwardCounter())
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        line = f"| {label} | {n} | {dt:.1f} | {dt / n:.2f} | {32 * dt / n:.0f} | {peak:.1f} |"
        print(line, flush=True)
        bench.lines.append(line)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    qz.group_local_gptq = own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=["int4", "auto", "cost"])
    ap.add_argument("--blocks", default="32,64")
    ap.add_argument("--int4-methods", default=",".join(INT4), help="int4: the uniform methods run at each block")
    ap.add_argument("--bits", default="4.5,5,6,8")
    ap.add_argument("--layers", type=int, default=8, help="cost: decoder layers of the 8B-shaped model")
    ap.add_argument("--modelopt-layers", type=int, default=2, help="cost: layers for ModelOpt's own update (0: skip)")
    ap.add_argument("--all-at-once", action="store_true", help="cost: also GPTQ without layer-wise Hessians")
    ap.add_argument("--batch-size", type=int, default=64, help="lm-eval batch size")
    ap.add_argument("--limit", type=int, default=None, help="examples per task (a CPU smoke test; tables use all)")
    ap.add_argument("--out", default="/tmp/quantkit-gptq-bench")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}", flush=True)
    bench = Bench(Path(args.out), args.batch_size, args.limit)
    t0 = time.perf_counter()
    try:
        for part in args.parts:
            if part == "int4":
                int4(bench, [int(b) for b in args.blocks.split(",")], tuple(args.int4_methods.split(",")))
            elif part == "auto":
                auto(bench, args.bits.split(","))
            else:
                cost(bench, args.layers, args.modelopt_layers, args.all_at_once)
    finally:
        text = "\n".join(bench.lines) + f"\n\n{' '.join(args.parts)}: {time.perf_counter() - t0:.0f} s in all\n"
        print(text)
        if os.environ.get("OUT"):
            (Path(os.environ["OUT"]) / "gptq_auto.md").write_text(text)


if __name__ == "__main__":
    main()
