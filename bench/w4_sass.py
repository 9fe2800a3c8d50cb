"""What quantkit's W4A16 GEMV (kernels/triton_gemm.py `_w4_gemv_kernel`) compiles to for an H100 / H200 (sm_90),
without a GPU: Triton compiles it offline and the cuobjdump bundled with Triton's wheel disassembles the cubin.
Per launch setting it prints the registers, spills, and the SASS of the main loop: instructions per weight (the
kernel is issue-bound near 4 per weight at M = 1: one logic op, one add and one FMA per weight plus x and address
work), and barriers (a layout conversion through shared memory).

An instruction count is not a speed; bench/w4a16_tune.py on the GPU decides.

    python bench/w4_sass.py [--k 4096] [--split 4] [--group 128]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quantkit.kernels import triton_gemm as tg

# (BLOCK_N, blocks per step, warps): the tune script's GEMV tile heights, at its first-pass warps and the others
SETTINGS = [(32, 4, 4), (64, 2, 4), (64, 4, 4), (128, 1, 4), (128, 2, 4), (128, 4, 8), (256, 1, 4), (256, 1, 8),
            (256, 2, 8)]
WORDS_PER_BLOCK = tg.W4_BLOCK_K // 8


def compile_gemv(k: int, split: int, group: int, block_n: int, step: int, warps: int, stages: int = 3):
    sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "st_ptr": "*fp32", "y_ptr": "*fp32", "N": "i32", "exponent": "i32",
           **{name: "constexpr" for name in ("K", "GROUP", "SPLIT_K", "BLOCK_N", "STEP", "BLOCK_K")}}
    const = {"K": k, "GROUP": group, "SPLIT_K": split, "BLOCK_N": block_n, "STEP": step, "BLOCK_K": tg.W4_BLOCK_K}
    # pointers and N 16-byte aligned / divisible by 16, as Triton specializes them at a launch on 8B shapes
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    return triton.compile(ASTSource(tg._w4_gemv_kernel, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def main_loop(sass: str) -> list[str]:
    """The instructions from the target of the last backward conditional branch to that branch."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    back = [(a, i) for a, i in ins if i.startswith("@") and "BRA" in i and int(i.split()[-1], 16) < a]
    if not back:
        raise RuntimeError("no loop found in the SASS")
    end, branch = back[-1]
    start = int(branch.split()[-1], 16)
    return [i for a, i in ins if start <= a <= end]


def opcode(instruction: str) -> str:
    return (instruction.split()[1] if instruction.startswith("@") else instruction.split()[0]).split(".")[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--split", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    print(f"triton {triton.__version__}, sm_90, K {args.k}, split {args.split}, group {args.group}\n")
    print("| BLOCK_N | blocks / step | warps | registers | stack (spills) | loop instructions | per weight | "
          "barriers | top opcodes |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for block_n, step, warps in SETTINGS:
        if (args.k // tg.W4_BLOCK_K) % args.split or (args.k // tg.W4_BLOCK_K // args.split) % step:
            continue  # the launcher refuses it (fit_w4_config would change it)
        ck = compile_gemv(args.k, args.split, args.group, block_n, step, warps)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            Path(cubin).write_bytes(ck.asm["cubin"])
            sass = subprocess.run([str(cuobjdump), "-sass", cubin], capture_output=True, text=True, check=True).stdout
            usage = subprocess.run([str(cuobjdump), "-res-usage", cubin], capture_output=True, text=True,
                                   check=True).stdout
        regs = re.search(r"REG:(\d+)", usage).group(1)
        stack = re.search(r"STACK:(\d+)", usage).group(1)  # spilled registers live on the stack
        loop = main_loop(sass)
        ops = collections.Counter(opcode(i) for i in loop)
        weights = block_n * step * WORDS_PER_BLOCK * 8 // (warps * 32)  # per thread per loop step
        top = ", ".join(f"{op} {n}" for op, n in ops.most_common(5))
        print(f"| {block_n} | {step} | {warps} | {regs} | {stack} B | {len(loop)} | "
              f"{len(loop) / weights:.2f} | {ops['BAR']} | {top} |")


if __name__ == "__main__":
    main()
