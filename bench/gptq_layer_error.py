"""GPTQ's held-out layer error on the bundled model: where it beats plain rounding, and what damping does.

Usage: python bench/gptq_layer_error.py 3,15   (decoder layers to look at; ~10 min on 2 busy CPU cores)
For q/o/up/down of each layer: relative output error ||X (W - Wq)^T|| / ||X W^T|| on 1,024 held-out wiki tokens
(in brackets: on the calibration tokens the Hessian came from) for RTN and for ModelOpt's own GPTQ update
(`gptq_blockwise_update`, what `int4_gptq` runs) with damping 0.01 / 0.1 and wiki / news calibration,
32 x 256 tokens, block 64, float32, inputs from the unquantized model (one layer at a time).
"""

from __future__ import annotations

import copy
import sys

import torch
from modelopt.torch.quantization.utils.calib_utils import compute_hessian_inverse, gptq_blockwise_update, update_hessian

from quantkit.calibration import build_calibration_set, load_texts
from quantkit.corpora import wiki_articles
from quantkit.models import load_model
from quantkit.quantize import quantize_model
from quantkit.recipe import QuantizeSection

PROJS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
DAMPING = (0.01, 0.1)


def capture(model: torch.nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: store[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def rel_err(x: torch.Tensor, w0: torch.Tensor, wq: torch.Tensor) -> float:
    return ((x @ (w0 - wq).t()).norm() / (x @ w0.t()).norm()).item()


def main() -> None:
    layers = [int(x) for x in sys.argv[1].split(",")]
    model, tok = load_model("builtin:smollm2-135m-instruct", "float32", "cpu")
    names = [f"model.layers.{i}.{p}" for i in layers for p in PROJS]
    calib = {src: build_calibration_set(load_texts(f"builtin:{src}"), tok, 32, 256, 8, 1234, src)
             for src in ("wiki", "news")}
    held_out = tok(wiki_articles("eval")[0], return_tensors="pt")["input_ids"][0][:1024]
    x_eval = capture(model, names, [held_out[None]])
    x_cal = {src: capture(model, names, list(c.batches())) for src, c in calib.items()}
    rtn = dict(quantize_model(copy.deepcopy(model), QuantizeSection(method="int4_rtn", block_size=64), None)
               .named_modules())
    mods = dict(model.named_modules())
    print("| layer | RTN | " + " | ".join(f"GPTQ damp {d}, {s} calib" for s in x_cal for d in DAMPING) + " |")
    print("|---" * (2 + len(x_cal) * len(DAMPING)) + "|")
    for n in names:
        w0, quant = mods[n].weight.detach().float(), rtn[n].weight_quantizer
        with torch.no_grad():
            row = [f"{rel_err(x_eval[n], w0, quant(w0.clone())):.4f}"]
            for x in x_cal.values():
                h, _ = update_hessian(x[n], torch.zeros(w0.shape[1], w0.shape[1]), 0)
                for d in DAMPING:
                    w = w0.clone()
                    gptq_blockwise_update(w, compute_hessian_inverse(h, w, d), 128, quant)
                    row.append(f"{rel_err(x_eval[n], w0, w):.4f} ({rel_err(x[n], w0, w):.4f})")
        print(f"| {n.removeprefix('model.layers.')} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
