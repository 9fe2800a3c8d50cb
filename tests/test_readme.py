"""The README's demo command: exactly two top commands; the first runs the baseline and the quantized demo and
compares the two run folders those recipes write (same examples, so the deltas mean something)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from quantkit.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_demo_command_compares_the_runs_it_makes():
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2
    steps = [shlex.split(step) for step in commands[0].split("&&")]
    runs = [load_recipe(REPO / s[2]) for s in steps if s[:2] == ["quantkit", "run"]]
    (compare,) = [s for s in steps if s[:2] == ["quantkit", "compare"]]
    assert sorted(compare[2:]) == sorted(str(r.run_dir()) for r in runs)
    base, quant = sorted(runs, key=lambda r: r.quantize.method != "none")
    assert base.quantize.method == "none" and quant.quantize.method != "none"
    assert base.model == quant.model and base.evaluate == quant.evaluate
