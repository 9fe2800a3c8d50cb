"""Run an HF unified (ModelOpt-format) checkpoint written by quantkit with real low-precision arithmetic.

`load_quantized(hf_dir)` builds the transformers model from `config.json` alone (no ModelOpt needed at run time)
and replaces each quantized `nn.Linear` with a module that computes on the stored quantized weights.

What the checkpoint holds and what it means (read from ModelOpt 0.47's exporter, `export/unified_export_hf.py`,
`export/quant_utils.py`, and its fake quantizer `quantization/tensor_quant.py`, which is the reference we must
reproduce):
- FP8 (`F8_E4M3` weight): w = w8 * weight_scale (scalar, amax/448); activations are quantized statically:
  x8 = e4m3(clamp(x / input_scale, -448, 448)), input_scale = amax/448.
- INT8 SmoothQuant (`I8` weight + `input_scale`): w = w8 * weight_scale[out] (per channel, amax/127); x is first
  multiplied by `pre_quant_scale` (where the exporter did not fold it into the previous norm), then quantized
  statically per tensor: q = clamp(round_half_even(x / input_scale), -128, 127), input_scale = amax/127 (ModelOpt's
  integer quantizer is not narrow-range).
- INT8 SmoothQuant with dynamic per-token activations (format `int8_sq_pt`; quantkit labels it
  `W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN`): as above but no `input_scale`; each token (row) is quantized with
  scale = amax(row)/127 at run time. Only the label tells it from INT8 weight-only, which also has no input_scale.
- FP8 per-channel / per-token (format `fp8_pt`, method fp8_pcpt): `weight_scale` [out], no `input_scale`; each
  token is quantized with scale = amax(row)/448 at run time.
- INT8 weight-only (`I8` weight, no `input_scale`): w = w8 * weight_scale[out].
- INT4 AWQ / RTN (`U8` weight [out/2, in]): two *output rows* per byte, row 2j in the low nibble, row 2j+1 in the
  high nibble, signed two's complement in [-8, 7]; w = q * weight_scale[out, in/group] (amax/7, symmetric, no zero
  point); x * pre_quant_scale first where present (AWQ folds the q/k/v and gate/up scales into the norms).
- W4A8 AWQ: as INT4, then the dequantized weight goes through FP8 with `weight_scale_2` (amax/448), and the
  activations through FP8 with `input_scale` (ModelOpt's SequentialQuantizer: int4 block, then fp8 per tensor).
- FP8 KV cache: `k_proj.k_scale` / `v_proj.v_scale` (amax/448). Applied as FP8 fake quantization of K and V at the
  attention call (`gqa_sdpa_attention`), exactly where ModelOpt's fake-quantized model applies it: the numerics of
  an FP8 KV cache, not its memory saving (the static cache still stores bf16).

Kernels (`model.quantkit_kernels` records the plan of every layer; env overrides for benchmarking:
QUANTKIT_INT4_DECODE=measured|tinygemm|triton|dequant, QUANTKIT_INT8_DECODE=triton|int_mm|dequant,
QUANTKIT_INT8_PREFILL=int_mm|dequant). Chosen by measurement (bench/kernels.py, H200, one decoder layer of
Llama-3.1-8B = its 7 GEMMs, CUDA-graph replay, activation quantization included and run eagerly; bf16 cuBLAS
134 us at M=1, 680 us at M=1024; bench/RESULTS.md has the table):
- fp8: torch._scaled_mm 166 us at M=1 (0.81x; ~90 us of it is the activation quantization, 4-5 small kernels per
  projection that torch.compile fuses in the model), 1.01x at M=1024.
- int8_sq: torch._int_mm 304 us at M=1..16 (0.44x: unusable for decode, as DESIGN.md found) and 1492 us at M=1024
  (0.46x); quantkit's Triton W8A8 168 us at M=1 with the eager quantization (W8A16, same kernel without it: 104
  us, 1.29x). In the whole model (compiled, fused q/k/v): 1.33x of bf16 at batch 1. Prefill: _int_mm (1492 us)
  beat dequantize-then-cuBLAS (1595 us).
- int4: tinygemm 79 us at M=1 (1.70x), 163 us at M=8 (0.86x), 268 us at M=16; quantkit's Triton W4A16 (rewritten
  for the tensor cores 2026-12-04, bench/w4a16_tune.py on the 8B shapes: 80 us per layer at M = 8 against
  tinygemm's 154 and gemlite's 123, 78 us at M = 1 against tinygemm's 68) takes M = 2..16; the plan per shape and
  regime follows kernels/w4a16_configs.json (`int4_decode_plan`; a table row may pick its M = 1 GEMV, not yet
  measured on a GPU, so the shipped table has none); prefill: one-pass Triton dequantization + cuBLAS 920 us
  (0.74x), torch ops 5.1 ms.
| format      | CUDA, M <= 16 (decode)                           | CUDA, M > 16 (prefill)                 | CPU     |
|-------------|--------------------------------------------------|----------------------------------------|---------|
| fp8, fp8_pt | torch._scaled_mm (sm89+; M padded to 16; row-wise | torch._scaled_mm                       | dequant |
|             | scales for per-token / per-channel / fused)      |                                        |         |
| int8_sq(_pt)| quantkit Triton W8A8 (int8 tensor cores)         | torch._int_mm (cuBLASLt)               | dequant |
| int8_wo     | quantkit Triton W8A16                            | triton_dequant + cuBLAS                | dequant |
| int4 (W4A16)| M = 1 tinygemm, M = 2..16 quantkit Triton W4A16   | triton_dequant + cuBLAS                | dequant |
| w4a8_awq    | dequant (emulation; no W4A8 kernel in PyTorch)   | dequant                                | dequant |
Maintained libraries take over where they measured faster (kernels/libs.py has the H200 table and `CHOICES`;
gemlite 0.6.0.post2 today): int8_sq(_pt) at every M and fp8, fp8_pt at decode (M <= 16) on gemlite's A8W8
GEMV/GEMM (79-116 us at M <= 16, 512 us at M = 1024, with quantkit's own activation quantization, i.e. the
checkpoint's static or per-token scales; fp8 prefill stays on _scaled_mm, faster in the whole model), int4
at M = 2..16 on gemlite's A16W4 only where quantkit's W4A16 has no tuned win (tinygemm stays at M = 1).
fp8 and int8_sq with static activation scales run M = 1 on quantkit's split-K 8-bit GEMV on the shapes where
bench/w8_tune.py measured it faster than gemlite (o_proj and down_proj for fp8 on Llama-3.1-8B: 3.10 against
3.44 ms per step). Each is self-checked at load on each layer's own tensors against the dequantize path
(`library_kernel_ok`) and recorded with its version under "library" in `model.quantkit_kernels`; an absent or
failing library leaves the table above
in force, with the reason logged; QUANTKIT_KERNEL_LIBS=none turns them off.
"dequant" = the clearly labelled reference path: the stored quantized weight is dequantized *per call* with torch
ops (the model's memory stays quantized) and multiplied with F.linear in the model dtype, activations
fake-quantized exactly as ModelOpt does. "triton_dequant" is the same arithmetic with the weight dequantized in one
Triton pass (quantkit::dequant_int8/int4). Every Triton kernel and tinygemm is self-checked once per device
against the torch reference before a plan uses it; a kernel that fails falls back to the next choice.
`fuse_projections` (used by the bench) runs q/k/v and gate/up as one GEMM each.

Attention (`gqa_sdpa_attention`, installed by `use_quantkit_attention`): a decode step (one query token, boolean
mask) on CUDA runs quantkit's split-cache Triton kernel (kernels/triton_attention.py: 0.70 ms of a 5.51 ms bf16
Llama-3.1-8B step saved on an H200 against SDPA); prefill, CPU and what that kernel does not take run SDPA with
the query heads of a group folded into the query axis (no repeat_kv copies). QUANTKIT_DECODE_ATTENTION=sdpa|triton
overrides.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels import libs, triton_attention, triton_gemm

log = logging.getLogger(__name__)

FP8_MAX = 448.0
DECODE_MAX_M = triton_gemm.MAX_M

_QUANT_WEIGHT_DTYPES = {torch.float8_e4m3fn, torch.int8, torch.uint8}


# ----------------------------------------------------------------------------- numerics shared by all paths


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 quantize-dequantize with a per-tensor scale (ModelOpt's `_fp8_eager`), result in x's dtype."""
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """INT8 with a given scale (per tensor, or [M, 1] per token): clamp(round_half_even(x / scale), -128, 127)
    (ModelOpt's integer quantizer is not narrow-range)."""
    return torch.round(x.float() / scale).clamp_(-128, 127).to(torch.int8)


