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
- `w4_gemm(x, w_packed, w_scale_t, group_size)`: INT4 block-wise weight-only (x already multiplied by any AWQ
    pre-quant scale), any M <= 16, on the tensor cores. Weights in quantkit's W4A16 layout (`pack_int4_w4`): int32
    words [N, K/8], each block of 128 k stored as 16 words whose nibble i of word j is k = 128 b + 16 i + j, as the
    unsigned code u = q + 8. So nibble i of a tile of 16 words is a [BLOCK_N, 16] slice of contiguous k, which
    becomes bf16 / fp16 by a bit trick ((u | bits(128.0)) read as bf16 is 128 + u exactly; fp16: 1024 + u; no
    int-to-float conversion, no reordering) and feeds one tensor-core dot (the weights are the dot's first operand,
    which the Hopper tensor cores read from registers, so the dequantized tile never goes through shared memory).
    The offset is taken out once per group: sum_k x_k (u_k - 8) = dot(x, 128 + u) - 136 sum_k x_k, then times the
    group's fp32 scale (fp32 models: the exact fp32 value q and an IEEE fp32 dot). Scales are stored transposed
    [K/group, N] so a tile's scales are one contiguous load. The kernel writes split-K partial sums [split_k, M, N]
    in fp32 (`w4_gemm_partials`, a custom op) and `w4_gemm` sums them with torch, so under torch.compile the sum
    and the cast fuse into the next kernel. Launch settings per shape and M regime: `w4a16_configs.json`
    (bench/w4a16_tune.py), else a default split to about two programs per SM.
    At M = 1 a config may pick the GEMV on the same layout instead (`W4Config.gemv`, `_w4_gemv_kernel`): the tensor-core
    kernel at M = 1 waits on its chain of dots (78 us per 8B layer against tinygemm's 68), while a GEMV needs only
    one logic op, one add and one FMA per weight (a nibble masked in place into the fp32 exponent of 2**23, x taken
    times 16**-p), with the same partial-sum output. Not measured on a GPU yet: the shipped table has no GEMV row,
    so no plan runs it until bench/w4a16_tune.py --m 1 --write measures it faster (the self-check covers it).
- `w8_gemv_partials(x, w)`: M = 1 on 8-bit weights (int8 or fp8 E4M3) with x already quantized to the same kind:
    split-K partial dot products [split_k, N] in fp32 (fp32 FMAs, int8 -> fp32 by the bit trick above, or a
    tensor-core dot on the row repeated 16 times), scaled and summed by the caller. Launch settings per kind and
    shape: `w8_gemv_configs.json` (bench/w8_tune.py, against gemlite's A8W8 GEMV); the runtime takes it only where
    that table has it faster and the activation scale is static (runtime.QuantLinear._w8_gemv_plan).
- `dequant_int8(w, w_scale, dtype)`, `dequant_int4(w_packed, w_scale, group_size, dtype)`: one pass that writes the
    dequantized weight (w * scale in fp32, rounded once to dtype, as the fake quantizer computes it), for prefill
    (big M), where the GEMM itself then runs on cuBLAS.

Measured on an H200 (bench/kernels.py, 2026-11-26, the 7 GEMMs of a Llama-3.1-8B decoder layer at M=1, vs bf16
cuBLAS 134 us): the first W8A8 version, quantizing x inside every program, took 144 us while the same kernel
without it (W8A16) took 104 us (1.29x); hence the caller quantizes x. W8A16 streams ~2.1 TB/s of weights where cuBLAS
bf16 streams ~3.3 TB/s (no split-K, a handful of autotuned tile shapes). The previous W4A16 kernel
(K-packed bytes, fp32 FMAs at M = 1, dequantize-and-reorder before a dot at M <= 16; bench/RESULTS.md, 2026-12-01)
took 0.62-0.79x of tinygemm's speed at M = 1 and 0.42-0.75x at M = 8 on the 8B shapes; the kernel above replaced
it, and runtime.int4_decode_plan takes it where its tune table measured it faster than tinygemm.

The kernels run under TRITON_INTERPRET=1 on CPU as well (that is how CI checks them when Triton is installed;
the interpreter mishandles int -> bf16, so those checks run in float32). They are registered as torch custom ops
(`quantkit::*`) so torch.compile treats them as opaque calls.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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


_FP32_EXPONENT_2_23 = 0x4B000000  # the bits of fp32 2**23: or-ed with an integer v < 2**23, it reads as 2**23 + v
W4_BLOCK_K = 128  # k per block of the W4A16 layout: 16 words x 8 nibbles, nibble i = a slice of 16 contiguous k
_W4_SLICE = W4_BLOCK_K // 8


def pack_int4_w4(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 values [N, K] (int8 in [-8, 7], K a multiple of 128) -> the W4A16 kernel's layout: int32
    [N, K/8], nibble i of word j of block b = the code q + 8 of k = 128 b + 16 i + j."""
    n, k = q.shape
    u = (q.to(torch.int32) + 8).reshape(n, k // W4_BLOCK_K, 8, _W4_SLICE)  # [n, block, nibble i, word j]
    shifts = (torch.arange(8, device=q.device, dtype=torch.int32) * 4).reshape(1, 1, 8, 1)
    return (u << shifts).sum(2, dtype=torch.int32).reshape(n, k // 8).contiguous()


def unpack_int4_w4(w: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_w4`: int32 [N, K/8] -> int8 [N, K]."""
    n, words = w.shape
    shifts = (torch.arange(8, device=w.device, dtype=torch.int32) * 4).reshape(1, 1, 8, 1)
    u = (w.reshape(n, words // _W4_SLICE, 1, _W4_SLICE) >> shifts) & 0xF
    return (u - 8).to(torch.int8).reshape(n, words * 8)


@dataclass(frozen=True)
class W4Config:
    """Launch settings of the W4A16 kernel for one (M regime, N, K): split_k programs along K (partial sums), each
    a tile of BLOCK_N output rows."""

    split_k: int
    block_n: int
    warps: int
    stages: int
    gemv: bool = False  # M = 1 only: the fp32-FMA GEMV on the same layout instead of the tensor-core kernel
    step_blocks: int = 1  # GEMV: 128-k blocks per loop step (a power of two)


W4_CONFIG_FILE = Path(__file__).with_name("w4a16_configs.json")
# where the table has no entry: split along K until there are about two programs per SM of a large GPU (decode
# GEMMs of a few thousand outputs would otherwise leave most SMs idle)
_W4_DEFAULT = W4Config(1, 64, 4, 3)
_W4_MIN_PROGRAMS = 256


def w4_regime(m: int) -> str:
    return "m1" if m == 1 else "decode"


@dataclass(frozen=True)
class Tuned:
    """One row of a tune table (w4a16_configs.json, w8_gemv_configs.json): the fastest config found, its time and
    the rival kernel's on the same shape (us)."""

    config: Any
    us: float
    rival_us: float


def _read_tuned(path: Path, config: type, rival: str) -> dict[str, dict[str, Tuned]]:
    """{group (M regime or weight kind): {"NxK": Tuned}} from a tune table whose rival's time is field `rival`."""
    raw = json.loads(path.read_text())
    return {group: {shape: Tuned(config(**r["config"]), r["us"], r[rival]) for shape, r in rows.items()}
            for group, rows in raw.items()}


@functools.cache
def _w4_table() -> dict[str, dict[str, Tuned]]:
    return _read_tuned(W4_CONFIG_FILE, W4Config, "tinygemm_us")


def w4_beats_tinygemm(m: int, n: int, k: int) -> bool | None:
    """Whether the tuned W4A16 kernel measured faster than tinygemm on this shape and M regime (None: not tuned)."""
    row = _w4_table()[w4_regime(m)].get(f"{n}x{k}")
    return None if row is None else row.us < row.rival_us


def _pow2_divisor(n: int) -> int:
    return n & -n


@functools.cache
def w4_config(m: int, n: int, k: int) -> W4Config:
    """The tuned settings for this shape (w4a16_configs.json, measured by bench/w4a16_tune.py), else the default
    split along K to about _W4_MIN_PROGRAMS programs; either made valid for K by fit_w4_config."""
    row = _w4_table()[w4_regime(m)].get(f"{n}x{k}")
    if row is not None:
        return fit_w4_config(row.config, k)
    blocks, split = k // W4_BLOCK_K, 1
    while -(-n // _W4_DEFAULT.block_n) * split < _W4_MIN_PROGRAMS and blocks % (2 * split) == 0:
        split *= 2
    return fit_w4_config(replace(_W4_DEFAULT, split_k=split), k)


def fit_w4_config(cfg: W4Config, k: int) -> W4Config:
    """`cfg` made valid for K: split_k divides the K/128 blocks, and step_blocks a split's blocks."""
    split = cfg.split_k
    while split > 1 and (k // W4_BLOCK_K) % split:
        split //= 2
    step = min(cfg.step_blocks, _pow2_divisor(k // W4_BLOCK_K // split))
    return replace(cfg, split_k=split, step_blocks=step)


@dataclass(frozen=True)
class W8Config:
    """Launch settings of the 8-bit GEMV (M = 1, `w8_gemv_partials`) for one (format, N, K): split_k programs
    along K (partial sums), dot = tensor-core path (the row repeated to the dot's 16 rows) or fp32 FMAs, tile
    BLOCK_N x BLOCK_K bytes of weight."""

    split_k: int
    dot: bool
    block_n: int
    block_k: int
    warps: int
    stages: int


W8_CONFIG_FILE = Path(__file__).with_name("w8_gemv_configs.json")
_W8_DEFAULT = W8Config(1, False, 16, 256, 4, 3)


@functools.cache
def _w8_table() -> dict[str, dict[str, Tuned]]:
    return _read_tuned(W8_CONFIG_FILE, W8Config, "gemlite_us")


def w8_weight_kind(w: torch.Tensor) -> str:
    """The table's key for an 8-bit weight: "fp8" (E4M3) or "int8"."""
    return "fp8" if w.dtype == torch.float8_e4m3fn else "int8"


def w8_gemv_beats_gemlite(kind: str, n: int, k: int) -> bool:
    """Whether bench/w8_tune.py measured the tuned GEMV faster than gemlite's A8W8 GEMV on this shape (M = 1)."""
    row = _w8_table().get(kind, {}).get(f"{n}x{k}")
    return row is not None and row.us < row.rival_us


@functools.cache
def w8_config(kind: str, n: int, k: int) -> W8Config:
    """The tuned settings for this shape (w8_gemv_configs.json), else the default; made valid for K."""
    row = _w8_table().get(kind, {}).get(f"{n}x{k}")
    return fit_w8_config(row.config if row is not None else _W8_DEFAULT, k)


def fit_w8_config(cfg: W8Config, k: int) -> W8Config:
    """`cfg` made valid for K: split_k divides K, BLOCK_K is a power of two dividing a split's K (>= 16)."""
    split = cfg.split_k
    while split > 1 and (k % split or _pow2_divisor(k // split) < 16):
        split //= 2
    return replace(cfg, split_k=split, block_k=min(cfg.block_k, _pow2_divisor(k // split)))


def w8_gemv_supported(in_features: int) -> bool:
    return in_features % 16 == 0


if HAVE_TRITON:

    # A few hand-picked configs (each is compiled per distinct K): streaming shapes for a memory-bound skinny GEMM.
    _W8_CONFIGS = [(32, 256, 4, 4), (16, 256, 4, 4), (64, 128, 4, 4), (32, 128, 3, 4), (64, 256, 3, 8),
                   (128, 128, 3, 8), (16, 512, 3, 4)]  # (BLOCK_N, BLOCK_K, stages, warps)

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

    @triton.jit
    def _w4_kernel(x_ptr, w_ptr, st_ptr, y_ptr, M, N, K: tl.constexpr, stride_xm, GROUP: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # w: int32 [N, K/8] in pack_int4_w4's layout (BLOCK_K = W4_BLOCK_K); st: fp32 scales transposed [K/GROUP, N]
        SLICE: tl.constexpr = BLOCK_K // 8  # k per nibble slice: the dot's K
        SLICES_PER_GROUP: tl.constexpr = GROUP // SLICE
        BLOCKS: tl.constexpr = K // BLOCK_K // SPLIT_K  # blocks per split
        dt = x_ptr.dtype.element_ty
        FP32: tl.constexpr = dt == tl.float32
        # the codes u = q + 8 as floats: 128 + u in bf16, 1024 + u in fp16 (exact: their spacing there is 1)
        MAGIC: tl.constexpr = 0x4300 if dt == tl.bfloat16 else 0x6400
        OFFSET: tl.constexpr = 136.0 if dt == tl.bfloat16 else 1032.0
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rw = tl.minimum(rn, N - 1)  # rows past N read row N - 1 (not stored): no masked weight loads
        rj = tl.arange(0, SLICE)
        rm = tl.arange(0, 16)  # the dot's smallest N: M <= 16 rows of x, the rest zeros
        m_ok = rm < M
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        for b in range(BLOCKS):
            blk = pid_k * BLOCKS + b
            w = tl.load(w_ptr + rw[:, None] * (K // 8) + blk * SLICE + rj[None, :])
            part = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
            xsum = tl.zeros((SLICE, 16), dtype=tl.float32)
            for i in tl.static_range(8):
                kk = blk * BLOCK_K + i * SLICE + rj
                xi = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask=m_ok[None, :], other=0.0)
                if FP32:  # q exactly: (u | bits(2**23)) read as fp32 is 2**23 + u
                    wi = (((w >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                    part = tl.dot(wi, xi, part, input_precision="ieee")
                else:
                    wi = (((w >> (4 * i)) & 0xF) | MAGIC).to(tl.int16).to(dt, bitcast=True)
                    part = tl.dot(wi, xi, part)
                    xsum += xi.to(tl.float32)
                if (i + 1) % SLICES_PER_GROUP == 0 or i == 7:  # the end of a group (or of the block)
                    g = (blk * BLOCK_K + i * SLICE) // GROUP
                    s = tl.load(st_ptr + g * N + rw)
                    if FP32:
                        acc += part * s[:, None]
                    else:
                        acc += (part - OFFSET * tl.sum(xsum, axis=0)[None, :]) * s[:, None]
                        xsum = tl.zeros((SLICE, 16), dtype=tl.float32)
                    part = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        out = y_ptr + pid_k * M * N  # split k's partial sums: [SPLIT_K, M, N] fp32, summed by the caller
        tl.store(out + rm[None, :] * N + rn[:, None], acc, mask=m_ok[None, :] & n_ok[:, None])

    @triton.jit
    def _w4_gemv_kernel(x_ptr, w_ptr, st_ptr, y_ptr, N, exponent, K: tl.constexpr, GROUP: tl.constexpr,
                        SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, STEP: tl.constexpr, BLOCK_K: tl.constexpr):
        # M = 1 on the same layout with fp32 FMAs (no tensor-core chain to wait on): a tile [BLOCK_N, STEP, 16]
        # words = STEP blocks of 128 k. Nibble p of a word masked in place and or-ed into the exponent of 2**23 is
        # exactly the fp32 2**23 + u * 16**p (p <= 4: below 2**24), so q * 16**p = that - (2**23 + 8 * 16**p)
        # and x is taken times 16**-p (exact): one logic op, one add, one FMA per weight; nibbles 5..7 are
        # nibbles 2..4 of the word shifted by 12 (one shift per word). `exponent` (the bits of 2**23) comes as an
        # argument, not a constant: a SASS LOP3 takes one immediate, so (w & mask) | exponent is one instruction
        # only when the second operand sits in a register (with two constants ptxas emits two; checked offline in
        # the SASS compiled for sm_90).
        SLICE: tl.constexpr = BLOCK_K // 8
        SLICES_PER_GROUP: tl.constexpr = GROUP // SLICE
        BLOCKS: tl.constexpr = K // BLOCK_K // SPLIT_K
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rw = tl.minimum(rn, N - 1)  # rows past N read row N - 1 (not stored)
        rb = tl.arange(0, STEP)
        rj = tl.arange(0, SLICE)
        acc = tl.zeros((BLOCK_N, STEP, SLICE), dtype=tl.float32)
        for b0 in range(0, BLOCKS, STEP):
            blk = pid_k * BLOCKS + b0 + rb
            w = tl.load(w_ptr + rw[:, None, None] * (K // 8) + blk[None, :, None] * SLICE + rj[None, None, :])
            high = w >> 12
            part = tl.zeros((BLOCK_N, STEP, SLICE), dtype=tl.float32)
            for i in tl.static_range(8):
                if i < 5:
                    src, shift = w, 4 * i
                else:
                    src, shift = high, 4 * i - 12
                wi = ((src & (0xF << shift)) | exponent).to(tl.float32, bitcast=True) - (
                    8388608.0 + 8.0 * (1 << shift))
                kk = blk[:, None] * BLOCK_K + i * SLICE + rj[None, :]
                xi = tl.load(x_ptr + kk).to(tl.float32) * (1.0 / (1 << shift))
                part += wi * xi[None, :, :]
                if (i + 1) % SLICES_PER_GROUP == 0 or i == 7:  # the end of a group (or of the block)
                    g = (blk * BLOCK_K + i * SLICE) // GROUP
                    s = tl.load(st_ptr + g[None, :] * N + rw[:, None])
                    acc += part * s[:, :, None]
                    part = tl.zeros((BLOCK_N, STEP, SLICE), dtype=tl.float32)
        tl.store(y_ptr + pid_k * N + rn, tl.sum(tl.sum(acc, axis=2), axis=1), mask=n_ok)

    @triton.jit
    def _w8_gemv_kernel(x_ptr, w_ptr, y_ptr, N, K: tl.constexpr, SPLIT_K: tl.constexpr, DOT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # one activation row x [K] (8-bit, quantized by the caller), 8-bit weights [N, K] row-major: split k's
        # partial dot products [SPLIT_K, N] in fp32, scaled and summed by the caller
        CHUNK: tl.constexpr = K // SPLIT_K
        INT8: tl.constexpr = w_ptr.dtype.element_ty == tl.int8
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        rw = tl.minimum(rn, N - 1)  # rows past N read row N - 1 (not stored): no masked fp8 loads
        rk = tl.arange(0, BLOCK_K)
        rm = tl.arange(0, 16)
        if DOT:
            acc = tl.zeros((16, BLOCK_N), dtype=tl.int32 if INT8 else tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, CHUNK, BLOCK_K):
            kk = pid_k * CHUNK + k0 + rk
            w = tl.load(w_ptr + rw[:, None] * K + kk[None, :])
            if DOT:  # the row repeated 16 times (the dot's smallest M): tensor cores on the 8-bit operands as stored
                acc += tl.dot(tl.load(x_ptr + rm[:, None] * 0 + kk[None, :]), tl.trans(w))
            elif INT8:  # int8 -> fp32 by the bit trick (v + 128) | bits(2**23), minus 2**23 + 128: exact
                wf = (((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0)
                acc += wf * tl.load(x_ptr + kk).to(tl.float32)[None, :]
            else:
                acc += w.to(tl.float32) * tl.load(x_ptr + kk).to(tl.float32)[None, :]
        if DOT:  # noqa: SIM108 - a Triton constexpr branch
            part = tl.sum(tl.where((rm == 0)[:, None], acc.to(tl.float32), 0.0), axis=0)
        else:
            part = tl.sum(acc, axis=1)
        tl.store(y_ptr + pid_k * N + rn, part, mask=n_ok)


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


def launch_w4(x: torch.Tensor, w: torch.Tensor, w_scale_t: torch.Tensor, group_size: int,
              cfg: W4Config | None = None) -> torch.Tensor:
    """The kernel's partial sums [split_k, M, N] under `cfg` (default: w4_config's; bench/w4a16_tune.py sets it);
    w in pack_int4_w4's layout, w_scale_t the fp32 group scales transposed [K/group, N]."""
    m, k = x.shape
    n = w.shape[0]
    cfg = cfg or w4_config(m, n, k)
    if (k // W4_BLOCK_K) % cfg.split_k or m > MAX_M:
        raise ValueError(f"W4A16 config {cfg} does not fit K = {k}, M = {m} (fit_w4_config makes it fit K)")
    y = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    if cfg.gemv:
        if m != 1 or (k // W4_BLOCK_K // cfg.split_k) % cfg.step_blocks:
            raise ValueError(f"W4A16 GEMV config {cfg} takes M = 1 and step_blocks dividing a split (M = {m}, "
                             f"K = {k}; fit_w4_config makes it fit K)")
        _w4_gemv_kernel[grid](x, w, w_scale_t, y, n, _FP32_EXPONENT_2_23, k, GROUP=group_size, SPLIT_K=cfg.split_k,
                              BLOCK_N=cfg.block_n, STEP=cfg.step_blocks, BLOCK_K=W4_BLOCK_K, num_warps=cfg.warps,
                              num_stages=cfg.stages)
        return y
    _w4_kernel[grid](x, w, w_scale_t, y, m, n, k, x.stride(0), GROUP=group_size, SPLIT_K=cfg.split_k,
                     BLOCK_N=cfg.block_n, BLOCK_K=W4_BLOCK_K, num_warps=cfg.warps, num_stages=cfg.stages)
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


@torch.library.custom_op("quantkit::w4_gemm_partials", mutates_args=())
def w4_gemm_partials(x: torch.Tensor, w: torch.Tensor, w_scale_t: torch.Tensor, group_size: int) -> torch.Tensor:
    """fp32 partial products [split_k, M, N] of x @ dequant(w)^T (w in pack_int4_w4's layout, fp32 group scales
    transposed [K/group, N]): the caller sums them, so that under torch.compile the sum and the cast fuse into
    what follows."""
    return launch_w4(x.contiguous(), w, w_scale_t, group_size)


@w4_gemm_partials.register_fake
def _(x, w, w_scale_t, group_size):
    m, k = x.shape
    return x.new_empty((w4_config(m, w.shape[0], k).split_k, m, w.shape[0]), dtype=torch.float32)


def w4_gemm(x: torch.Tensor, w: torch.Tensor, w_scale_t: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = x @ dequant(w)^T in x's dtype (see w4_gemm_partials); x already multiplied by any pre-quant scale."""
    parts = w4_gemm_partials(x, w, w_scale_t, group_size)
    return (parts[0] if parts.shape[0] == 1 else parts.sum(0)).to(x.dtype)


def launch_w8_gemv(x: torch.Tensor, w: torch.Tensor, cfg: W8Config | None = None) -> torch.Tensor:
    """The GEMV's partial sums [split_k, N] (fp32, unscaled) of one 8-bit row x [1, K] against w [N, K]."""
    n, k = w.shape
    cfg = cfg or w8_config(w8_weight_kind(w), n, k)
    if k % (cfg.split_k * cfg.block_k):
        raise ValueError(f"8-bit GEMV config {cfg} does not fit K = {k} (fit_w8_config makes it fit)")
    y = torch.empty((cfg.split_k, n), dtype=torch.float32, device=x.device)
    _w8_gemv_kernel[(triton.cdiv(n, cfg.block_n), cfg.split_k)](
        x, w, y, n, k, SPLIT_K=cfg.split_k, DOT=cfg.dot, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.warps, num_stages=cfg.stages)
    return y


@torch.library.custom_op("quantkit::w8_gemv_partials", mutates_args=())
def w8_gemv_partials(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Split-K partial dot products [split_k, N] fp32 of an 8-bit activation row x [1, K] (int8 or fp8 E4M3, as
    quantized by the caller) with 8-bit weights w [N, K] of the same kind; the caller sums them and applies the
    scales, so that under torch.compile both fuse into what follows."""
    return launch_w8_gemv(x.contiguous(), w)


@w8_gemv_partials.register_fake
def _(x, w):
    return x.new_empty((w8_config(w8_weight_kind(w), w.shape[0], w.shape[1]).split_k, w.shape[0]),
                       dtype=torch.float32)


def w4_supported(in_features: int, group_size: int) -> bool:
    """The kernel reads blocks of 128 k in slices of 16 (the tensor-core dot's smallest K), each slice inside one
    group: K a multiple of 128, the group a multiple of 16 that divides 128 or is a multiple of it."""
    return (in_features % W4_BLOCK_K == 0 and group_size % _W4_SLICE == 0 and in_features % group_size == 0
            and (W4_BLOCK_K % group_size == 0 or group_size % W4_BLOCK_K == 0))


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
