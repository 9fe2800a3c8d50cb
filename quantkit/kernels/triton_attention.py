"""Decode attention (one query token per sequence) over a static KV cache, split along the cache, in Triton.

Why our own kernel: at decode the step attends one token to the whole static cache. PyTorch's SDPA with a mask
runs the memory-efficient kernel with one program per (batch, K/V head) once the query heads of a group are folded
into the query axis (runtime.gqa_sdpa_attention): 8 programs for Llama-3-8B at batch 1, each streaming 1152 keys
and values: against this kernel the bf16 Llama-3.1-8B step on an H200 took 0.70 ms longer (5.51 vs 4.81 ms, 22 us
per layer; bench/RESULTS.md). FlexAttention compiled into the layer ran its prefill template for a single query,
60 us per layer (the same section). This is
flash-decoding: the cache length is split over many programs, each computing its chunk's softmax statistics
(running max m, sum l) and weighted values for the G query heads of one K/V head (a tensor-core dot with G padded to
16, so each K/V head is read once per group); `decode_attention` combines the chunks with torch ops, which
torch.compile fuses into the surrounding graph. A chunk whose mask is all False reads no K/V at all (the unused
tail of the static cache).

Runs under TRITON_INTERPRET=1 on CPU (float32) for the tests, like kernels/triton_gemm.py.
"""

from __future__ import annotations

import torch

from quantkit.kernels.triton_gemm import HAVE_TRITON

if HAVE_TRITON:
    import triton
    import triton.language as tl

BLOCK_L = 64  # cache positions per inner step
MAX_GROUP = 16  # query heads per K/V head the kernel takes (the dot's padded M)
TARGET_PROGRAMS = 256  # about two per SM of a large GPU


if HAVE_TRITON:

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, acc_ptr, ml_ptr, L, HKV, scale,
                       sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_l,
                       G: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr,
                       BLOCK_G: tl.constexpr, BLOCK: tl.constexpr):
        bh = tl.program_id(0)  # batch * HKV + kv head
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        rg = tl.arange(0, BLOCK_G)
        rd = tl.arange(0, D)
        g_ok = rg < G
        q = tl.load(q_ptr + b * sq_b + (h * G + rg)[:, None] * sq_h + rd[None, :], mask=g_ok[:, None], other=0.0)
        m = tl.full((BLOCK_G,), -1.0e30, tl.float32)  # finite: a fully masked chunk keeps m and gives p = 0
        lsum = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        for start in range(0, CHUNK, BLOCK):
            pos = split * CHUNK + start + tl.arange(0, BLOCK)
            keep = tl.load(mask_ptr + b * sm_b + pos * sm_l, mask=pos < L, other=0) != 0
            if tl.max(keep.to(tl.int32), axis=0) > 0:
                k = tl.load(k_ptr + b * sk_b + h * sk_h + pos[:, None] * sk_l + rd[None, :], mask=keep[:, None],
                            other=0.0)
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
                s = tl.where(keep[None, :], s, -float("inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(s - m_new[:, None])
                lsum = lsum * alpha + tl.sum(p, axis=1)
                v = tl.load(v_ptr + b * sv_b + h * sv_h + pos[:, None] * sv_l + rd[None, :], mask=keep[:, None],
                            other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
                m = m_new
        # partials: acc [B*HKV, SPLITS, G, D], (m, l) [B*HKV, SPLITS, 2, G]
        base = (bh * SPLITS + split) * G
        tl.store(acc_ptr + (base + rg)[:, None] * D + rd[None, :], acc, mask=g_ok[:, None])
        tl.store(ml_ptr + (bh * SPLITS + split) * 2 * G + rg, m, mask=g_ok)
        tl.store(ml_ptr + (bh * SPLITS + split) * 2 * G + G + rg, lsum, mask=g_ok)


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """One query token, a power-of-two head size, at most MAX_GROUP query heads per K/V head."""
    d = query.shape[-1]
    hq, hkv = query.shape[1], key.shape[1]
    return (HAVE_TRITON and query.shape[2] == 1 and d >= 16 and d & (d - 1) == 0 and hq % hkv == 0
            and hq // hkv <= MAX_GROUP and key.shape[-1] == d)


def chunking(batch: int, kv_heads: int, length: int) -> tuple[int, int]:
    """(positions per program, programs per sequence and K/V head): enough programs to fill the GPU."""
    splits = max(1, TARGET_PROGRAMS // (batch * kv_heads))
    chunk = BLOCK_L * max(1, -(-length // (BLOCK_L * splits)))
    return chunk, -(-length // chunk)


@torch.library.custom_op("quantkit::decode_attention_partials", mutates_args=())
def decode_attention_partials(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cache chunk: weighted values [B, HKV, S, G, D] and softmax statistics [B, HKV, S, 2, G] (max, sum)."""
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    g = hq // hkv
    chunk, splits = chunking(b, hkv, length)
    acc = torch.empty((b, hkv, splits, g, d), dtype=torch.float32, device=query.device)
    ml = torch.empty((b, hkv, splits, 2, g), dtype=torch.float32, device=query.device)
    mask = keep if keep.dtype != torch.bool else keep.view(torch.int8)  # same bytes, no conversion kernel
    _decode_kernel[(b * hkv, splits)](
        query, key, value, mask, acc, ml, length, hkv, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0), mask.stride(1),
        G=g, D=d, CHUNK=chunk, SPLITS=splits, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK=BLOCK_L,
        num_warps=4, num_stages=2)
    return acc, ml


@decode_attention_partials.register_fake
def _(query, key, value, keep, scale):
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    _, splits = chunking(b, hkv, key.shape[2])
    g = hq // hkv
    return (query.new_empty((b, hkv, splits, g, d), dtype=torch.float32),
            query.new_empty((b, hkv, splits, 2, g), dtype=torch.float32))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked by keep [B, L]) v for one query token: query [B, HQ, 1, D], key / value
    [B, HKV, L, D] (query head i uses K/V head i // (HQ / HKV)); returns [B, HQ, 1, D] in query's dtype."""
    acc, ml = decode_attention_partials(query, key, value, keep, scale)
    m, lsum = ml[:, :, :, 0], ml[:, :, :, 1]  # [B, HKV, S, G]
    top = m.amax(dim=2, keepdim=True)
    w = torch.exp(m - top)  # chunks with nothing to attend have m = -1e30: weight 0
    out = (acc * w[..., None]).sum(2) / (lsum * w).sum(2)[..., None]  # [B, HKV, G, D]
    b, hkv, g, d = out.shape
    return out.reshape(b, hkv * g, 1, d).to(query.dtype)
