"""MMLU (5-shot) and the GSM8K generation task for the shipped recipes on the bundled model: the columns
eval/RESULTS.md gains. Each recipe runs through `quantkit run` (quantize, export, check, evaluate) into its own
run folder, with only the evaluate section replaced; then one comparison table (deltas ± stderr, `~` within noise).

Usage (GPU): python3 bench/eval_tasks.py [--out /tmp/quantkit-eval-tasks] [--recipes baseline int8_sq int4_awq fp8]
             [--mmlu-limit N] [--gsm8k-limit 500] [--max-gen-toks 256] [--batch-size 64]
Expected on one H200 for the four recipes: ~5-7 minutes (MMLU 14,042 questions 5-shot and 500 GSM8K problems
per recipe). On a CPU, check that it runs with: --recipes baseline --mmlu-limit 1 --gsm8k-limit 2 --max-gen-toks 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quantkit.pipeline import RunCache, run_recipe
from quantkit.recipe import EvaluateSection, load_recipe
from quantkit.report import compare_table, load_runs

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/quantkit-eval-tasks", help="parent folder of the run folders")
    ap.add_argument("--recipes", nargs="+", default=["baseline", "int8_sq", "int4_awq", "fp8"])
    ap.add_argument("--mmlu-limit", type=int, default=None, help="questions per MMLU subject (default: all)")
    ap.add_argument("--gsm8k-limit", type=int, default=500, help="GSM8K test problems (of 1319)")
    ap.add_argument("--max-gen-toks", type=int, default=256, help="GSM8K generation length (OLMES uses 512)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    limits = {"gsm8k_olmes": args.gsm8k_limit} | ({"mmlu": args.mmlu_limit} if args.mmlu_limit else {})
    evaluate = EvaluateSection(tasks=["mmlu", "gsm8k_olmes"], limits=limits, batch_size=args.batch_size,
                               task_settings={"gsm8k_olmes": {"gen_kwargs": {"max_gen_toks": args.max_gen_toks}}})
    cache = RunCache()
    run_dirs, walls = [], {}
    for name in args.recipes:
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        recipe.evaluate = evaluate
        recipe.output_dir = args.out
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        run_dirs.append(run_recipe(recipe, cache=cache))
        walls[recipe.metadata.name] = time.perf_counter() - t0

    runs, baseline = load_runs(run_dirs)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n## MMLU (5-shot) and GSM8K (OLMES 8-shot CoT, {args.gsm8k_limit} problems, greedy, "
          f"max {args.max_gen_toks} new tokens) — bundled SmolLM2-135M, {device}\n")
    print(compare_table(runs, baseline))
    print("\n| run | wall s | mmlu s | gsm8k_olmes s | mmlu n | gsm8k n |\n|---|---|---|---|---|---|")
    for d in run_dirs:
        ev = json.loads((d / "eval" / "lm_eval.json").read_text())
        print(f"| {d.name} | {walls[d.name]:.0f} | {ev['seconds']['mmlu']:.0f} | {ev['seconds']['gsm8k_olmes']:.0f} "
              f"| {ev['tasks']['mmlu']['n']} | {ev['tasks']['gsm8k_olmes']['n']} |")


if __name__ == "__main__":
    main()
