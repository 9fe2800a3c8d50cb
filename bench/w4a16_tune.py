"""Tune quantkit's Triton W4A16 kernel (quantkit/kernels/triton_gemm.py) on the decode GEMMs of Llama-3.1-8B and
write the fastest launch settings per shape to quantkit/kernels/w4a16_configs.json (GPU only).

Shapes: the projections the benchmarked model runs (fused q/k/v 6144x4096, o 4096x4096, fused gate/up 28672x4096,
down 4096x14336); other shapes run the kernel's default settings and tinygemm. Regimes: M = 1 ("m1") and M = 8
("decode"; it serves M = 2..16). Each candidate runs as a CUDA-graph replay over enough weight copies that no call
is served from L2 (median, triton.testing.do_bench_cudagraph), next to tinygemm (aten._weight_int4pack_mm), gemlite's
A16W4 (where gemlite is installed: quantkit's layout of it, kernels/libs.py) and bf16 cuBLAS on the same shape;
every winner is checked against the dequantized weight (rel err < 1e-2). At M = 1 the candidates include the
FMA GEMV on the same layout (`W4Config.gemv`), so the table's M = 1 row is whichever of the two kernels won.
`--write` replaces only the rows measured (`--m 1` keeps the "decode" rows).

    python bench/w4a16_tune.py [--m 1,8] [--group 128] [--shapes NxK,...] [--write]
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
    """First pass: tile heights and splits at 4 warps (8 for the tallest tiles) / 3 stages; at M = 1 also the
    GEMV's tile heights x blocks per step (at most 512 rows x blocks: registers)."""
    blocks = k // tg.W4_BLOCK_K
    shapes = [(bn, 1, False) for bn in (64, 128, 256)]
    if m == 1:
        shapes += [(bn, step, True) for bn, step in itertools.product((32, 64, 128, 256), (1, 2, 4))
                   if bn * step <= 512]
    out = []
    for (bn, step, gemv), split in itertools.product(shapes, (1, 2, 4, 8, 16)):
        programs = -(-n // bn) * split
        if blocks % split or blocks // split % step or not 132 <= programs <= 132 * 16:  # >= 1 program per SM
            continue
        cfg = tg.W4Config(split, bn, 8 if bn == 256 else 4, 3, gemv, step)
        if cfg not in out:
            out.append(cfg)
    return out


def refinements(best: list[tg.W4Config]) -> list[tg.W4Config]:
    """Second pass: warps and pipeline stages of the first pass's best few."""
    return [replace(c, warps=w, stages=s) for c in best for w, s in itertools.product((4, 8), (1, 2, 3, 4, 5))
            if (w, s) != (c.warps, c.stages) and (s > 1 or c.gemv)]


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
    """Print the markdown table; with `write`, the winners into the runtime's config file (rows of other regimes
    and shapes stay as they were measured)."""
    print("\n" + "\n".join(lines))
    if write:
        merged = json.loads(path.read_text()) if path.exists() else {}
        for group, rows in table.items():
            merged.setdefault(group, {}).update(rows)
        path.write_text(json.dumps(merged, indent=1) + "\n")
        print(f"wrote {path}")


def gemlite_rival(qs: list[torch.Tensor], scales: list[torch.Tensor], group: int) -> list[Any] | None:
    """gemlite's A16W4 layers of the same weights (kernels/libs.py's mapping), or None where gemlite is absent."""
    from quantkit.kernels import libs

    lib = libs.library(libs.GEMLITE, torch.device("cuda"))
    if lib.module is None:
        print(f"  gemlite not used: {lib.reason}")
        return None
    return [libs.build_a16w4(lib.module, q, s, group, torch.bfloat16) for q, s in zip(qs, scales, strict=True)]


def tune_shape(n: int, k: int, ms: list[int], group: int, top: int, dev: torch.device) -> list[dict[str, Any]]:
    """Per M for one shape: the best config, its us, the rivals' us and how many configs ran."""
    from quantkit.kernels import libs

    g = torch.Generator(device=dev).manual_seed(0)
    copies = max(2, -(-L2_DEFEAT_BYTES // (n * k // 2)))
    q = [torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=g) for _ in range(copies)]
    scales = [torch.rand(n, k // group, device=dev, generator=g) * 1e-2 + 1e-3 for _ in range(copies)]
    packed = [tg.pack_int4_w4(t) for t in q]
    scales_t = [s.t().contiguous() for s in scales]
    tiny = [_tinygemm_pack(t, s, group)[:2] for t, s in zip(q, scales, strict=True)]
    dense = [(t.float() * s.repeat_interleave(group, 1)).to(torch.bfloat16) for t, s in zip(q, scales, strict=True)]
    gem = gemlite_rival(q, scales, group)
    out = []
    for m in ms:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        bf16_us = timer(lambda i, x=x: torch.nn.functional.linear(x, dense[i]), copies)
        tiny_us = timer(lambda i, x=x: torch.ops.aten._weight_int4pack_mm(x, tiny[i][0], group, tiny[i][1]), copies)
        gem_us = None if gem is None else timer(
            lambda i, x=x: libs.gemlite_gemm(x, gem[i].tensors, gem[i].meta, torch.bfloat16), copies)
        results = search(candidates(m, n, k), refinements, top, f"{n}x{k} M={m}",
                         lambda c, x=x: timer(lambda i: tg.launch_w4(x, packed[i], scales_t[i], group, c), copies))
        if not results:
            print(f"  {n}x{k} M={m}: no config ran", flush=True)
            continue
        best = min(results, key=results.get)
        got = tg.launch_w4(x, packed[0], scales_t[0], group, best).sum(0)
        ref = x.float() @ dense[0].float().t()
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (n, k, m, best, err)
        out.append({"m": m, "best": best, "us": results[best], "tinygemm_us": tiny_us, "gemlite_us": gem_us,
                    "bf16_us": bf16_us, "tried": len(results)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,8")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--shapes", default="", help="only these NxK shapes (comma-separated)")
    ap.add_argument("--write", action="store_true", help="write the winners to quantkit/kernels/w4a16_configs.json")
    ap.add_argument("--top", type=int, default=2, help="first-pass winners refined by warps / stages")
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; group {args.group}", flush=True)
    table: dict[str, dict[str, dict]] = {"m1": {}, "decode": {}}
    lines = ["| N x K | M | best config (kernel: split, block n, warps, stages) | W4A16 us | tinygemm us | "
             "gemlite A16W4 us | bf16 us | vs tinygemm | vs gemlite | vs bf16 | GB/s | tried |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    for n, k in shapes:
        for r in tune_shape(n, k, [int(v) for v in args.m.split(",")], args.group, args.top, dev):
            best, us = r["best"], r["us"]
            row = {"config": asdict(best), "us": round(us, 1), "tinygemm_us": round(r["tinygemm_us"], 1)}
            if r["gemlite_us"] is not None:
                row["gemlite_us"] = round(r["gemlite_us"], 1)
            table[tg.w4_regime(r["m"])][f"{n}x{k}"] = row
            gem = "-" if r["gemlite_us"] is None else f"{r['gemlite_us']:.1f}"
            vs_gem = "-" if r["gemlite_us"] is None else f"{r['gemlite_us'] / us:.2f}x"
            gbs = (n * k // 2 + n * (k // args.group) * 4) / us / 1e3
            kind = f"GEMV x{best.step_blocks}" if best.gemv else "tensor cores"
            lines.append(f"| {n} x {k} | {r['m']} | {kind}: {best.split_k}, {best.block_n}, {best.warps}, "
                         f"{best.stages} | "
                         f"{us:.1f} | {r['tinygemm_us']:.1f} | {gem} | {r['bf16_us']:.1f} | "
                         f"{r['tinygemm_us'] / us:.2f}x | {vs_gem} | {r['bf16_us'] / us:.2f}x | {gbs:.0f} | "
                         f"{r['tried']} |")
            print(lines[-1], f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        torch.cuda.empty_cache()
    report(lines, table, tg.W4_CONFIG_FILE, args.write)


if __name__ == "__main__":
    main()
