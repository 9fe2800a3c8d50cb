"""quantkit from a built wheel, outside the checkout: the task templates ship as package data, so the demo
recipe's evaluate stage runs from a fresh virtual environment (heavy dependencies from the system)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".ruff_cache")

NO_EDITABLE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable___quantkit")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable___quantkit" not in getattr(h, "__module__", "")]
"""


@pytest.mark.slow
def test_wheel_install_runs_the_demo_evaluate_stage(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QUANTKIT_EVAL_DIR")}
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=SKIP)  # build from a copy: nothing is written into the checkout
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "dist")], check=True, env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("quantkit-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
                   check=True, env=env, cwd=tmp_path)
    # The system environment may hold an editable install of a checkout (install.sh does `pip install -e .`),
    # whose import hook would add that checkout to the namespace package: switch it off in this venv.
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "sitecustomize.py").write_text(NO_EDITABLE)

    work = tmp_path / "work"  # neither the checkout nor its copy: only the wheel can provide quantkit
    shutil.copytree(REPO / "recipes", work / "recipes")
    where = subprocess.run([str(python), "-c", "import json, quantkit, quantkit.evaluate as e; "
                            "print(json.dumps([list(quantkit.__path__), e.__file__, str(e.templates_dir())]))"],
                           check=True, env=env, cwd=work, capture_output=True, text=True)
    paths, module, templates = json.loads(where.stdout)
    assert all(p.startswith(str(venv)) for p in paths) and module.startswith(str(venv)), where.stdout
    assert Path(templates, "utils.py").is_file() and Path(templates, "wiki_ppl.yaml").is_file()

    # The demo recipe as shipped, on the tiny model and with tiny evaluation limits (CPU seconds).
    run = subprocess.run([str(venv / "bin" / "quantkit"), "run", "recipes/demo.yaml",
                          "--set", f"model.source={tiny_model_dir}", "--set", "model.dtype=float32",
                          "--set", "evaluate.limit=2", "--set", "evaluate.limits.wiki_ppl=1",
                          "--set", "build.enabled=false", "--output-dir", "out"],
                         env=env, cwd=work, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((work / "out" / "smollm2-int4-awq-demo" / "eval" / "lm_eval.json").read_text())
    assert set(results["tasks"]) == {"wiki_ppl", "hellaswag", "piqa"}
    assert results["tasks"]["piqa"]["n"] == 2 and results["tasks"]["wiki_ppl"]["n"] == 1
    assert results["tasks"]["wiki_ppl"]["word_perplexity"] > 1
