"""Quick INT4 comparison on CPU: token perplexity of the bundled model on the first held-out wiki windows.

Usage: python bench/int4_cpu.py [--samples 32] [--seq 256] [--articles 2] [--windows 16] VARIANT...
Each VARIANT is a recipe quantize section as JSON, e.g. '{"method": "int4_gptq", "block_size": 64}',
'{"method": "int4_hessian", "block_size": 64}',
'{"method": "int4_gptq", "block_size": 64, "gptq_scales": "local_hessian"}'.
float32 model, `builtin:wiki` calibration split (seed 1234), non-overlapping 512-token windows of the first
held-out articles. A few minutes per variant on 2 cores: for finding directions, not for RESULTS tables (GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from quantkit.calibration import build_calibration_set, load_texts
from quantkit.corpora import wiki_articles
from quantkit.models import load_model
from quantkit.quantize import quantize_model
from quantkit.recipe import QuantizeSection

WINDOW = 512


def token_ppl(model: torch.nn.Module, windows: list[torch.Tensor]) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            nll += model(w[None], labels=w[None]).loss.item() * (len(w) - 1)
            n += len(w) - 1
    return float(torch.exp(torch.tensor(nll / n)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--articles", type=int, default=2)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    model0, tok = load_model("builtin:smollm2-135m-instruct", "float32", "cpu")
    calib = build_calibration_set(load_texts("builtin:wiki"), tok, args.samples, args.seq, 8, 1234, "builtin:wiki")
    ids = tok("\n\n".join(wiki_articles("eval")[: args.articles]), return_tensors="pt")["input_ids"][0]
    windows = [ids[i:i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)][: args.windows]
    base = token_ppl(model0, windows)
    print(f"{len(windows)} windows x {WINDOW} tokens, {args.samples} x {args.seq} calibration; baseline {base:.3f}")
    print("| variant | token ppl | vs baseline | quantize s |\n|---|---|---|---|", flush=True)
    for spec in args.variants:
        t0 = time.perf_counter()
        model = quantize_model(copy.deepcopy(model0), QuantizeSection(**json.loads(spec)), calib)
        dt = time.perf_counter() - t0
        ppl = token_ppl(model, windows)
        print(f"| {spec} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% | {dt:.0f} |", flush=True)


if __name__ == "__main__":
    main()
