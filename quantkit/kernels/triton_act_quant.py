"""Per-token INT8 activation quantization for decode-sized M in one Triton kernel (int8_sq with dynamic scales).

Why: at M = 1 the per-token scale is a reduction over one row (4096 or 14336 values). Under torch.compile Inductor
fuses it with what precedes it but, for down_proj's 14336-wide input, emits a looped single-block reduction, a
second reduction and the quantizing pass (three kernels, about 6 us per layer on an H200, bench/RESULTS.md) where
a row fits one program's registers: this kernel loads the row once, takes its amax, and writes the int8 row and
its scale (one kernel). It is a torch custom op, so Inductor keeps its producer (SiLU * up, the attention output)
as a kernel of its own.

Arithmetic is exactly runtime.per_token_scale + runtime.quantize_int8 (ModelOpt's dynamic quantizer): amax over
the row in fp32 (an all-zero row gets scale 1), scale = amax / 127, q = clamp(round_half_even(x / scale), -128,
127); divisions correctly rounded (`div_rn`; Triton's plain fp32 `/` is approximate), rounding to nearest even by
adding and subtracting 1.5 * 2**23 (exact for |v| < 2**22, and |x / scale| <= 127 here). Runs under
TRITON_INTERPRET=1 on CPU too (how CI checks it against the torch reference).
"""

from __future__ import annotations

import torch

from quantkit.kernels import triton_gemm

MAX_K = 32768  # one row per program in registers; wider rows stay on the torch path

if triton_gemm.HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _int8_rows_kernel(x_ptr, q_ptr, s_ptr, stride_xm, K: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BLOCK)
        ok = k < K
        x = tl.load(x_ptr + row * stride_xm + k, mask=ok, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        amax = tl.where(amax > 2.0**-24, amax, 1.0)
        scale = tl.math.div_rn(amax, 127.0)
        v = tl.math.div_rn(x, scale)
        v = (v + 12582912.0) - 12582912.0  # + - 1.5 * 2**23: round to nearest, ties to even (a literal: jit)
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)
        tl.store(q_ptr + row * K + k, v.to(tl.int8), mask=ok)
        tl.store(s_ptr + row, scale)


def supported(in_features: int) -> bool:
    return triton_gemm.HAVE_TRITON and 16 <= in_features <= MAX_K


def launch_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows [M, K] and their fp32 scales [M, 1] of x [M, K] (any float dtype, unit stride along K)."""
    m, k = x.shape
    if not supported(k):
        raise ValueError(f"per-token int8 kernel: K = {k} outside 16..{MAX_K}")
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _int8_rows_kernel[(m,)](x, q, s, x.stride(0), K=k, BLOCK=block, num_warps=min(16, max(4, block // 1024)))
    return q, s


@torch.library.custom_op("quantkit::quantize_int8_rows", mutates_args=())
def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of x [M, K]: (q int8 [M, K], scale fp32 [M, 1]), as runtime.per_token_scale and
    runtime.quantize_int8 compute them."""
    return launch_int8_rows(x if x.stride(-1) == 1 else x.contiguous())


@quantize_int8_rows.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)
