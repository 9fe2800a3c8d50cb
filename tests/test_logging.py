"""The terminal shows quantkit's stage lines and one progress bar per long step; what the libraries say
(DeepSpeed's accelerator line, transformers' deprecations, lm-eval's in-memory-model warnings, shard bars)
goes to the run folder's debug.log."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHATTER = ["real_accelerator", "torch_dtype", "already-initialized model", "Writing model shards", "fatal:",
           "Loading weights", "Tokenizing inputs", "Using custom data configuration"]


def test_terminal_shows_stages_and_the_debug_log_keeps_the_rest(tmp_path, tiny_model_dir):
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""\
        metadata: {{name: quiet}}
        model: {{source: "{tiny_model_dir}", dtype: float32}}
        quantize: {{method: fp8}}
        calibration: {{dataset: "builtin:news", n_samples: 2, seq_len: 16, batch_size: 2}}
        export: {{trtllm: {{dtype: float16}}, hf: true}}
        build: {{enabled: false}}
        evaluate: {{tasks: [piqa], limit: 2}}
        """))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, in a fresh interpreter
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", "r.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    for stage in ("quantize", "export", "check", "evaluate"):
        assert f"[{stage}] started" in terminal and f"[{stage}] done" in terminal
    assert [c for c in CHATTER if c in terminal] == []
    assert "Running loglikelihood requests" in terminal and "calibrate fp8" in terminal  # the long steps' bars
    log = (tmp_path / "runs" / "quiet" / "debug.log").read_text()
    assert "already-initialized model" in log and "[evaluate] started" in log
    if importlib.util.find_spec("deepspeed") is not None:
        assert "Setting accelerator to CPU" in log
