"""Tune quantkit's Triton W4A16 kernel (quantkit/kernels/triton_gemm.py) on the decode GEMMs of Llama-3.1-8B and
write the fastest launch settings per shape to quantkit/kernels/w4a16_configs.json (GPU only).

Shapes: the projections the benchmarked model runs (fused q/k/v 6144x4096, o 4096x4096, fused gate/up 28672x4096,
down 4096x14336); other shapes run the kernel's default settings and tinygemm. Regimes: M = 1
("m1": fp32-FMA and tensor-core paths both tried) and M = 8 ("decode", tensor-core path; it serves M = 2..16).
Each candidate runs as a CUDA-graph replay over enough weight copies that no call is served from L2 (median,
triton.testing.do_bench_cudagraph), next to tinygemm (aten._weight_int4pack_mm, quantkit's M = 1 kernel) and bf16
cuBLAS on the same shape; every winner is checked against the dequantized weight (rel err < 1e-2).

    python bench/w4a16_tune.py [--m 1,8] [--group 128] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.kernels import triton_gemm as tg
from quantkit.runtime import _tinygemm_pack

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K)
L2_DEFEAT_BYTES = 256 * 2**20  # weight bytes rotated per timed replay (H200 L2: 50 MB)


def candidates(m: int, n: int, k: int) -> list[tg.W4Config]:
    """First pass: tile shapes and splits at 4 warps / 3 stages."""
    words = k // 8
    out = []
    splits = [s for s in (1, 2, 4, 8) if words % s == 0]
    paths = [(False, (4, 8, 16, 32), (32, 64, 128)), (True, (16, 32), (16, 32))] if m == 1 else \
        [(True, (16, 32, 64), (16, 32, 64))]
    for dot, bns, bjs in paths:
        for bn, bj, split in itertools.product(bns, bjs, splits):
            programs = -(-n // bn) * split
            if not 132 <= programs <= 132 * 16:  # at least one program per SM, not thousands of tiny ones
                continue
            cfg = tg.fit_w4_config(tg.W4Config(split, dot, bn, bj, 4, 3), k)
            if cfg.block_j == bj and cfg.split_k == split and cfg not in out:
                out.append(cfg)
    return out


def refinements(best: list[tg.W4Config]) -> list[tg.W4Config]:
    """Second pass: warps and pipeline stages of the first pass's best few."""
    return [replace(c, warps=w, stages=s) for c in best for w, s in itertools.product((4, 8), (2, 3, 4))
            if (w, s) != (c.warps, c.stages)]


def timer(fn, copies: int):
    from triton.testing import do_bench_cudagraph

    def run():
        for i in range(copies):
            fn(i)

    return do_bench_cudagraph(run, rep=50) * 1e3 / copies  # us per call


def search(first: list, refine: Callable[[list], list], top: int, label: str, measure: Callable[[Any], float]
           ) -> dict[Any, float]:
    """{config: us}: every first-pass config timed, then `refine` of the `top` fastest; a config that does not
    compile (registers, shared memory) is reported and skipped."""
    results: dict[Any, float] = {}
    for stage in (1, 2):
        for cfg in first if stage == 1 else refine(sorted(results, key=results.get)[:top]):
            if cfg in results:
                continue
            try:
                results[cfg] = measure(cfg)
            except Exception as exc:
                print(f"  {label} {cfg}: {type(exc).__name__}", flush=True)
    return results


def report(lines: list[str], table: dict, path: Path, write: bool) -> None:
    """Print the markdown table; with `write`, the winners to the runtime's config file."""
    print("\n" + "\n".join(lines))
    if write:
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {path}")


def tune_shape(n: int, k: int, ms: list[int], group: int, top: int, dev: torch.device
               ) -> list[tuple[int, tg.W4Config, float, float, float, int]]:
    """(M, best config, its us, tinygemm us, bf16 us, configs tried) per M for one shape."""
    g = torch.Generator(device=dev).manual_seed(0)
    copies = max(2, -(-L2_DEFEAT_BYTES // (n * k // 2)))
    q = [torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=g) for _ in range(copies)]
    scales = [torch.rand(n, k // group, device=dev, generator=g) * 1e-2 + 1e-3 for _ in range(copies)]
    packed = [tg.pack_int4_k(t) for t in q]
    tiny = [_tinygemm_pack(t, s, group)[:2] for t, s in zip(q, scales, strict=True)]
    dense = [(t.float() * s.repeat_interleave(group, 1)).to(torch.bfloat16) for t, s in zip(q, scales, strict=True)]
    out = []
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        bf16_us = timer(lambda i, x=x: torch.nn.functional.linear(x, dense[i]), copies)
        tiny_us = timer(lambda i, x=x: torch.ops.aten._weight_int4pack_mm(x, tiny[i][0], group, tiny[i][1]), copies)
        results = search(candidates(m, n, k), refinements, top, f"{n}x{k} M={m}",
                         lambda c, x=x: timer(lambda i: tg.launch_w4(x, packed[i], scales[i], group, c), copies))
        if not results:
            print(f"  {n}x{k} M={m}: no config ran", flush=True)
            continue
        best = min(results, key=results.get)
        got = tg.launch_w4(x, packed[0], scales[0], group, best).sum(0)
        ref = x.float() @ dense[0].float().t()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (n, k, m, best, err)
        out.append((m, best, results[best], tiny_us, bf16_us, len(results)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,8")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--write", action="store_true", help="write the winners to quantkit/kernels/w4a16_configs.json")
    ap.add_argument("--top", type=int, default=2, help="first-pass winners refined by warps / stages")
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; group {args.group}", flush=True)
    table: dict[str, dict[str, dict]] = {"m1": {}, "decode": {}}
    lines = ["| N x K | M | best config (split, dot, block n x words, warps, stages) | W4A16 us | tinygemm us | "
             "bf16 us | vs tinygemm | vs bf16 | tried |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for n, k in SHAPES:
        for m, best, us, tiny_us, bf16_us, tried in tune_shape(n, k, [int(v) for v in args.m.split(",")],
                                                               args.group, args.top, dev):
            table[tg.w4_regime(m)][f"{n}x{k}"] = {"config": asdict(best), "us": round(us, 1),
                                                 "tinygemm_us": round(tiny_us, 1)}
            lines.append(f"| {n} x {k} | {m} | {best.split_k}, {'dot' if best.dot else 'fma'}, {best.block_n} x "
                         f"{best.block_j}, {best.warps}, {best.stages} | {us:.1f} | {tiny_us:.1f} | {bf16_us:.1f} | "
                         f"{tiny_us / us:.2f}x | {bf16_us / us:.2f}x | {tried} |")
            print(lines[-1], f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        torch.cuda.empty_cache()
    report(lines, table, tg.W4_CONFIG_FILE, args.write)


if __name__ == "__main__":
    main()