def per_token_scale(x: torch.Tensor, maxbound: float) -> torch.Tensor:
    """Dynamic per-token scale [M, 1] = amax over the row / maxbound, as ModelOpt's dynamic quantizer computes it
    (an all-zero row gets scale 1: it quantizes to zeros either way)."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 2.0**-24, amax, torch.ones_like(amax)) / maxbound


def unpack_modelopt_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's int4 layout uint8 [out/2, in] (row 2j low nibble, 2j+1 high) -> int8 [out, in] in [-8, 7]."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    q = torch.stack([lo, hi], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


# ----------------------------------------------------------------------------- tinygemm (aten._weight_int4pack_mm)

_TINYGEMM_OK: dict[str, bool] = {}


def _tinygemm_pack(q: torch.Tensor, scales: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Signed int4 [N, K] + symmetric fp32 scales [N, K/group] -> tinygemm's packed weight and scales_and_zeros.

    tinygemm dequantizes w = (u - 8) * scale + zero with u in [0, 15] (asymmetric, float zero point). Our symmetric
    w = q * scale maps exactly onto it with u = q + 8 and zero = 0. Its uint8 input holds k = 2j in the high nibble.
    """
    k = q.shape[1]
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    u = (q.to(torch.int32) + 8).to(torch.int32)
    u8 = ((u[:, 0::2] << 4) | u[:, 1::2]).to(torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), inner_k_tiles)
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz, inner_k_tiles


