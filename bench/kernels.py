"""Per-layer GEMM timings for Llama-3.1-8B shapes, every kernel quantkit.runtime can pick (GPU only).

One "layer" = the 7 projections of a decoder layer (q 4096x4096, k/v 1024x4096, o 4096x4096, gate/up
14336x4096, down 4096x14336), run through quantkit.runtime.QuantLinear with its kernel forced, so activation
quantization is included. Weights of several layers rotate so no layer is timed out of L2. Each case is captured in
a CUDA graph and replayed (triton.testing.do_bench_cudagraph, median), which is how the decode step runs.

    python bench/kernels.py [--m 1,8,16] [--prefill-m 1024] [--copies 4] [--compile] [--only gemlite,bf16]
        [--json out.json]

Library kernels (quantkit/kernels/libs.py: gemlite) run through the same QuantLinear, i.e. with the checkpoint's
own activation quantization; each case also prints its relative error against the layer's dequantize reference
(QuantLinear._dequant_forward) at M = 16, and the library and version that ran it. --compile wraps each layer's
forward in torch.compile, as the model runs it, so the activation quantization fuses (eager it is 4-5 kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.runtime import QuantLinear, kernel_origin

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096), "gate": (14336, 4096),
          "up": (14336, 4096), "down": (4096, 14336)}  # name: (out, in)
GROUP = 128


def _tensors(fmt: str, n: int, k: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Random tensors in the exported (ModelOpt) layout."""
    if fmt == "fp8":
        w = (torch.randn(n, k, device=dev) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        return {"weight": w, "weight_scale": torch.tensor(2e-4, device=dev),
                "input_scale": torch.tensor(0.01, device=dev)}
    if fmt == "fp8_pt":  # per-channel weights, dynamic per-token activations
        w = (torch.randn(n, k, device=dev) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        return {"weight": w, "weight_scale": torch.rand(n, device=dev) * 1e-3 + 1e-4}
    if fmt in ("int8_sq", "int8_sq_pt", "int8_wo"):
        t = {"weight": torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev),
             "weight_scale": torch.rand(n, device=dev) * 1e-3 + 1e-4}
        if fmt == "int8_sq_pt":
            t["pre_quant_scale"] = torch.rand(k, device=dev) + 0.5
        if fmt == "int8_sq":
            t["input_scale"] = torch.tensor(0.02, device=dev)
            t["pre_quant_scale"] = torch.rand(k, device=dev) + 0.5
        return t
    packed = torch.randint(0, 256, (n // 2, k), dtype=torch.uint8, device=dev)
    return {"weight": packed, "weight_scale": torch.rand(n, k // GROUP, device=dev) * 1e-2 + 1e-3}


def _layers(fmt: str, copies: int, dev: torch.device) -> list[dict[str, torch.nn.Module]]:
    out = []
    for _ in range(copies):
        layer = {}
        for name, (n, k) in SHAPES.items():
            if fmt == "bf16":
                layer[name] = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
            else:
                layer[name] = QuantLinear(fmt, _tensors(fmt, n, k, dev), k, n, torch.bfloat16, dev)
        out.append(layer)
    return out


def _bytes(layer: dict[str, torch.nn.Module]) -> int:
    return sum(m.weight_bytes() if isinstance(m, QuantLinear) else m.weight.numel() * 2 for m in layer.values())


def force(layers, kernel: str | None, compile_: bool) -> None:
    if compile_:  # one compiled graph per shape, reused by the layers' modules (as quantkit.bench sets it)
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               4096)
    for layer in layers:
        for mod in layer.values():
            if isinstance(mod, QuantLinear) and kernel is not None:
                mod.force_kernel(kernel)
            if compile_:
                mod.forward = torch.compile(type(mod).forward.__get__(mod), dynamic=False)


def check(layer, dev) -> float:
    """Worst relative error of the layer's 7 GEMMs against their dequantize reference (M = 16)."""
    worst = 0.0
    for name, (_, k) in SHAPES.items():
        mod = layer[name]
        if not isinstance(mod, QuantLinear):
            return 0.0
        x = torch.randn(16, k, device=dev, dtype=torch.bfloat16)
        ref = mod._dequant_forward(x).float()
        worst = max(worst, ((mod(x).float() - ref).norm() / ref.norm()).item())
    return worst


def time_case(m: int, layers, dev) -> float:
    """Median microseconds for one layer's 7 GEMMs at M = m."""
    import triton.testing

    xs = {name: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for name, (_, k) in SHAPES.items()}

    def run():
        for layer in layers:
            for name, mod in layer.items():
                mod(xs[name])

    run()  # autotune / compile outside the graph
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(run, rep=200, return_mode="median")
    return 1e3 * ms / len(layers)


def timed(label: str, layers, m_list: list[int], dev) -> list[tuple[int, float]]:
    """(M, us per layer) for each M that runs; a failing M is printed and skipped (shared with kernel_libs.py)."""
    out = []
    for m in m_list:
        try:
            out.append((m, time_case(m, layers, dev)))
        except Exception as exc:
            print(f"{label} M={m}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return out


CASES = [  # (label, fmt, kernel)
    ("bf16 cuBLAS", "bf16", None),
    ("fp8 _scaled_mm", "fp8", "torch._scaled_mm"),
    ("fp8 gemlite a8w8 (static act)", "fp8", "gemlite_a8w8"),
    ("int8_sq triton w8a8", "int8_sq", "triton_w8a8"),
    ("int8_sq _int_mm", "int8_sq", "torch._int_mm"),
    ("int8_sq gemlite a8w8 (static)", "int8_sq", "gemlite_a8w8"),
    ("int8_sq_pt triton w8a8", "int8_sq_pt", "triton_w8a8"),
    ("int8_sq_pt gemlite (per-token)", "int8_sq_pt", "gemlite_a8w8"),
    ("int8 triton_dequant+cuBLAS", "int8_sq", "triton_dequant"),
    ("int8_wo triton w8a16", "int8_wo", "triton_w8a16"),
    ("int4 tinygemm", "int4", "tinygemm"),
    ("int4 triton w4a16", "int4", "triton_w4a16"),
    ("int4 gemlite a16w4", "int4", "gemlite_a16w4"),
    ("int4 triton_dequant+cuBLAS", "int4", "triton_dequant"),
]
PREFILL_ONLY = {"triton_dequant"}
PREFILL_TOO = {None, "torch._scaled_mm", "torch._int_mm", "gemlite_a8w8"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,8,16")
    ap.add_argument("--prefill-m", default="1024")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="torch.compile each layer's forward (as in the model)")
    ap.add_argument("--only", default="", help="comma-separated substrings of case labels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    only = [v for v in args.only.split(",") if v]
    dev = torch.device("cuda")
    print(f"card: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}")
    ms = [int(v) for v in args.m.split(",")]
    pms = [int(v) for v in args.prefill_m.split(",") if v]
    results = []
    for label, fmt, kernel in CASES:
        if only and not any(v in label for v in only):
            continue
        origin = kernel_origin(kernel) if kernel else f"torch {torch.__version__}"
        try:
            layers = _layers(fmt, args.copies, dev)
            if kernel == "tinygemm" and not layers[0]["q"].tinygemm_ok:
                print(f"{label}: tinygemm unavailable here")
                continue
            force(layers, kernel, args.compile)
            err = check(layers[0], dev)
        except Exception as exc:
            print(f"{label}: setup failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            continue
        nbytes = _bytes(layers[0])
        print(f"{label} ({origin}): rel err vs dequantize reference {err:.2g}", flush=True)
        m_list = pms if kernel in PREFILL_ONLY else ms + (pms if kernel in PREFILL_TOO else [])
        for m, us in timed(label, layers, m_list, dev):
            row = {"case": label, "library": origin, "m": m, "us_per_layer": us, "weight_gb_s": nbytes / us / 1e3,
                   "rel_err": err}
            results.append(row)
            print(f"{label:24s} M={m:5d}  {us:8.1f} us/layer  {row['weight_gb_s']:7.0f} GB/s of weights")
        del layers
        torch.cuda.empty_cache()
    base = {r["m"]: r["us_per_layer"] for r in results if r["case"] == "bf16 cuBLAS"}
    print(f"\n(compile={args.compile})")
    print("| kernel (library) | rel err | " + " | ".join(f"M={m}" for m in ms + pms) + " |")
    print("|---|---:|" + "---:|" * len(ms + pms))
    for label, _, _ in CASES:
        got = [r for r in results if r["case"] == label]
        if not got:
            continue
        cells = []
        for m in ms + pms:
            r = next((r for r in results if r["case"] == label and r["m"] == m), None)
            cells.append(f"{r['us_per_layer']:.0f} us ({base[m] / r['us_per_layer']:.2f}x)" if r and m in base else "–")
        print(f"| {label} ({got[0]['library']}) | {got[0]['rel_err']:.2g} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": torch.cuda.get_device_name(dev), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
