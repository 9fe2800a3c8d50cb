"""Skinny GEMMs (M <= 16, i.e. decode) on int8 / int4 weights, written in Triton.

Why our own kernels: for W8A8 at decode sizes `torch._int_mm` is unusable (DESIGN.md: 0.16x of bf16 at M=1, it
pads M to 32 and runs a tile shape made for big M), and PyTorch has no int8-weight GEMV at all. A decode GEMM is
memory-bound, so a simple kernel that streams the 1-byte (or 1/2-byte) weights once and does the multiply on the
tensor cores (int8 x int8 -> int32 for W8A8; int -> bf16 in registers for weight-only) reaches most of the bandwidth.

Kernels (all: y[M, N] = x[M, K] @ W[N, K]^T, W row-major, one program per BLOCK_N output columns, whole K; K is a
compile-time constant: a model has only a few distinct K, and a constant trip count lets Triton pipeline the loop):
- `w8_gemm(x, w_int8, w_scale, in_scale=None, pre_quant_scale=None)`
    in_scale given (INT8 SmoothQuant, static per-tensor activation scale): x is multiplied by the pre-quant
    scale, quantized in-kernel to int8 exactly as ModelOpt's fake quantizer does (round half to even of
    x / in_scale, clamp to [-128, 127]), int8 tensor-core dot with int32 accumulation, then scaled by
    in_scale * w_scale[n].
    in_scale None (INT8 weight-only): int8 weights converted to x's dtype in registers, fp32 accumulation.
- `w4_gemm(x, w_packed, w_scale, group_size, pre_quant_scale=None)`: INT4 block-wise weight-only. Weights in
    quantkit's K-packed layout (`pack_int4_k`): byte [n, j] holds k = 2j in the low nibble and k = 2j + 1 in the
    high nibble, signed two's complement in [-8, 7]. One group per inner step: two dots (even / odd k) of the
    integer nibbles, then the fp32 group scale is applied to the partial sum.

The kernels run under TRITON_INTERPRET=1 on CPU as well (that is how CI checks them when Triton is installed).
They are registered as torch custom ops (`quantkit::w8_gemm`, `quantkit::w4_gemm`) so torch.compile treats them
as opaque calls.
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
    _W8_CONFIGS = [(32, 256, 4), (16, 256, 4), (64, 128, 4), (32, 128, 3)]  # (BLOCK_N, BLOCK_K, stages)
    _W4_CONFIGS = [(32, 4), (16, 4), (64, 3)]  # (BLOCK_N, stages); BLOCK_K is the quantization group

    def _configs() -> list[triton.Config]:
        if interpreting():  # one config: the interpreter is slow and timing it means nothing
            return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=1)]
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=st) for bn, bk, st in _W8_CONFIGS]

    @triton.jit
    def _round_half_even(v):
        # Add-and-subtract 1.5 * 2**23: the fp32 add rounds to an integer, half to even (= torch.round); valid for
        # |v| < 2**22, and v is clamped to the int8 range first. Exact in the Triton interpreter too.
        return (v + 12582912.0) - 12582912.0

    @triton.autotune(configs=_configs(), key=["M", "N", "K", "A8"])
    @triton.jit
    def _w8_kernel(x_ptr, w_ptr, ws_ptr, pqs_ptr, in_scale_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, stride_wn,
                   stride_ym,
                   A8: tl.constexpr, HAS_PQS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        if A8:
            in_scale = tl.load(in_scale_ptr)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            if HAS_PQS:
                # x * pre_quant_scale rounded to x's dtype, as the fake-quantized model computes it
                pqs = tl.load(pqs_ptr + kk, mask=k_ok, other=0.0)
                x = (x.to(tl.float32) * pqs[None, :]).to(x_ptr.dtype.element_ty)
            if A8:
                v = tl.clamp(x.to(tl.float32) / in_scale, -128.0, 127.0)
                xq = _round_half_even(v).to(tl.int8)
                acc += tl.dot(xq, tl.trans(w))
            else:
                # int8 -> fp32 -> x dtype: exact, and the Triton interpreter gets int -> bf16 wrong
                acc += tl.dot(x, tl.trans(w.to(tl.float32).to(x_ptr.dtype.element_ty)))
        ws = tl.load(ws_ptr + rn, mask=n_ok, other=0.0)
        if A8:  # noqa: SIM108 - a constexpr branch: in_scale exists only when A8
            y = acc.to(tl.float32) * (ws[None, :] * in_scale)
        else:
            y = acc * ws[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

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
               pqs: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    a8 = in_scale is not None
    dummy = w_scale  # never read when the matching flag is off

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, MAX_M))

    _w8_kernel[grid](x, w, w_scale, pqs if pqs is not None else dummy, in_scale if a8 else dummy, y, m, n, k,
                     x.stride(0), w.stride(0), y.stride(0), A8=a8, HAS_PQS=pqs is not None, BLOCK_M=MAX_M)
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
            pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(w)^T for int8 weights [N, K] with per-channel fp32 scales; W8A8 when in_scale is given."""
    return _launch_w8(x.contiguous(), w, w_scale, in_scale, pre_quant_scale)


@w8_gemm.register_fake
def _(x, w, w_scale, in_scale=None, pre_quant_scale=None):
    return x.new_empty((x.shape[0], w.shape[0]))


@torch.library.custom_op("quantkit::w4_gemm", mutates_args=())
def w4_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group_size: int,
            pre_quant_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(w)^T for K-packed int4 weights [N, K/2] with fp32 group scales [N, K/group]."""
    return _launch_w4(x.contiguous(), w, w_scale, group_size, pre_quant_scale)


@w4_gemm.register_fake
def _(x, w, w_scale, group_size, pre_quant_scale=None):
    return x.new_empty((x.shape[0], w.shape[0]))
