"""AWQ calibration cost: time and calibration tokens/s of ModelOpt AWQ through quantkit's quantize stage.

Usage: python bench/awq_cost.py [--shape llama3-8b|smollm2] [--samples 128] [--seq 512] [--algos awq_lite,awq_clip]
Random weights (normal, std 0.02; never zeros) for the Llama-3.1-8B shape; the bundled model for smollm2.
Prints one table. Not a timed test: run it where you want the number (the GPU for 8B).
"""

from __future__ import annotations

import argparse
import time

import torch

from quantkit.calibration import CalibrationSet
from quantkit.quantize import ForwardCounter, quantize_model
from quantkit.recipe import QuantizeSection

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def build(shape: str, device: str):
    if shape == "smollm2":
        from quantkit.models import load_model

        model, _ = load_model("builtin:smollm2-135m-instruct", "bfloat16", device)
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=[*SHAPES, "smollm2"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--algos", default="awq_lite")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    rows = []
    for algo in args.algos.split(","):
        model = build(args.shape, device)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.samples, args.seq), generator=torch.Generator().manual_seed(1))
        calib = CalibrationSet(ids, args.batch, "random")
        counter = ForwardCounter()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        quantize_model(model, QuantizeSection(method="int4_awq", block_size=args.block, awq_algorithm=algo),
                       calib, counter)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        tokens = args.samples * args.seq
        rows.append((args.shape, algo, f"{args.samples}x{args.seq}", f"{wall:.1f}", f"{tokens / wall:.0f}",
                     counter.batches, card))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print("| shape | algorithm | calibration | quantize s | calib tokens/s | forward batches | device |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