def tinygemm_supported(n: int, k: int, group: int, device: torch.device) -> bool:
    if device.type != "cuda" or n % 8 or k % 32 or group not in (32, 64, 128, 256):
        return False
    key = str(device)
    if key not in _TINYGEMM_OK:  # one self-check per device: layout conventions of a private op can change
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            q = torch.randint(-8, 8, (64, 256), generator=g, dtype=torch.int8)
            s = torch.rand(64, 256 // 64, generator=g) * 0.1 + 0.01
            x = torch.randn(1, 256, generator=g)
            ref = x @ (q.float() * s.repeat_interleave(64, dim=1)).t()
            packed, sz, _ = _tinygemm_pack(q.to(device), s.to(device), 64)
            out = torch.ops.aten._weight_int4pack_mm(x.to(device, torch.bfloat16), packed, 64, sz).float().cpu()
            err = ((out - ref).norm() / ref.norm()).item()
            _TINYGEMM_OK[key] = err < 2e-2
            if err >= 2e-2:
                log.warning("tinygemm self-check failed (rel err %.3g): int4 decode uses the Triton kernel", err)
        except (RuntimeError, NotImplementedError) as exc:
            log.warning("tinygemm unavailable (%s): int4 decode uses the Triton kernel", exc)
            _TINYGEMM_OK[key] = False
    return _TINYGEMM_OK[key]


# ----------------------------------------------------------------------------- self-checks of our Triton kernels

_KERNEL_OK: dict[tuple[str, str], bool] = {}


def kernel_ok(name: str, device: torch.device) -> bool:
    """Run kernel `name` once on small random data against the torch reference (cached per device)."""
    device = torch.device(device)
    if not triton_gemm.available(device):
        return False
    key = (name, str(device))
    if key in _KERNEL_OK:
        return _KERNEL_OK[key]
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter mishandles bf16
    g = torch.Generator().manual_seed(0)
    n, k, m, group = 64, 256, 3, 64
    w8 = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    q4 = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(n, generator=g) * 1e-2 + 1e-3
    gs = torch.rand(n, k // group, generator=g) * 1e-1 + 1e-2
    x = torch.randn(m, k, generator=g)
    s = torch.tensor(0.02)
    pqs = torch.rand(k, generator=g) + 0.5
    d = {t: v.to(device) for t, v in dict(w8=w8, q4=triton_gemm.pack_int4_k(q4), ws=ws, gs=gs, s=s).items()}
    try:
        if name == "triton_w8a8":  # static scale, then per-token scales
            xq = quantize_int8(x, s)
            got = triton_gemm.w8_gemm(xq.to(device), d["w8"], d["ws"], d["s"], dt)
            ref = (xq.float() @ w8.float().t()) * s * ws
            st = per_token_scale(x, 127.0)
            xt = quantize_int8(x, st)
            got = torch.cat([got, triton_gemm.w8_gemm(xt.to(device), d["w8"], d["ws"], st.reshape(-1).to(device), dt)])
            ref = torch.cat([ref, (xt.float() @ w8.float().t()) * st * ws])
        elif name == "triton_w8_gemv":  # both weight kinds, both paths, split along K
            f8 = (w8.float() * 3).to(torch.float8_e4m3fn)
            xi, xf = quantize_int8(x[:1], s), (x[:1] * 100).to(torch.float8_e4m3fn)
            got = torch.cat([triton_gemm.launch_w8_gemv(xv.to(device), wv.to(device), cfg).sum(0, keepdim=True)
                             for xv, wv in ((xi, w8), (xf, f8))
                             for cfg in (triton_gemm.W8Config(2, False, 16, 64, 4, 2),
                                         triton_gemm.W8Config(2, True, 16, 64, 4, 2))])
            ref = torch.cat([xv.float() @ wv.float().t() for xv, wv in ((xi, w8), (xf, f8)) for _ in range(2)])
        elif name == "triton_w8a16":
            got = triton_gemm.w8_gemm(x.to(device, dt), d["w8"], d["ws"])
            ref = x.to(dt).float() @ (w8.float() * ws[:, None]).t()
        elif name == "triton_w4a16":  # M = 1 (both kernels) and M = 3, groups smaller than a 128-k block and as large
            xs = (x.to(dt) * pqs.to(dt)).to(device)
            w4 = triton_gemm.pack_int4_w4(q4).to(device)
            gemv = triton_gemm.W4Config(2, 16, 4, 2, gemv=True, step_blocks=1)
            got, ref = [], []
            for grp, gsc in ((group, gs), (k, gs[:, :1].contiguous())):
                st = gsc.t().contiguous().to(device)
                got += [triton_gemm.w4_gemm(xs[:1], w4, st, grp), triton_gemm.w4_gemm(xs, w4, st, grp),
                        triton_gemm.launch_w4(xs[:1], w4, st, grp, gemv).sum(0).to(dt)]
                r = xs.float().cpu() @ (q4.float() * gsc.repeat_interleave(grp, 1)).t()
                ref += [r[:1], r, r[:1]]
            got, ref = torch.cat(got), torch.cat(ref)
        elif name == "triton_dequant8":
            got = triton_gemm.dequant_int8(d["w8"], d["ws"], dt)
            ref = w8.float() * ws[:, None]
        elif name == "triton_dequant4":
            got = triton_gemm.dequant_int4(d["q4"], d["gs"], group, dt)
            ref = q4.float() * gs.repeat_interleave(group, 1)
        else:
            raise KeyError(name)
        err = ((got.float().cpu() - ref).norm() / ref.norm()).item()
        ok = err < 1e-2
        if not ok:
            log.warning("kernel %s failed its self-check on %s (rel err %.3g): not used", name, device, err)
    except Exception as exc:  # a kernel that cannot compile or run here is simply not used
        log.warning("kernel %s unavailable on %s (%s: %s)", name, device, type(exc).__name__, exc)
        ok = False
    _KERNEL_OK[key] = ok
    return ok


def fp8_rowwise_ok(device: torch.device) -> bool:
    """Whether torch._scaled_mm does row-wise scaling here (cached self-check against the dequantized product)."""
    device = torch.device(device)
    key = ("fp8_rowwise", str(device))
    if key not in _KERNEL_OK:
        try:
            g = torch.Generator().manual_seed(0)
            w = (torch.randn(64, 128, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
            ws = torch.rand(64, generator=g) * 1e-3 + 1e-4
            x = (torch.randn(16, 128, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
            ref = (x.float() * 0.01) @ (w.float() * ws[:, None]).t()
            got = torch._scaled_mm(x.to(device), w.to(device).t(), scale_a=torch.full((16, 1), 0.01, device=device),
                                   scale_b=ws.to(device).reshape(1, -1), out_dtype=torch.bfloat16,
                                   use_fast_accum=True)
            _KERNEL_OK[key] = ((got.float().cpu() - ref).norm() / ref.norm()).item() < 1e-2
        except Exception as exc:  # not supported on this GPU / build: fused fp8 q/k/v then stay unfused
            log.warning("fp8 row-wise _scaled_mm unavailable (%s)", exc)
            _KERNEL_OK[key] = False
    return _KERNEL_OK[key]


# M per regime at which the self-check runs a library kernel: each gemlite kernel type the regime reaches (8-bit:
# GEMV M <= 2, split-K GEMM M < 64, GEMM; int4: GEMV M <= 4, split-K GEMM), at the M the bench runs (batch 1 and 8,
# prefill 1024) so the check autotunes nothing extra; decode starts at M = 2 where "m1" has its own kernel
_LIB_CHECK_M = {"m1": (1,), "decode": (1, 8), "prefill": (1024,)}


def _library_check_ms(plan: dict[str, str], kernel: str) -> list[int]:
    ms: set[int] = set()
    for regime in REGIMES:
        if plan.get(regime) == kernel:
            ms.update((2, 8) if regime == "decode" and "m1" in plan else _LIB_CHECK_M[regime])
    return sorted(ms)

_LIB_FAIL_LOGGED: set[tuple[str, str, tuple[int, int]]] = set()


def library_usable(kernel: str, device: torch.device) -> bool:
    """Whether the library of `kernel` is installed and loads here (an absent one is skipped, reason logged)."""
    return libs.library(libs.kernel_library(kernel), device).reason is None


def library_kernel_ok(layer: QuantLinear, kernel: str) -> bool:
    """Self-check of an attached library kernel on this layer's own tensors: its output must reproduce quantkit's
    torch reference of the checkpoint's arithmetic (`QuantLinear._dequant_forward`) at every M it runs (each
    gemlite kernel type: GEMV, split-K GEMM, GEMM), within 1e-2 relative (bf16 rounding of the dequantized
    activations and weights in the reference; a wrong layout or scale is off by O(1)). The M values follow the
    regimes `layer.kernels` gives the kernel."""
    dev = layer.weight.device
    lib = libs.library(libs.kernel_library(kernel), dev)
    g = torch.Generator(device=dev).manual_seed(1)
    worst = 0.0
    try:
        for m in _library_check_ms(layer.kernels, kernel):
            x = torch.randn(m, layer.in_features, generator=g, device=dev).to(layer.compute_dtype)
            ref = layer._dequant_forward(x).float()
            got = layer._library_forward(x).float()
            worst = max(worst, ((got - ref).norm() / ref.norm()).item())
        ok = worst < 1e-2
        why = f"rel err {worst:.3g}"
    except Exception as exc:  # a library kernel that cannot run this layer is not used, and says why
        ok, why = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    key = (kernel, layer.fmt, (layer.out_features, layer.in_features))
    if not ok and key not in _LIB_FAIL_LOGGED:
        _LIB_FAIL_LOGGED.add(key)
        log.warning("%s (%s) failed its self-check for %s %dx%d on %s (%s): quantkit's kernels run it", kernel,
                    lib.label, layer.fmt, layer.out_features, layer.in_features, dev, why)
    return ok


def kernel_origin(kernel: str) -> str:
    """Which library (and version) a kernel name comes from."""
    name = libs.kernel_library(kernel)
    if name is not None:
        return f"{name} {libs.version(name)}"
    if kernel.startswith("torch.") or kernel == "tinygemm":
        return f"torch {torch.__version__}"
    return "quantkit"


REGIMES = ("m1", "decode", "prefill")  # M = 1 (only where it differs from decode), M <= 16, M > 16


def int4_decode_plan(triton_kernel: str | None, tinygemm: str | None, n: int, k: int, fallback: str) -> dict[str, str]:
    """int4 decode kernels per regime (m1: M = 1, decode: M = 2..16) for an n x k layer: quantkit's Triton W4A16
    where bench/w4a16_tune.py measured it faster than tinygemm on this shape (kernels/w4a16_configs.json), tinygemm
    elsewhere; whichever of the two is available (None: not here), else `fallback`. "m1" only where it differs."""
    plan = {}
    for regime, m in (("m1", 1), ("decode", 8)):
        faster = triton_gemm.w4_beats_tinygemm(m, n, k)
        order = [triton_kernel, tinygemm] if faster or tinygemm is None else [tinygemm, triton_kernel]
        plan[regime] = next((c for c in order if c), fallback)
    if plan["m1"] == plan["decode"]:
        plan.pop("m1")
    return plan


# ----------------------------------------------------------------------------- the quantized linear module


# int4 decode kernels that read a layout of their own: its buffers (QuantLinear._build_layouts)
_KERNEL_LAYOUTS = {"tinygemm": ("tinygemm_weight", "tinygemm_scales_zeros"),
                   "triton_w4a16": ("w4_weight", "w4_scale_t")}
_DECODE_LAYOUTS = [name for names in _KERNEL_LAYOUTS.values() for name in names]


class QuantLinear(nn.Module):
    """A linear layer that computes on an exported quantized weight (see the module docstring for the formats)."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device, *, k_packed: bool = False) -> None:
        """`tensors` as the checkpoint stores them (int4: ModelOpt's row-packed layout), or, with k_packed=True,
        int4 weights already in quantkit's K-packed layout (used when fusing layers)."""
        super().__init__()
        self.fmt = fmt
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = dtype
        dev = torch.device(device)

        def buf(name: str, t: torch.Tensor | None, to_dtype: torch.dtype | None = None) -> None:
            self.register_buffer(name, None if t is None else t.to(device=dev, dtype=to_dtype or t.dtype))

        buf("weight_scale", tensors["weight_scale"], torch.float32)
        buf("input_scale", tensors.get("input_scale"), torch.float32)
        pqs = tensors.get("pre_quant_scale")
        # pre_quant_scale is multiplied in the model dtype, as the fake-quantized model does
        buf("pre_quant_scale", pqs, dtype)
        buf("weight_scale_2", tensors.get("weight_scale_2"), torch.float32)
        bias = tensors.get("bias")
        buf("bias", bias, dtype)
        w = tensors["weight"].to(dev)  # unpack / repack on the target device (fast on a GPU)
        self.group_size = 0
        self.tinygemm_inner_k_tiles = 0
        self.tinygemm_ok = False
        # fp8 with one weight scale per output row: per-channel checkpoints, and fused parts of per-tensor ones
        self.rowwise = fmt in ("fp8", "fp8_pt") and self.weight_scale.numel() > 1
        if fmt in ("int4", "w4a8"):
            q = triton_gemm.unpack_int4_k(w) if k_packed else unpack_modelopt_int4(w)
            self.group_size = in_features // self.weight_scale.shape[1]
            # K-packed layout: read by the dequant path (prefill, reference) and by fusing
            buf("weight", triton_gemm.pack_int4_k(q))
            # tinygemm takes bf16 activations only (its CUDA kernel checks A.dtype() == kBFloat16): float16 and
            # float32 models run quantkit's int4 kernels
            self.tinygemm_ok = fmt == "int4" and dtype == torch.bfloat16 and tinygemm_supported(
                out_features, in_features, self.group_size, dev)
        else:
            buf("weight", w.contiguous())
        for name in _DECODE_LAYOUTS:
            self.register_buffer(name, None)
        self._lib: libs.GemliteLayer | None = None  # a library kernel's layout; its tensors are buffers lib_arg*
        self.kernels = self._plan(dev)
        self._plan_libraries(dev)
        self._build_layouts()

    def _build_layouts(self) -> None:
        """The int4 decode kernels' own copies of the weights, for the kernels the plan runs and no others (each
        is another 0.5 byte per weight of GPU memory)."""
        if self.fmt != "int4":
            return
        used = set(self.kernels.values())
        q = None
        for kernel, names in _KERNEL_LAYOUTS.items():
            if kernel not in used:
                for name in names:
                    setattr(self, name, None)
                continue
            if getattr(self, names[0]) is not None:
                continue
            q = triton_gemm.unpack_int4_k(self.weight) if q is None else q
            if kernel == "tinygemm":
                self.tinygemm_weight, self.tinygemm_scales_zeros, self.tinygemm_inner_k_tiles = _tinygemm_pack(
                    q, self.weight_scale, self.group_size)
            else:
                self.w4_weight = triton_gemm.pack_int4_w4(q)
                self.w4_scale_t = self.weight_scale.t().contiguous()

    # -- which kernel runs where (recorded on the model as quantkit_kernels)
    def _plan(self, dev: torch.device) -> dict[str, str]:
        cuda = dev.type == "cuda"
        env = os.environ.get
        if self.fmt in ("fp8", "fp8_pt"):
            rowwise = self.rowwise or self.fmt == "fp8_pt"  # per-token activations need row-wise scaling too
            ok = cuda and _cuda_capability(dev) >= (8, 9) and (not rowwise or fp8_rowwise_ok(dev))
            k = "torch._scaled_mm" if ok else "dequant"
            return {**self._w8_gemv_plan(dev), "decode": k, "prefill": k}
        w8 = "triton_dequant" if kernel_ok("triton_dequant8", dev) else "dequant"
        if self.fmt in ("int8_sq", "int8_sq_pt"):
            choice = env("QUANTKIT_INT8_DECODE", "triton")
            decode = {"triton": "triton_w8a8" if kernel_ok("triton_w8a8", dev) else "dequant",
                      "int_mm": "torch._int_mm", "dequant": "dequant"}[choice]
            # measured at M=1024 (H200): _int_mm 1492 us/layer, dequantize + cuBLAS 1595 us (see the docstring)
            prefill = w8 if not cuda or env("QUANTKIT_INT8_PREFILL", "int_mm") == "dequant" else "torch._int_mm"
            return {**self._w8_gemv_plan(dev), "decode": decode, "prefill": prefill}
        if self.fmt == "int8_wo":
            ok = env("QUANTKIT_INT8_DECODE", "triton") == "triton" and kernel_ok("triton_w8a16", dev)
            return {"decode": "triton_w8a16" if ok else w8, "prefill": w8}
        if self.fmt == "int4":
            w4 = "triton_dequant" if kernel_ok("triton_dequant4", dev) else "dequant"
            tiny = "tinygemm" if self.tinygemm_ok else None
            tri = "triton_w4a16" if triton_gemm.w4_supported(self.in_features, self.group_size) and kernel_ok(
                "triton_w4a16", dev) else None
            choice = env("QUANTKIT_INT4_DECODE", "measured")
            if choice != "measured":
                order = {"tinygemm": [tiny, tri], "triton": [tri, tiny], "dequant": []}[choice]
                return {"decode": next((c for c in order if c), w4), "prefill": w4}
            return {**int4_decode_plan(tri, tiny, self.out_features, self.in_features, w4), "prefill": w4}
        return {"decode": "dequant", "prefill": "dequant"}  # w4a8: emulation only

    def _w8_gemv_plan(self, dev: torch.device) -> dict[str, str]:
        """M = 1 of an 8-bit layer on quantkit's split-K GEMV where bench/w8_tune.py measured it faster than
        gemlite's A8W8 GEMV on this shape (kernels/w8_gemv_configs.json); libs.CHOICES then keeps it first.

        Static activation scales only: with per-token ones the next layer's amax has to sum the split-K partials
        inside its row reduction, and int8_sq per-token ran slower in the whole 8B model (H200, 3.80 ms per step
        against 3.50 ms on gemlite alone), though each GEMV is faster by itself; fp8 static gained (3.10 vs 3.44)."""
        ok = (self.input_scale is not None and triton_gemm.w8_gemv_supported(self.in_features)
              and triton_gemm.w8_gemv_beats_gemlite(triton_gemm.w8_weight_kind(self.weight), self.out_features,
                                                    self.in_features)
              and kernel_ok("triton_w8_gemv", dev))
        return {"m1": "triton_w8_gemv"} if ok else {}

    def _plan_libraries(self, dev: torch.device) -> None:
        """Per regime, the first kernel of libs.CHOICES that is usable here: a library kernel whose library loads
        and that passes its self-check on this layer, or the kernel quantkit's own plan picked (listed where it
        won the measurement, e.g. tinygemm at M = 1). Otherwise quantkit's plan stays, and the log says why."""
        plan = libs.choose(self.fmt, self.kernels, lambda c: library_usable(c, dev),
                           self.out_features * self.in_features)
        chosen = sorted({k for k in plan.values() if libs.kernel_library(k) is not None})
        if not chosen:
            return
        try:
            for kernel in chosen:  # one library layout per layer (CHOICES never mixes two)
                self.attach_library(kernel)
        except Exception as exc:
            log.warning("layer %dx%d (%s) stays on quantkit's kernels: %s does not take it (%s: %s)",
                        self.out_features, self.in_features, self.fmt, chosen, type(exc).__name__, exc)
            self._set_library(None)
            return
        own, self.kernels = self.kernels, plan  # the self-check reads which regimes each kernel takes
        if not all(library_kernel_ok(self, k) for k in chosen):
            self.kernels = own
            self._set_library(None)
            return
        plan["library"] = ", ".join(libs.library(libs.kernel_library(k), dev).label for k in chosen)
        self.kernels = plan

    def attach_library(self, kernel: str) -> None:
        """Build `kernel`'s layout of this layer's weights (from the buffers; 8-bit: a view, no copy)."""
        lib = libs.library(libs.kernel_library(kernel), self.weight.device)
        if lib.module is None:
            raise RuntimeError(f"{kernel}: {lib.reason}")
        if kernel == "gemlite_a8w8":
            scales = libs.a8w8_channel_scales(self.weight_scale, self.input_scale, self.out_features)
            out = self.compute_dtype if self.input_scale is not None else torch.float32  # per token: scaled after
            self._set_library(libs.build_a8w8(lib.module, self.weight, scales, out))
        elif kernel == "gemlite_a16w4":
            q = triton_gemm.unpack_int4_k(self.weight)
            self._set_library(libs.build_a16w4(lib.module, q, self.weight_scale, self.group_size, self.compute_dtype))
        else:
            raise KeyError(kernel)

    def _set_library(self, layer: libs.GemliteLayer | None) -> None:
        """The library's tensors become (non-persistent) buffers, so torch.compile treats them like the other
        buffers: graph inputs, one compiled graph for every layer of a shape (not one per layer)."""
        old = self._lib
        for i in range(len(old.tensors) if old is not None else 0):
            delattr(self, f"lib_arg{i}")
        self._lib = layer
        for i, t in enumerate(layer.tensors if layer is not None else ()):
            self.register_buffer(f"lib_arg{i}", t.detach(), persistent=False)

    def force_kernel(self, kernel: str) -> None:
        """Run every M on `kernel` (benchmarks; no self-check)."""
        if libs.kernel_library(kernel) is not None:
            self.attach_library(kernel)
        self.kernels = {"decode": kernel, "prefill": kernel}
        self._build_layouts()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"group_size={self.group_size}, kernels={self.kernels}")

    # -- the reference (dequantize) path
    def dequantize_weight(self, fast: bool = False) -> torch.Tensor:
        """The effective weight [out, in] in the model dtype, exactly as the fake-quantized model sees it.

        fast: dequantize in one Triton pass (same arithmetic: w * scale in fp32, rounded once)."""
        if fast and self.fmt in ("int8_sq", "int8_sq_pt", "int8_wo"):
            return triton_gemm.dequant_int8(self.weight, self.weight_scale, self.compute_dtype)
        if fast and self.fmt == "int4":
            return triton_gemm.dequant_int4(self.weight, self.weight_scale, self.group_size, self.compute_dtype)
        if self.fmt in ("fp8", "fp8_pt"):
            w = self.weight.float() * (self.weight_scale[:, None] if self.rowwise else self.weight_scale)
        elif self.fmt in ("int8_sq", "int8_sq_pt", "int8_wo"):
            w = self.weight.float() * self.weight_scale[:, None]
        else:
            q = triton_gemm.unpack_int4_k(self.weight)
            w = q.float() * self.weight_scale.repeat_interleave(self.group_size, dim=1)
            if self.fmt == "w4a8":
                w = fake_fp8(w, self.weight_scale_2)
        return w.to(self.compute_dtype)

    def _act_scale(self, x: torch.Tensor, maxbound: float) -> torch.Tensor:
        """The activation scale: the checkpoint's static one, or per token ([M, 1]) when it has none."""
        return self.input_scale if self.input_scale is not None else per_token_scale(x, maxbound)

    def _dequant_forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.fmt in ("fp8", "fp8_pt", "w4a8"):
            x = fake_fp8(x, self._act_scale(x, FP8_MAX))
        elif self.fmt in ("int8_sq", "int8_sq_pt"):
            scale = self._act_scale(x, 127.0)
            x = (quantize_int8(x, scale).float() * scale).to(x.dtype)
        return F.linear(x, self.dequantize_weight(fast))

    # -- the kernels
    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        pad = (-m) % 16  # cuBLASLt FP8 wants M % 16 == 0
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        xq, scale = self._fp8_input(x)
        if self.rowwise or scale.numel() > 1:  # per-row weight or per-token scales: cuBLASLt row-wise scaling
            sa = scale.reshape(-1, 1).expand(x.shape[0], 1).contiguous()
            sb = self.weight_scale.reshape(1, -1).expand(1, self.out_features).contiguous()
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sa, scale_b=sb, out_dtype=x.dtype, use_fast_accum=True)
        else:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=x.dtype,
                                 use_fast_accum=True)
        return y[:m] if pad else y

    def _fp8_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E4M3 activations and their scale (static scalar, or [M, 1] per token), as ModelOpt quantizes them."""
        scale = self._act_scale(x, FP8_MAX)
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale

    def _quantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 activations and their scale (scalar, or [M, 1] per token)."""
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        scale = self._act_scale(x, 127.0)
        return quantize_int8(x, scale), scale

    def _8bit_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The activations of an 8-bit layer (fp8 E4M3 or int8, after any pre-quant scale) and their scale."""
        if self.fmt in ("fp8", "fp8_pt"):
            return self._fp8_input(x * self.pre_quant_scale if self.pre_quant_scale is not None else x)
        return self._quantized_input(x)

    def _w8_gemv(self, x: torch.Tensor) -> torch.Tensor:
        """M = 1 on quantkit's 8-bit GEMV: split-K partial sums, summed and scaled here (fused under compile)."""
        xq, scale = self._8bit_input(x)
        parts = triton_gemm.w8_gemv_partials(xq, self.weight)
        acc = parts[0] if parts.shape[0] == 1 else parts.sum(0)
        return (acc[None, :] * (scale.reshape(-1, 1) * self.weight_scale.reshape(1, -1))).to(x.dtype)

    def _library_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The attached library kernel, with quantkit's own activation quantization (kernels/libs.py says why)."""
        lay = self._lib
        if lay is None:
            raise RuntimeError("no library kernel attached")
        args = [getattr(self, f"lib_arg{i}") for i in range(len(lay.tensors))]
        if self.fmt == "int4":
            if self.pre_quant_scale is not None:
                x = x * self.pre_quant_scale
            return libs.gemlite_gemm(x, args, lay.meta, lay.out_dtype)
        xq, scale = self._8bit_input(x)
        y = libs.gemlite_gemm(xq, args, lay.meta, lay.out_dtype)  # static input scale folded into its scales
        if self.input_scale is None:
            y = y * scale  # per-token [M, 1], on the fp32 output
        return y.to(x.dtype)

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        pad = 32 - m if m <= 16 else 0  # _int_mm needs M > 16 (only reached at decode via QUANTKIT_INT8_DECODE)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        xq, scale = self._quantized_input(x)
        acc = torch._int_mm(xq, self.weight.t())
        y = (acc.float() * (scale * self.weight_scale)).to(x.dtype)
        return y[:m] if pad else y

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        kernel = self.kernels["prefill"] if m > DECODE_MAX_M else self.kernels.get("m1" if m == 1 else "decode",
                                                                                      self.kernels["decode"])
        if kernel in ("dequant", "triton_dequant"):
            return self._dequant_forward(x, fast=kernel == "triton_dequant")
        if kernel == "torch._scaled_mm":
            return self._scaled_mm(x)
        if libs.kernel_library(kernel) is not None:
            return self._library_forward(x)
        if kernel == "torch._int_mm":
            return self._int_mm(x)
        if kernel == "triton_w8a8":
            xq, scale = self._quantized_input(x)
            return triton_gemm.w8_gemm(xq, self.weight, self.weight_scale, scale.reshape(-1), x.dtype)
        if kernel == "triton_w8a16":
            return triton_gemm.w8_gemm(x, self.weight, self.weight_scale)
        if kernel == "triton_w8_gemv":
            return self._w8_gemv(x)
        if kernel == "triton_w4a16":
            if self.pre_quant_scale is not None:
                x = x * self.pre_quant_scale
            return triton_gemm.w4_gemm(x, self.w4_weight, self.w4_scale_t, self.group_size)
        if kernel == "tinygemm":
            if self.pre_quant_scale is not None:
                x = x * self.pre_quant_scale
            return torch.ops.aten._weight_int4pack_mm(x.contiguous(), self.tinygemm_weight, self.group_size,
                                                      self.tinygemm_scales_zeros)
        raise RuntimeError(f"unknown kernel {kernel}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._matmul(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """Bytes a decode step reads for this layer (the layout its decode kernel streams, plus scales)."""
        step = self.kernels.get("m1", self.kernels.get("decode"))  # what a batch-1 step runs
        extra = [t for t in (self.weight_scale, self.input_scale, self.pre_quant_scale, self.bias) if t is not None]
        if step == "gemlite_a16w4" and self._lib is not None:  # its packed weight and fp32 scales
            extra = [t for t in (self.input_scale, self.pre_quant_scale, self.bias) if t is not None]
            return self._lib.nbytes + sum(t.numel() * t.element_size() for t in extra)
        main = {"tinygemm": self.tinygemm_weight, "triton_w4a16": self.w4_weight}.get(step, self.weight)
        return main.numel() * main.element_size() + sum(t.numel() * t.element_size() for t in extra)


# ----------------------------------------------------------------------------- fusing projections that share an input


def _same(tensors: list[torch.Tensor | None]) -> bool:
    if all(t is None for t in tensors):
        return True
    return all(t is not None and t.shape == tensors[0].shape and torch.equal(t, tensors[0]) for t in tensors)


def _can_fuse(mods: list[nn.Module]) -> bool:
    if all(type(m) is nn.Linear for m in mods):
        return (len({m.in_features for m in mods}) == 1 and len({m.weight.dtype for m in mods}) == 1
                and len({m.bias is None for m in mods}) == 1)
    if not all(isinstance(m, QuantLinear) for m in mods):
        return False
    m0 = mods[0]
    if m0.fmt == "w4a8" or any((m.fmt, m.in_features, m.group_size, m.compute_dtype) !=
                               (m0.fmt, m0.in_features, m0.group_size, m0.compute_dtype) for m in mods):
        return False
    # one activation quantization for all parts: the exporter gives them the same input scale and pre-quant scale
    if not (_same([m.input_scale for m in mods]) and _same([m.pre_quant_scale for m in mods])
            and len({m.bias is None for m in mods}) == 1):
        return False
    dev = m0.weight.device
    if m0.fmt in ("fp8", "fp8_pt") and dev.type == "cuda" and not _same([m.weight_scale for m in mods]):
        return fp8_rowwise_ok(dev)
    return True


def _concat(mods: list[nn.Module]) -> nn.Module:
    m0 = mods[0]
    out = sum(m.out_features for m in mods)
    bias = torch.cat([m.bias for m in mods]) if m0.bias is not None else None
    if type(m0) is nn.Linear:
        lin = nn.Linear(m0.in_features, out, bias=bias is not None, device=m0.weight.device, dtype=m0.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.cat([m.weight for m in mods]))
            if bias is not None:
                lin.bias.copy_(bias)
        return lin
    if m0.fmt in ("fp8", "fp8_pt") and all(m.weight_scale.numel() == 1 for m in mods) and _same(
            [m.weight_scale for m in mods]):
        ws = m0.weight_scale
    elif m0.fmt in ("fp8", "fp8_pt"):  # per-row from now on
        ws = torch.cat([m.weight_scale.reshape(-1).expand(m.out_features) for m in mods])
    else:
        ws = torch.cat([m.weight_scale for m in mods])
    tensors = {"weight": torch.cat([m.weight for m in mods]), "weight_scale": ws, "input_scale": m0.input_scale,
               "pre_quant_scale": m0.pre_quant_scale, "bias": bias}
    tensors = {k: v for k, v in tensors.items() if v is not None}
    return QuantLinear(m0.fmt, tensors, m0.in_features, out, m0.compute_dtype, m0.weight.device, k_packed=True)


class _SharedOutput:
    """Runs the fused projection once per input and hands each part its slice (plain object: not a module)."""

    def __init__(self, fused: nn.Module, sizes: list[int]) -> None:
        self.fused, self.sizes = fused, sizes
        self._x: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if index == 0 or self._x is not x:  # q first, then k and v on the same tensor (any other order recomputes)
            self._parts = self.fused(x).split(self.sizes, dim=-1)
            self._x = x
        y = self._parts[index]
        if index == len(self.sizes) - 1:
            self._x, self._parts = None, ()
        return y


class FusedPart(nn.Module):
    """Stands in for q_proj / k_proj / v_proj after fusion: returns its slice of the fused projection."""

    def __init__(self, shared: _SharedOutput, index: int, in_features: int, out_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "_shared", shared)  # not a submodule: the fused layer is registered once
        self.index, self.in_features, self.out_features = index, in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared.part(x, self.index)


class FusedGateUpMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up as one GEMM (the gated MLP of Llama-style models)."""

    def __init__(self, gate_up: nn.Module, down_proj: nn.Module, act_fn: nn.Module, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn, self.intermediate = gate_up, down_proj, act_fn, intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.intermediate, self.intermediate], dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: nn.Module) -> list[str]:
    """Fuse the layer groups the family file names (`fused_groups`: q/k/v into one GEMM per attention layer,
    gate/up into one per gated MLP), in place, as TensorRT-LLM's checkpoints do. Same arithmetic: the parts share
    their input, input scale and pre-quant scale (checked), and keep their own weight scales (fp8: per-row).
    Returns the names of the fused layers; `model.quantkit_kernels` is updated to them."""
    fam = runtime_family(model.config.model_type)
    fused: list[str] = []
    plan = getattr(model, "quantkit_kernels", None)
    for group in fam.fused_groups:
        for name, mod in list(model.named_modules()):
            if not (name == group.parent or name.endswith("." + group.parent)):
                continue
            needed = (*group.parts, *((group.down, group.act) if group.down else ()))
            if not all(hasattr(mod, a) for a in needed):
                continue  # e.g. a MoE layer's mlp in a family whose dense layers have gate/up
            parts = [getattr(mod, a) for a in group.parts]
            if not _can_fuse(parts):
                continue
            new_name = f"{name}.{group.fused}"
            if group.down is not None:
                if parts[0].out_features != parts[1].out_features:
                    continue
                model.set_submodule(name, FusedGateUpMLP(_concat(parts), getattr(mod, group.down),
                                                         getattr(mod, group.act), parts[0].out_features))
            else:
                joined = _concat(parts)
                shared = _SharedOutput(joined, [p.out_features for p in parts])
                setattr(mod, group.fused, joined)
                for i, attr in enumerate(group.parts):
                    setattr(mod, attr, FusedPart(shared, i, parts[i].in_features, parts[i].out_features))
            fused.append(new_name)
            if plan is not None:
                info = None
                for old in group.parts:
                    info = plan.pop(f"{name}.{old}", None)
                new = model.get_submodule(new_name)
                if info is not None and isinstance(new, QuantLinear):
                    plan[new_name] = {"format": new.fmt, **new.kernels}
    return fused


def runtime_family(model_type: str):
    """The family file, or why quantkit's runtime cannot run this model type (no file, or MoE experts)."""
    from quantkit.archs import family
    from quantkit.errors import QuantkitError

    fam = family(model_type)
    if fam.runtime_unsupported is not None:
        raise QuantkitError(f"quantkit's runtime cannot run model type '{model_type}': {fam.runtime_unsupported}",
                            where="runtime", fix="evaluate the quantized model in the run (quantkit run), or deploy "
                            "the HF unified checkpoint with TensorRT-LLM's PyTorch backend or vLLM")
    return fam


# ----------------------------------------------------------------------------- attention (GQA without repeat_kv)

ATTENTION = "quantkit_sdpa"


def gqa_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA for grouped-query attention that reads each K/V head once, plus the FP8 KV cache numerics.

    transformers' sdpa path copies every K/V head n_rep times (repeat_kv) whenever there is a mask, which a static
    cache always has: at decode that is 4 extra passes over the cache per layer (Llama-3-8B: n_rep = 4). Here the
    n_rep query heads of a group are folded into the query-length axis instead (the mask repeated to match),
    which computes exactly the same attention. A decode step on CUDA runs kernels/triton_attention.py instead
    (`_triton_decode` says when): split along the cache, each K/V head read once for its group of query heads.

    FP8 KV cache (checkpoint `k_scale` / `v_scale`, amax/448): K and V are FP8 quantize-dequantized here, on the
    full K/V handed to attention, which is where ModelOpt's fake-quantized model applies them. This gives the
    numerics of an FP8 KV cache, not its memory saving (the static cache stores the model dtype).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    k_scale = getattr(module, "quantkit_k_scale", None)
    if k_scale is not None:
        key = fake_fp8(key, k_scale)
        value = fake_fp8(value, module.quantkit_v_scale)
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    if _triton_decode(query, key, attention_mask, dropout, kwargs):
        keep = attention_mask[:, 0, -1].expand(b, -1)  # [b, L]: the query token's row (a batch-1 mask broadcast)
        out = triton_attention.decode_attention(query, key, value, keep, d**-0.5 if scaling is None else scaling)
        return out.transpose(1, 2).contiguous(), None
    if hkv == hq or (attention_mask is None and s > 1) or dropout > 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    n = hq // hkv
    q = query.reshape(b, hkv, n * s, d)  # q head h uses kv head h // n (repeat_kv's order)
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, -s:, :]
        mask = mask[:, :, None].expand(mask.shape[0], mask.shape[1], n, s, mask.shape[-1])
        mask = mask.reshape(mask.shape[0], mask.shape[1], n * s, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, s, d).transpose(1, 2).contiguous(), None


def _triton_decode(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float,
                   kwargs: dict[str, Any]) -> bool:
    """Decode attention on kernels/triton_attention.py: one query token, a boolean mask, no logit softcap or
    attention sinks (not expressed there), on CUDA (QUANTKIT_DECODE_ATTENTION=sdpa|triton overrides, e.g. to run
    it under the Triton interpreter on CPU)."""
    choice = os.environ.get("QUANTKIT_DECODE_ATTENTION", "triton" if query.is_cuda else "sdpa")
    return (choice == "triton" and mask is not None and mask.dtype == torch.bool and dropout == 0
            and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
            and triton_attention.supported(query, key) and triton_gemm.available(query.device))


def use_quantkit_attention(model: nn.Module) -> str:
    """Switch `model` to `gqa_sdpa_attention`; returns the implementation it had (to switch back)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, gqa_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    return before


# ----------------------------------------------------------------------------- loading


def read_quant_config(hf_dir: Path) -> dict[str, Any]:
    """The `quantization` block of hf_quant_config.json (or the config.json quantization_config)."""
    hq = hf_dir / "hf_quant_config.json"
    if hq.is_file():
        return dict(json.loads(hq.read_text()).get("quantization", {}))
    cfg = json.loads((hf_dir / "config.json").read_text())
    return dict(cfg.get("quantization_config") or {})


def _read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {hf_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


PER_TOKEN_SQ_ALGOS = {"W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"}


def _layer_algo(name: str, qcfg: dict[str, Any]) -> str | None:
    """The quant_algo that applies to layer `name` (MIXED_PRECISION checkpoints list it per layer)."""
    layers = qcfg.get("quantized_layers") or {}
    return (layers.get(name) or {}).get("quant_algo") or qcfg.get("quant_algo")


def _layer_format(t: dict[str, torch.Tensor], algo: str | None = None) -> str | None:
    """Which quantized format a linear's tensors are in (decided per layer, so mixed checkpoints work)."""
    w = t.get("weight")
    if w is None or w.dtype not in _QUANT_WEIGHT_DTYPES:
        return None
    if w.dtype == torch.float8_e4m3fn:
        return "fp8" if "input_scale" in t else "fp8_pt"  # no static activation scale: dynamic per token
    if w.dtype == torch.int8:
        if "input_scale" in t:
            return "int8_sq"
        # SmoothQuant with dynamic per-token activations also has no input_scale: only the label tells it from
        # weight-only INT8 (running it as weight-only would silently skip the activation quantization)
        return "int8_sq_pt" if algo in PER_TOKEN_SQ_ALGOS else "int8_wo"
    return "w4a8" if "weight_scale_2" in t else "int4"


def load_quantized(hf_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                   fuse: bool = False) -> tuple[nn.Module, Any]:
    """Load a quantkit/ModelOpt HF unified checkpoint as (model, tokenizer) computing with real quantized weights.

    fuse: also fuse q/k/v and gate/up into one GEMM each (`fuse_projections`; the bench does this itself).
    The tokenizer is None when the folder holds none. `model.quantkit_kernels` maps each quantized layer to its
    format and kernels; `model.quantkit_quant` is the checkpoint's quantization block.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf_dir = Path(hf_dir)
    device = torch.device(device)
    qcfg = read_quant_config(hf_dir)
    config = AutoConfig.from_pretrained(hf_dir)
    runtime_family(config.model_type)  # before reading any tensor: a family the runtime cannot run says why
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers has no 'modelopt' quantizer: we do the quantized part
    tensors = _read_tensors(hf_dir)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantized: dict[str, tuple[str, nn.Linear]] = {}
    for name, lin in linears.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".") and "." not in
               k[len(name) + 1:]}
        fmt = _layer_format(own, _layer_algo(name, qcfg))
        if fmt is not None:
            quantized[name] = (fmt, lin)
            model.set_submodule(name, nn.Identity())  # so to_empty allocates no 16-bit weight for it

    model.to_empty(device=device)
    tie = getattr(config, "tie_word_embeddings", False) and "lm_head" not in quantized
    if tie:
        model.tie_weights()
    kv_keys = {k for k in tensors if k.endswith((".k_scale", ".v_scale"))}
    quant_keys = {k for k in tensors for n in quantized if k.startswith(n + ".")}
    plain = {k: v for k, v in tensors.items() if k not in kv_keys and k not in quant_keys}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint tensors the model does not have: {unexpected[:5]}")
    tied = {"lm_head.weight"} if tie else set()
    missing = [k for k in missing if k not in tied]
    if missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {missing[:5]}")
    # Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) are not in the checkpoint and to_empty left them
    # uninitialized. _init_weights also re-draws the module's own parameters (Gemma's scaled embedding is such a
    # module): keep the loaded ones.
    for mod in model.modules():
        if any(n in mod._non_persistent_buffers_set for n, _ in mod.named_buffers(recurse=False)):
            loaded = {n: p.detach().clone() for n, p in mod.named_parameters(recurse=False)}
            model._init_weights(mod)
            with torch.no_grad():
                for n, p in mod.named_parameters(recurse=False):
                    p.copy_(loaded[n])

    plan: dict[str, dict[str, str]] = {}
    for name, (fmt, lin) in quantized.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        q = QuantLinear(fmt, own, lin.in_features, lin.out_features, dtype, device)
        model.set_submodule(name, q)
        plan[name] = {"format": fmt, **q.kernels}

    if kv_keys:
        for key in kv_keys:
            attn_name = key.rsplit(".", 2)[0]  # model.layers.0.self_attn(.k_proj.k_scale)
            attn = model.get_submodule(attn_name)
            kind = "k" if key.endswith("k_scale") else "v"
            attn.register_buffer(f"quantkit_{kind}_scale", tensors[key].to(device, torch.float32))
        use_quantkit_attention(model)

    model.eval()
    model.quantkit_kernels = plan
    model.quantkit_quant = qcfg
    if fuse:
        fuse_projections(model)
    tokenizer = None
    if any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s: %d quantized linears (%s)", hf_dir, len(plan), qcfg.get("quant_algo"))
    return model, tokenizer


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many layers use each (format, regime, kernel): a short line for logs and bench results."""
    counts: dict[str, int] = {}
    for info in getattr(model, "quantkit_kernels", {}).values():
        for regime in REGIMES:
            kernel = info.get(regime)
            if kernel is None:
                continue
            key = f"{info['format']}/{regime}:{kernel}"
            if libs.kernel_library(kernel) is not None:
                key += f" ({info.get('library') or kernel_origin(kernel)})"
            counts[key] = counts.get(key, 0) + 1
    return counts


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: quantized layers as stored, other linears in full, norms; the
    embedding table is excluded (a step reads one row of it)."""
    total = 0
    seen: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.weight_bytes()
            continue
        if isinstance(mod, nn.Embedding):
            continue
        for p in list(mod.parameters(recurse=False)):
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
