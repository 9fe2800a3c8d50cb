"""Skinny GEMMs (M <= 16, i.e. decode) on int8 / int4 weights, written in Triton.

Why our own kernels: for W8A8 at decode sizes `torch._int_mm` is unusable (DESIGN.md: 0.16x of bf16 at M=1, it
pads M to 32 and runs a tile shape made for big M), and PyTorch has no int8-weight GEMV at all. A decode GEMM is
memory-bound, so a simple kernel that streams the 1-byte (or 1/2-byte) weights once and does the multiply on the
tensor cores (int8 x int8 -> int32 for W8A8; int -> bf16 in registers for weight-only) reaches most of the bandwidth.

Kernels (all: y[M, N] = x[M, K] @ W[N, K]^T, W row-major, one program per BLOCK_N output columns, whole K; K is a
compile-time constant: a model has only a few distinct K, and a constant trip count lets Triton pipeline the loop):
- `w8_gemm(x, w_int8, w_scale, in_scale=None)`
    in_scale given (INT8 SmoothQuant; a scalar, or [M] for per-token activations): x is the already-quantized int8
    activation (the caller applies the
    pre-quant scale and quantizes, see runtime.quantize_int8: one cheap elementwise pass instead of redoing it in
    every program, which made the first version ALU-bound); int8 tensor-core dot with int32 accumulation, then
    scaled by in_scale * w_scale[n].
    in_scale None (INT8 weight-only): int8 weights converted to x's dtype in registers, fp32 accumulation.
- `w4_gemm(x, w_packed, w_scale, group_size, pre_quant_scale=None)`: INT4 block-wise weight-only. Weights in
    quantkit's K-packed layout (`pack_int4_k`): byte [n, j] holds k = 2j in the low nibble and k = 2j + 1 in the
    high nibble, signed two's complement in [-8, 7]. One group per inner step: two dots (even / odd k) of the
    integer nibbles, then the fp32 group scale is applied to the partial sum.

- `dequant_int8(w, w_scale, dtype)`, `dequant_int4(w_packed, w_scale, group_size, dtype)`: one pass that writes the
    dequantized weight (w * scale in fp32, rounded once to dtype, as the fake quantizer computes it), for prefill
    (big M), where the GEMM itself then runs on cuBLAS.

Measured on an H200 (bench/kernels.py, 2026-11-26, the 7 GEMMs of a Llama-3.1-8B decoder layer at M=1, vs bf16
cuBLAS 134 us): the first W8A8 version, quantizing x inside every program, took 144 us while the same kernel
without it (W8A16) took 104 us (1.29x); hence the caller quantizes x. The W4A16 kernel (one group per step,
nibble unpacking in registers) took 339 us, so int4 decode uses tinygemm (79 us) and this kernel is the fallback.
Not tuned further: no split-K, a handful of autotuned tile shapes; W8A16 streams ~2.1 TB/s of weights where cuBLAS
bf16 streams ~3.3 TB/s, so there is headroom.

The kernels run under TRITON_INTERPRET=1 on CPU as well (that is how CI checks them when Triton is installed;
the interpreter mishandles int -> bf16, so those checks run in float32). They are registered as torch custom ops
(`quantkit::*`) so torch.compile treats them as opaque calls.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: the CPU path of quantkit.runtime never needs it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False

MAX_M = 16  # BLOCK_M: the kernels handle any M but are only chosen for decode-sized M


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str) -> bool:
    """True where these kernels can run on tensors of `device` (CUDA, or CPU under the Triton interpreter)."""
    if not HAVE_TRITON:
        return False
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and interpreting())


def pack_int4_k(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values [N, K] (int8 in [-8, 7]) -> uint8 [N, K/2], k even in the low nibble."""
    q = q.to(torch.int16) & 0xF
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8).contiguous()


