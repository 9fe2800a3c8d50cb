"""GPTQ and auto_quantize on the GPU: accuracy tables and GPTQ's calibration cost.

Usage (each call fits in ~8 minutes on one H200):
  python3 bench/gptq_auto.py int4 --blocks 32      # int4_rtn / int4_awq / int4_gptq at block 32 (+ baseline)
  python3 bench/gptq_auto.py int4 --blocks 64
  python3 bench/gptq_auto.py auto --bits 4.5,5,6,8 # method auto at each budget (int4_gptq + fp8 candidates)
  python3 bench/gptq_auto.py cost --layers 8       # GPTQ calibration time, Llama-3.1-8B shapes, random weights
The accuracy parts run the shipped recipes (recipes/*.yaml: bundled SmolLM2-135M, 64 x 512 wiki calibration) through
`quantkit run` with full wiki perplexity and full LAMBADA (lm-eval stderr), and print one markdown table each.
Block 128 does not divide SmolLM2's hidden size 576, so it is not run there. Run folders go to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EVAL = ["evaluate.tasks=[wiki_ppl, lambada]", "evaluate.limit=null", "export.trtllm=null"]  # accuracy only


def _run(recipe: str, out: Path, sets: list[str]) -> dict:
    from quantkit.pipeline import run_recipe
    from quantkit.recipe import load_recipe
    from quantkit.runfolder import read_json

    r = load_recipe(ROOT / "recipes" / recipe, [*EVAL, *sets, f"output_dir={out}"])
    t0 = time.perf_counter()
    run = run_recipe(r)
    res = read_json(run / "results.json")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def _cell(metrics: dict, task: str, metric: str, scale: float = 1.0) -> str:
    m = metrics.get(task, {})
    if m.get(metric) is None:
        return "–"
    se = m.get(f"{metric}_stderr")
    return f"{scale * m[metric]:.3f}" + (f" ± {scale * se:.3f}" if se else "")


def _table(rows: list[tuple[str, dict]], base: dict) -> str:
    b = base["metrics"]["wiki_ppl"]["word_perplexity"]
    lines = ["| run | wiki word ppl | vs baseline | lambada acc % | lambada ppl | bits | quantize s | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for label, res in rows:
        ppl = res["metrics"]["wiki_ppl"]["word_perplexity"]
        bits = (res.get("auto_quantize") or {}).get("effective_bits", "–")
        m = res["metrics"]
        lines.append(f"| {label} | {_cell(m, 'wiki_ppl', 'word_perplexity')} | {100 * (ppl / b - 1):+.1f}% "
                     f"| {_cell(m, 'lambada', 'acc', 100)} | {_cell(m, 'lambada', 'perplexity')} "
                     f"| {bits} | {res.get('quantize_s')} | {res['wall_s']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["int4", "auto", "cost"])
    ap.add_argument("--blocks", default="64")
    ap.add_argument("--bits", default="4.5,5,6,8")
    ap.add_argument("--layers", type=int, default=8, help="cost: decoder layers of the 8B-shaped model")
    ap.add_argument("--out", default="/tmp/quantkit-gptq-bench")
    args = ap.parse_args()
    out = Path(args.out)
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}", flush=True)
    if args.part == "cost":
        return _cost(args.layers)
    base = _run("baseline.yaml", out, [])
    rows = [("baseline (bf16)", base)]
    if args.part == "int4":
        for block in map(int, args.blocks.split(",")):
            for recipe in ("int4_rtn.yaml", "int4_awq.yaml", "int4_gptq.yaml"):
                name = f"{recipe.removesuffix('.yaml')}-g{block}"
                sets = [f"quantize.block_size={block}", f"metadata.name={name}"]
                rows.append((name, _run(recipe, out, sets)))
                print(rows[-1][0], "done", flush=True)
    else:
        for bits in args.bits.split(","):
            name = f"auto-{bits}bits"
            rows.append((name, _run("auto.yaml", out, [f"quantize.effective_bits={bits}", f"metadata.name={name}"])))
            print(name, "done", rows[-1][1]["auto_quantize"], flush=True)
    print(_table(rows, base))


def _cost(layers: int) -> None:
    """GPTQ wall time on Llama-3.1-8B shapes (random weights) with `layers` decoder layers, 128 x 512 tokens."""
    sys.path.insert(0, str(Path(__file__).parent))
    from awq_cost import SHAPES, build

    from quantkit.calibration import CalibrationSet
    from quantkit.quantize import ForwardCounter, quantize_model
    from quantkit.recipe import QuantizeSection

    SHAPES["llama3-8b"]["num_hidden_layers"] = layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = ["| variant | layers | quantize s | s per layer | est. 32 layers s | peak GPU GiB |",
             "|---|---|---|---|---|---|"]
    for label, kw in [("int4_rtn g128", {"method": "int4_rtn"}),
                      ("int4_gptq g128 layer-wise", {"method": "int4_gptq"}),
                      ("int4_gptq g128 all at once", {"method": "int4_gptq", "gptq_layerwise": False})]:
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
        lines.append(f"| {label} | {layers} | {dt:.1f} | {dt / layers:.2f} | {32 * dt / layers:.0f} | {peak:.1f} |")
        print(lines[-1], flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
