"""Tune quantkit's 8-bit GEMV (quantkit/kernels/triton_gemm.py `w8_gemv_partials`, M = 1) on the decode GEMMs of
Llama-3.1-8B against gemlite's A8W8 GEMV and bf16 cuBLAS, and write the fastest launch settings per weight kind
(fp8 E4M3, int8) and shape to quantkit/kernels/w8_gemv_configs.json (GPU only; gemlite carried, bench/gpu_stage.sh).

Shapes, timing and the L2-defeating weight copies are bench/w4a16_tune.py's. The runtime takes the GEMV at M = 1
only where this table measured it faster than gemlite on that shape (runtime.QuantLinear._plan). Every winner is
checked against the float64 product of the same 8-bit values (rel err < 1e-4). Times are the kernel alone; the
caller's split-K sum and scaling fuse into the next kernel under torch.compile (gemlite's epilogue scales in-kernel).

    python bench/w8_tune.py [--kinds fp8,int8] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from w4a16_tune import L2_DEFEAT_BYTES, SHAPES, report, search, timer

from quantkit.kernels import libs
from quantkit.kernels import triton_gemm as tg


def candidates(n: int, k: int) -> list[tg.W8Config]:
    """First pass: tile shapes and splits of both paths at 4 warps / 3 stages."""
    out = []
    for dot, bns, bks in [(False, (8, 16, 32), (256, 512)), (True, (32, 64, 128), (128, 256))]:
        for bn, bk, split in itertools.product(bns, bks, (1, 2, 4, 8)):
            if not 132 <= -(-n // bn) * split <= 132 * 16:
                continue
            cfg = tg.fit_w8_config(tg.W8Config(split, dot, bn, bk, 4, 3), k)
            if cfg.block_k == bk and cfg.split_k == split and cfg not in out:
                out.append(cfg)
    return out


def refinements(best: list[tg.W8Config]) -> list[tg.W8Config]:
    return [replace(c, warps=w, stages=s) for c in best for w, s in itertools.product((4, 8), (2, 3, 4, 5))
            if (w, s) != (c.warps, c.stages)]


def weights(kind: str, n: int, k: int, g: torch.Generator, dev: torch.device) -> torch.Tensor:
    if kind == "int8":
        return torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
    return (torch.randn(n, k, device=dev, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)


def tune_shape(kind: str, n: int, k: int, top: int, dev: torch.device, gemlite) -> tuple:
    """(best config, its us, gemlite us, bf16 us, configs tried) for one kind and shape at M = 1."""
    g = torch.Generator(device=dev).manual_seed(0)
    copies = max(2, -(-L2_DEFEAT_BYTES // (n * k)))
    ws = [weights(kind, n, k, g, dev) for _ in range(copies)]
    x = weights(kind, 1, k, g, dev)
    scales = torch.rand(n, 1, device=dev, generator=g) * 1e-3 + 1e-4
    lay = [libs.build_a8w8(gemlite, w, scales, torch.bfloat16) for w in ws]
    dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(max(2, copies // 2))]
    xb = torch.randn(1, k, device=dev, dtype=torch.bfloat16, generator=g)
    bf16_us = timer(lambda i: torch.nn.functional.linear(xb, dense[i]), len(dense))
    gem_us = timer(lambda i: libs.gemlite_gemm(x, lay[i].tensors, lay[i].meta, torch.bfloat16), copies)
    results = search(candidates(n, k), refinements, top, f"{kind} {n}x{k}",
                     lambda c: timer(lambda i: tg.launch_w8_gemv(x, ws[i], c), copies))
    best = min(results, key=results.get)
    got = tg.launch_w8_gemv(x, ws[0], best).double().sum(0)
    ref = (x.double() @ ws[0].double().t())[0]
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-4, (kind, n, k, best, err)
    return best, results[best], gem_us, bf16_us, len(results)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="fp8,int8")
    ap.add_argument("--write", action="store_true", help="write the winners to quantkit/kernels/w8_gemv_configs.json")
    ap.add_argument("--top", type=int, default=2, help="first-pass winners refined by warps / stages")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gemlite = libs.library(libs.GEMLITE, dev).module
    if gemlite is None:
        sys.exit("gemlite is not installed here: the table compares against it")
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; gemlite {libs.version(libs.GEMLITE)}")
    table: dict[str, dict[str, dict]] = {}
    lines = ["| kind | N x K | best config (split, path, block n x k, warps, stages) | GEMV us | gemlite us | bf16 us "
             "| vs gemlite | vs bf16 | GB/s | tried |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in args.kinds.split(","):
        for n, k in SHAPES:
            best, us, gem_us, bf16_us, tried = tune_shape(kind, n, k, args.top, dev, gemlite)
            table.setdefault(kind, {})[f"{n}x{k}"] = {"config": asdict(best), "us": round(us, 1),
                                                      "gemlite_us": round(gem_us, 1)}
            lines.append(f"| {kind} | {n} x {k} | {best.split_k}, {'dot' if best.dot else 'fma'}, {best.block_n} x "
                         f"{best.block_k}, {best.warps}, {best.stages} | {us:.1f} | {gem_us:.1f} | {bf16_us:.1f} | "
                         f"{gem_us / us:.2f}x | {bf16_us / us:.2f}x | {n * k / us / 1e3:.0f} | {tried} |")
            print(lines[-1], f"[{time.perf_counter() - t0:.0f} s]", flush=True)
            torch.cuda.empty_cache()
    report(lines, table, tg.W8_CONFIG_FILE, args.write)


if __name__ == "__main__":
    main()