def unpack_int4_k(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_k`: uint8 [N, K/2] -> int8 [N, K]."""
    p = p.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    q = torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)
    return torch.where(q >= 8, q - 16, q).to(torch.int8)


if HAVE_TRITON:

    # A few hand-picked configs (each is compiled per distinct K): streaming shapes for a memory-bound skinny GEMM.
    _W8_CONFIGS = [(32, 256, 4, 4), (16, 256, 4, 4), (64, 128, 4, 4), (32, 128, 3, 4), (64, 256, 3, 8),
                   (128, 128, 3, 8), (16, 512, 3, 4)]  # (BLOCK_N, BLOCK_K, stages, warps)
    _W4_CONFIGS = [(32, 4), (16, 4), (64, 3)]  # (BLOCK_N, stages); BLOCK_K is the quantization group

    def _configs() -> list[triton.Config]:
        if interpreting():  # one config: the interpreter is slow and timing it means nothing
            return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=1)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=wp, num_stages=st)
                for bn, bk, st, wp in _W8_CONFIGS]

    @triton.autotune(configs=_configs(), key=["M", "N", "K", "A8"])
    @triton.jit
    def _w8_kernel(x_ptr, w_ptr, ws_ptr, in_scale_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_ym,
                   A8: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if A8 else tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            if A8:
                acc += tl.dot(x, tl.trans(w))  # int8 x int8 -> int32 on the tensor cores
            else:
                # int8 -> fp32 -> x dtype: exact, and the Triton interpreter gets int -> bf16 wrong
                acc += tl.dot(x, tl.trans(w.to(tl.float32).to(x_ptr.dtype.element_ty)))
        ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
        if A8 and ROW_SCALE:  # dynamic per-token activation scales
            y = acc.to(tl.float32) * tl.load(in_scale_ptr + rm, mask=m_ok, other=0.0)[:, None] * ws[None, :]
        elif A8:
            y = acc.to(tl.float32) * (ws[None, :] * tl.load(in_scale_ptr))
        else:
            y = acc * ws[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dequant8_kernel(w_ptr, ws_ptr, out_ptr, total, K: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < total
        w = tl.load(w_ptr + idx, mask=ok, other=0).to(tl.float32)
        s = tl.load(ws_ptr + idx // K, mask=ok, other=0.0)
        tl.store(out_ptr + idx, (w * s).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _dequant4_kernel(w_ptr, ws_ptr, out_ptr, total_bytes, K: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK: tl.constexpr):
        # one byte -> two consecutive k of the same row (low nibble = even k)
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = j < total_bytes
        p = tl.load(w_ptr + j, mask=ok, other=0).to(tl.int32)
        n = j // (K // 2)
        k = (j % (K // 2)) * 2
        s = tl.load(ws_ptr + n * (K // GROUP) + k // GROUP, mask=ok, other=0.0)
        lo = (((p & 0xF) ^ 8) - 8).to(tl.float32) * s
        hi = ((((p >> 4) & 0xF) ^ 8) - 8).to(tl.float32) * s
        base = n * K + k
        tl.store(out_ptr + base, lo.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out_ptr + base + 1, hi.to(out_ptr.dtype.element_ty), mask=ok)

    def _w4_configs() -> list[triton.Config]:
        if interpreting():
            return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
        return [triton.Config({"BLOCK_N": bn}, num_warps=4, num_stages=st) for bn, st in _W4_CONFIGS]

    @triton.autotune(configs=_w4_configs(), key=["M", "N", "K", "GROUP"])
    @triton.jit
    def _w4_kernel(x_ptr, w_ptr, ws_ptr, pqs_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn, stride_wsn,
                   stride_ym,
                   GROUP: tl.constexpr, HAS_PQS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        HALF: tl.constexpr = GROUP // 2
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.arange(0, HALF)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, K // GROUP):
            jj = g * HALF + rj  # byte index along K/2
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * jj[None, :], mask=m_ok[:, None], other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * jj[None, :] + 1, mask=m_ok[:, None], other=0.0)
            if HAS_PQS:
                p_even = tl.load(pqs_ptr + 2 * jj)
                p_odd = tl.load(pqs_ptr + 2 * jj + 1)
                x_even = (x_even.to(tl.float32) * p_even[None, :]).to(x_ptr.dtype.element_ty)
                x_odd = (x_odd.to(tl.float32) * p_odd[None, :]).to(x_ptr.dtype.element_ty)
            p = tl.load(w_ptr + rn[:, None] * stride_wn + jj[None, :], mask=n_ok[:, None], other=0).to(tl.int32)
            lo = p & 0xF
            hi = (p >> 4) & 0xF
            # sign-extend the nibble; int -> fp32 -> x dtype is exact for these small integers
            lo = ((lo ^ 8) - 8).to(tl.float32).to(x_ptr.dtype.element_ty)
            hi = ((hi ^ 8) - 8).to(tl.float32).to(x_ptr.dtype.element_ty)
            part = tl.dot(x_even, tl.trans(lo)) + tl.dot(x_odd, tl.trans(hi))
            s = tl.load(ws_ptr + rn * stride_wsn + g, mask=n_ok, other=0.0)
            acc += part * s[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _launch_w8(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, in_scale: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    a8 = in_scale is not None

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, MAX_M))

    _w8_kernel[grid](x, w, w_scale, in_scale if a8 else w_scale, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                     A8=a8, ROW_SCALE=a8 and in_scale.numel() > 1, BLOCK_M=MAX_M)
    return y


def _launch_w4(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group_size: int,
               pqs: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, MAX_M))

    _w4_kernel[grid](x, w, w_scale, pqs if pqs is not None else w_scale, y, m, n, k, x.stride(0), w.stride(0),
                     w_scale.stride(0), y.stride(0), GROUP=group_size, HAS_PQS=pqs is not None, BLOCK_M=MAX_M)
    return y


@torch.library.custom_op("quantkit::w8_gemm", mutates_args=())
def w8_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, in_scale: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x @ dequant(w)^T for int8 weights [N, K] with per-channel fp32 scales.

    W8A8 when in_scale is given: x is then int8 (quantized with in_scale: one scale, or one per row [M] for
    dynamic per-token activations) and out_dtype names the result dtype.
    """
    return _launch_w8(x.contiguous(), w, w_scale, in_scale, out_dtype or x.dtype)


@w8_gemm.register_fake
def _(x, w, w_scale, in_scale=None, out_dtype=None):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=out_dtype or x.dtype)


@torch.library.custom_op("quantkit::w4_gemm", mutates_args=())
def w4_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group_size: int,
            pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(w)^T for K-packed int4 weights [N, K/2] with fp32 group scales [N, K/group]."""
    return _launch_w4(x.contiguous(), w, w_scale, group_size, pre_quant_scale)


@w4_gemm.register_fake
def _(x, w, w_scale, group_size, pre_quant_scale=None):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("quantkit::dequant_int8", mutates_args=())
def dequant_int8(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K] * fp32 per-row scale [N] -> dtype [N, K], one pass."""
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    block = 4096
    _dequant8_kernel[(triton.cdiv(w.numel(), block),)](w, w_scale, out, w.numel(), w.shape[1], BLOCK=block)
    return out


@dequant_int8.register_fake
def _(w, w_scale, dtype):
    return w.new_empty(w.shape, dtype=dtype)


@torch.library.custom_op("quantkit::dequant_int4", mutates_args=())
def dequant_int4(w: torch.Tensor, w_scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """K-packed int4 [N, K/2] * fp32 group scales [N, K/group] -> dtype [N, K], one pass."""
    n, k = w.shape[0], w.shape[1] * 2
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    block = 2048
    _dequant4_kernel[(triton.cdiv(w.numel(), block),)](w, w_scale, out, w.numel(), k, group_size, BLOCK=block)
    return out


@dequant_int4.register_fake
def _(w, w_scale, group_size, dtype):
    return w.new_empty((w.shape[0], w.shape[1] * 2), dtype=dtype)
