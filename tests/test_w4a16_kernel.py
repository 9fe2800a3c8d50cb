"""quantkit's Triton W4A16 decode kernel (kernels/triton_gemm.py) and the table of launch settings it runs under.

The kernel runs in Triton's interpreter on CPU (float32: the interpreter mishandles bf16): every path (M = 1 fp32
FMAs, tensor-core dot for M <= 16), split-K partial sums and shapes whose N is not a multiple of the tile must give
x @ (q * scale)^T computed from the unpacked integers with torch. The launch settings must fit any K a model has,
and the int4 plan must follow what the table measured (kernels/w4a16_configs.json, bench/w4a16_tune.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _runtime_helpers import tune_table

from quantkit import runtime
from quantkit.kernels import triton_gemm as tg

_SCRIPT = r"""
import json, torch
from quantkit.kernels import triton_gemm as tg
g = torch.Generator().manual_seed(0)
out = []
# (N, K, group, M): K = 688 has 86 words (2 x 43: block of 2 words), N = 40 / 24 are not multiples of the tile
for n, k, group, m in [(40, 256, 64, 1), (40, 256, 64, 5), (24, 688, 16, 1), (24, 688, 16, 16), (16, 1024, 128, 1),
                       (16, 1024, 128, 3)]:
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.1 + 0.01
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ (q.double() * scale.double().repeat_interleave(group, 1)).t()
    for split in (1, 2, 4):
        for dot in ((False, True) if m == 1 else (True,)):
            cfg = tg.fit_w4_config(tg.W4Config(split, dot, 16, 64, 4, 2), k)
            parts = tg.launch_w4(x, tg.pack_int4_k(q), scale, group, cfg)
            err = ((parts.sum(0).double() - ref).norm() / ref.norm()).item()
            out.append([n, k, group, m, cfg.split_k, dot, list(parts.shape), err])
    y = tg.w4_gemm(x, tg.pack_int4_k(q), scale, group)  # the default settings, through the custom op
    out.append([n, k, group, m, "w4_gemm", None, list(y.shape), ((y.double() - ref).norm() / ref.norm()).item()])
print("RESULT " + json.dumps(out))
"""


def test_kernel_matches_the_integer_reference_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    rows = json.loads(line[0][len("RESULT "):])
    splits = {r[4] for r in rows if r[4] != "w4_gemm"}
    assert {1, 2, 4} <= splits  # split-K really ran (its partial sums add up)
    for n, k, group, m, split, dot, shape, err in rows:
        assert err < 1e-5, (n, k, group, m, split, dot, err)
        assert shape == ([m, n] if split == "w4_gemm" else [split, m, n])


def test_launch_settings_fit_every_k() -> None:
    for k in (128, 256, 688, 4096, 11008, 14336):
        words = k // 8
        for split in (1, 2, 4, 8):
            for dot in (False, True):
                cfg = tg.fit_w4_config(tg.W4Config(split, dot, 16, 128, 4, 3), k)
                chunk = words // cfg.split_k
                assert words % cfg.split_k == 0 and chunk % cfg.block_j == 0, (k, cfg)
                assert cfg.block_j & (cfg.block_j - 1) == 0 and cfg.block_j >= 2  # a power of two; dot needs 16 k
    assert tg.w4_supported(4096, 128) and not tg.w4_supported(4104, 8) and not tg.w4_supported(4096, 12)
    # an untuned shape splits K until there are enough programs for a large GPU, never below one block per split
    cfg = tg.w4_config(1, 1024, 4096)
    assert cfg.split_k > 1 and -(-1024 // cfg.block_n) * cfg.split_k >= 256
    assert tg.w4_config(1, 64, 128).split_k == 1


@pytest.fixture
def table(tmp_path, monkeypatch):
    yield from tune_table(tmp_path, monkeypatch, tg, "W4_CONFIG_FILE", tg._w4_table, tg.w4_config)


def test_the_int4_plan_follows_the_measured_table(table) -> None:
    cfg = {"split_k": 2, "dot": False, "block_n": 8, "block_j": 64, "warps": 4, "stages": 3}
    table({"m1": {"6144x4096": {"config": cfg, "us": 20.0, "tinygemm_us": 30.0}},
           "decode": {"6144x4096": {"config": {**cfg, "dot": True, "block_n": 32}, "us": 50.0, "tinygemm_us": 40.0}}})
    assert tg.w4_beats_tinygemm(1, 6144, 4096) is True and tg.w4_beats_tinygemm(8, 6144, 4096) is False
    assert tg.w4_beats_tinygemm(1, 4096, 4096) is None  # not tuned
    assert tg.w4_config(1, 6144, 4096) == tg.W4Config(**cfg)  # the table's settings, as measured
    plan = runtime.int4_decode_plan("triton_w4a16", "tinygemm", 6144, 4096, "triton_dequant")
    assert plan == {"m1": "triton_w4a16", "decode": "tinygemm"}
    # an untuned shape keeps tinygemm; without tinygemm (not bf16, no CUDA) the Triton kernel, else the fallback
    assert runtime.int4_decode_plan("triton_w4a16", "tinygemm", 4096, 4096, "x") == {"decode": "tinygemm"}
    assert runtime.int4_decode_plan("triton_w4a16", None, 4096, 4096, "x") == {"decode": "triton_w4a16"}
    assert runtime.int4_decode_plan(None, None, 6144, 4096, "triton_dequant") == {"decode": "triton_dequant"}


def test_the_shipped_table_parses_and_fits() -> None:
    for regime, rows in json.loads(tg.W4_CONFIG_FILE.read_text()).items():
        assert regime in ("m1", "decode")
        for shape in rows:
            n, k = (int(v) for v in shape.split("x"))
            cfg = tg.w4_config(1 if regime == "m1" else 8, n, k)
            assert cfg == tg.fit_w4_config(cfg, k)  # tuned settings need no fitting
            assert regime == "decode" or not cfg.dot or cfg.block_n >= 16
