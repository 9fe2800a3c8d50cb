"""Maintained kernel libraries against quantkit's own kernels, one Llama-3.1-8B decoder layer's GEMMs (GPU only).

Which libraries load on this card's torch, and how fast their GEMMs are at decode (M = 1, 8, 16) and prefill
(M = 1024) for the 7 projections of one layer (bench/kernels.py's SHAPES), each case captured in a CUDA graph
(triton.testing.do_bench_cudagraph, median) with several layers' weights rotating so none is timed out of L2.
Every case is also checked against a bf16 reference of the same weights (relative error printed), so a fast but
wrong kernel shows. Weights are random; each library quantizes them its own way (this measures speed, not the
mapping of ModelOpt's tensors, which quantkit.runtime owns).

    python bench/kernel_libs.py [--m 1,8,16,1024] [--copies 4] [--json out.json]

Candidates (wheels carried in .kw/, bench/gpu_stage.sh): FBGEMM GenAI (fbgemm-gpu-genai: CUTLASS FP8 rowwise,
BF16 x INT4 and FP8 x INT4 preshuffled), gemlite (Triton GEMV/GEMM for A16W4, A8W8 fp8/int8), Liger (Triton
RMSNorm); quantkit's current choices from bench/kernels.py are timed in the same process as the reference.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import SHAPES, _layers, timed  # bench/kernels.py: quantkit's kernels, same shapes and timing

from quantkit.kernels.libs import version

GROUP = 128
Case = Callable[[], None]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def weights(copies: int, dev: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device=dev).manual_seed(0)
    return [{name: torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
             for name, (n, k) in SHAPES.items()} for _ in range(copies)]


# ------------------------------------------------------------------ builders: weights -> per-GEMM callables
def build_bf16(ws):
    return [{n: (lambda x, w=w: F.linear(x, w)) for n, w in layer.items()} for layer in ws]


def build_quantkit(fmt: str, kernel: str):
    def build(ws):
        layers = _layers(fmt, len(ws), ws[0]["q"].device)  # random tensors in the exported layout
        for layer in layers:
            for mod in layer.values():
                mod.kernels = {"decode": kernel, "prefill": kernel}
        return [{n: m for n, m in layer.items()} for layer in layers]
    return build


def build_fbgemm_fp8_rowwise(ws):
    q = torch.ops.fbgemm.quantize_fp8_per_row
    out = []
    for layer in ws:
        d = {}
        for n, w in layer.items():
            wq, wscale = q(w)
            def f(x, wq=wq, wscale=wscale):
                xq, xs = q(x)
                return torch.ops.fbgemm.f8f8bf16_rowwise(xq, wq, xs, wscale, use_fast_accum=True)
            d[n] = f
        out.append(d)
    return out


def build_fbgemm_fp8_tensorwise_static(ws):
    """FP8 with one static activation scale and one weight scale per tensor: ModelOpt's fp8 checkpoint as it is."""
    out = []
    for layer in ws:
        d = {}
        for n, w in layer.items():
            ws_ = w.abs().amax().float() / 448
            wq = (w.float() / ws_).clamp(-448, 448).to(torch.float8_e4m3fn)
            xs = torch.tensor(0.02, device=w.device)
            scale = (xs * ws_).reshape(1)
            def f(x, wq=wq, xs=xs, scale=scale):
                xq = (x / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
                return torch.ops.fbgemm.f8f8bf16(xq, wq, scale)
            d[n] = f
        out.append(d)
    return out


def build_fbgemm_int4(act: str):
    def build(ws):
        # imported when the case runs: without FBGEMM only its cases fail ("setup failed"), not the script
        from fbgemm_gpu.experimental.gen_ai.quantize import quantize_int4_preshuffle

        out = []
        for layer in ws:
            d = {}
            for n, w in layer.items():
                if act == "bf16":
                    wq, (gs, gz) = quantize_int4_preshuffle(w, group_size=GROUP, dtype="bf16")
                    d[n] = lambda x, wq=wq, gs=gs, gz=gz: torch.ops.fbgemm.bf16i4bf16_shuffled(x, wq, gs, gz)
                else:  # W4A8: fp8 activations per row
                    wq, (gs, rs) = quantize_int4_preshuffle(w, group_size=GROUP, dtype="fp8")
                    def f(x, wq=wq, gs=gs, rs=rs):
                        xq, xs = torch.ops.fbgemm.quantize_fp8_per_row(x)
                        return torch.ops.fbgemm.f8i4bf16_shuffled(xq, wq, xs, rs, gs)
                    d[n] = f
            out.append(d)
        return out
    return build


def _gemlite():
    """gemlite as quantkit.runtime loads it (kernels/libs.py: the H100 tuned configs on an H200)."""
    from quantkit.kernels.libs import library

    lib = library("gemlite", torch.device("cuda"))
    if lib.module is None:
        raise RuntimeError(f"gemlite: {lib.reason}")
    return lib.module


def build_gemlite_a16w4(ws):
    gl = _gemlite()
    out = []
    for layer in ws:
        d = {}
        for n, w in layer.items():
            N, K = w.shape
            wg = w.float().reshape(N, K // GROUP, GROUP)
            scale = wg.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 7
            codes = (wg / scale).round().clamp(-8, 7) + 8  # ModelOpt's symmetric int4 as gemlite's (q - zero) * s
            lin = gl.helper.A16Wn(device=w.device, dtype=torch.bfloat16).from_weights(
                codes.reshape(N, K).to(torch.uint8), scale.reshape(N, -1).to(torch.bfloat16),
                torch.full((N, K // GROUP), 8.0, device=w.device, dtype=torch.bfloat16), W_nbits=4,
                group_size=GROUP)
            d[n] = lin
        out.append(d)
    return out


def build_gemlite_a8w8(fp8: bool):
    def build(ws):
        gl = _gemlite()
        proc = gl.helper.A8W8_fp8_dynamic if fp8 else gl.helper.A8W8_int8_dynamic
        out = []
        for layer in ws:
            d = {}
            for n, w in layer.items():
                d[n] = proc(device=w.device, dtype=torch.bfloat16).from_weights(w.clone())
            out.append(d)
        return out
    return build


CASES: list[tuple[str, str, Callable]] = [  # (label, library, builder)
    ("bf16 cuBLAS", "torch", build_bf16),
    ("fp8 quantkit _scaled_mm", "quantkit", build_quantkit("fp8", "torch._scaled_mm")),
    ("fp8 fbgemm f8f8bf16 tensorwise static", "fbgemm-gpu-genai", build_fbgemm_fp8_tensorwise_static),
    ("fp8 fbgemm f8f8bf16_rowwise dynamic", "fbgemm-gpu-genai", build_fbgemm_fp8_rowwise),
    ("fp8 gemlite A8W8 dynamic", "gemlite", build_gemlite_a8w8(True)),
    ("int8 quantkit triton_w8a8", "quantkit", build_quantkit("int8_sq", "triton_w8a8")),
    ("int8 quantkit _int_mm", "quantkit", build_quantkit("int8_sq", "torch._int_mm")),
    ("int8 gemlite A8W8 dynamic", "gemlite", build_gemlite_a8w8(False)),
    ("int4 quantkit tinygemm", "quantkit", build_quantkit("int4", "tinygemm")),
    ("int4 quantkit triton_w4a16", "quantkit", build_quantkit("int4", "triton_w4a16")),
    ("int4 fbgemm bf16i4bf16_shuffled", "fbgemm-gpu-genai", build_fbgemm_int4("bf16")),
    ("int4 gemlite A16W4", "gemlite", build_gemlite_a16w4),
    ("w4a8 fbgemm f8i4bf16_shuffled", "fbgemm-gpu-genai", build_fbgemm_int4("fp8")),
]


def check(layer, w_layer, dev) -> float:
    """Worst relative error over the 7 GEMMs against bf16 F.linear of the same weights (M = 16)."""
    worst = 0.0
    for name, (_, k) in SHAPES.items():
        x = torch.randn(16, k, device=dev, dtype=torch.bfloat16)
        worst = max(worst, rel_err(layer[name](x), F.linear(x, w_layer[name])))
    return worst


def rmsnorm_cases(dev) -> list[dict]:
    """Non-GEMM: RMSNorm at decode (M = 1, 8; hidden 4096), torch eager / compiled vs Liger's Triton kernel."""
    import triton.testing
    rows = []
    w = torch.ones(4096, device=dev, dtype=torch.bfloat16)

    def torch_rms(x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(v + 1e-5)).to(x.dtype) * w
    impls = {"torch eager": torch_rms, "torch.compile": torch.compile(torch_rms)}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        impls["liger"] = lambda x: LigerRMSNormFunction.apply(x, w, 1e-5)
    except Exception as exc:
        print(f"liger rmsnorm unavailable: {type(exc).__name__}: {exc}")
    for m in (1, 8):
        x = torch.randn(m, 4096, device=dev, dtype=torch.bfloat16)
        ref = torch_rms(x)
        for name, f in impls.items():
            try:
                err = rel_err(f(x), ref)
                us = 1e3 * triton.testing.do_bench_cudagraph(lambda f=f, x=x: f(x), rep=50, return_mode="median")
                rows.append({"case": f"rmsnorm {name}", "m": m, "us": us, "rel_err": err})
                print(f"rmsnorm {name:14s} M={m}: {us:6.1f} us  rel err {err:.2e}")
            except Exception as exc:
                print(f"rmsnorm {name} M={m}: failed: {type(exc).__name__}: {str(exc)[:160]}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,8,16,1024")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated substrings of case labels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    libs = {p: version(p) or "-" for p in ("torch", "triton", "fbgemm-gpu-genai", "gemlite", "liger-kernel", "torchao")}
    print(f"card: {torch.cuda.get_device_name(dev)}; " + ", ".join(f"{k} {v}" for k, v in libs.items()))
    for mod in ("fbgemm_gpu.experimental.gen_ai", "gemlite", "liger_kernel", "torchao"):
        try:
            importlib.import_module(mod)
            print(f"import {mod}: ok")
        except Exception as exc:
            print(f"import {mod}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    ms = [int(v) for v in args.m.split(",")]
    ws = weights(args.copies, dev)
    rows: list[dict] = []
    only = [s for s in args.only.split(",") if s]
    for label, lib, build in CASES:
        if only and not any(s in label for s in only):
            continue
        try:
            layers = build(ws)
            err = check(layers[0], ws[0], dev) if lib != "quantkit" else float("nan")
        except Exception as exc:
            print(f"{label}: setup failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            continue
        for m, us in timed(label, layers, ms, dev):
            rows.append({"case": label, "library": lib, "version": libs.get(lib, "-"), "m": m, "us": us,
                         "rel_err": err})
            print(f"{label:40s} M={m:5d} {us:8.1f} us/layer  rel err {err:.3g}", flush=True)
        del layers
        torch.cuda.empty_cache()
    rows += rmsnorm_cases(dev)
    base = {r["m"]: r["us"] for r in rows if r["case"] == "bf16 cuBLAS"}
    print("\n| kernel (library version) | rel err | " + " | ".join(f"M={m}" for m in ms) + " |")
    print("|---|---:|" + "---:|" * len(ms))
    for label, lib, _ in CASES:
        got = [r for r in rows if r["case"] == label]
        if not got:
            continue
        cells = []
        for m in ms:
            r = next((r for r in got if r["m"] == m), None)
            cells.append(f"{r['us']:.0f} us ({base[m] / r['us']:.2f}x)" if r and m in base else "–")
        print(f"| {label} ({lib} {libs.get(lib, '')}) | {got[0]['rel_err']:.3g} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": torch.cuda.get_device_name(dev), "libs": libs,
                                               "rows": rows}, indent=1))
    os.sys.stdout.flush()


if __name__ == "__main__":
    main()
