"""quantkit's Triton W4A16 decode kernel (kernels/triton_gemm.py) and the table of launch settings it runs under.

The kernel runs in Triton's interpreter on CPU (float32, and float16 for the bit trick with its offset taken out per
group; the interpreter mishandles bf16, which the GPU test and the runtime's load-time self-check cover): groups
smaller than, equal to and larger than the 128-k block, M = 1 to 16, split-K partial sums and shapes whose N is not
a multiple of the tile must give x @ (q * scale)^T computed from the unpacked integers with torch. The launch
settings must fit any K a model has, and the int4 plan must follow what the table measured
(kernels/w4a16_configs.json, bench/w4a16_tune.py)."""

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
# (N, K, group, M, dtype): N = 40 / 24 are not multiples of the tile; groups 16 / 64 split a 128-k block, 256 spans two
for n, k, group, m, dt in [(40, 256, 64, 1, "float32"), (40, 256, 64, 5, "float32"), (24, 384, 16, 16, "float32"),
                           (24, 512, 256, 3, "float32"), (16, 1024, 128, 1, "float32"), (40, 256, 64, 3, "float16"),
                           (24, 512, 128, 1, "float16")]:
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    w4 = tg.pack_int4_w4(q)
    assert w4.shape == (n, k // 8) and w4.dtype == torch.int32 and torch.equal(tg.unpack_int4_w4(w4), q)
    scale = torch.rand(n, k // group, generator=g) * 0.1 + 0.01
    x = torch.randn(m, k, generator=g).to(getattr(torch, dt))
    ref = x.double() @ (q.double() * scale.double().repeat_interleave(group, 1)).t()
    # the tensor-core kernel at every M; at M = 1 also the GEMV, one and two blocks per step
    configs = [tg.W4Config(split, 16, 4, 2) for split in (1, 2, 4)]
    if m == 1:
        configs += [tg.W4Config(split, 16, 4, 2, True, step) for split in (1, 2) for step in (1, 2)]
    for cfg in configs:
        cfg = tg.fit_w4_config(cfg, k)
        parts = tg.launch_w4(x, w4, scale.t().contiguous(), group, cfg)
        err = ((parts.sum(0).double() - ref).norm() / ref.norm()).item()
        label = f"gemv{cfg.split_k}x{cfg.step_blocks}" if cfg.gemv else cfg.split_k
        out.append([n, k, group, m, dt, label, list(parts.shape), err])
    y = tg.w4_gemm(x, w4, scale.t().contiguous(), group)  # the default settings, through the custom op
    out.append([n, k, group, m, dt, "w4_gemm", list(y.shape), ((y.double() - ref).norm() / ref.norm()).item()])
print("RESULT " + json.dumps(out))
"""


def test_kernel_matches_the_integer_reference_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    rows = json.loads(line[0][len("RESULT "):])
    labels = {r[5] for r in rows}
    assert {1, 2, 4} <= labels  # split-K really ran (its partial sums add up)
    assert {"gemv1x1", "gemv2x2", "gemv1x2"} <= labels  # the GEMV split along K and several blocks per step
    for n, k, group, m, dt, label, shape, err in rows:
        # float32: exact integers and an IEEE dot; float16: the offset's cancellation costs a few fp32 ulps of
        # 1032 * sum(x), and w4_gemm's result is rounded to fp16 (2**-11); the GEMV computes q * x in fp32 (exact
        # integers, no offset to take out) in every dtype
        bound = 1e-6 if dt == "float32" or str(label).startswith("gemv") else 1e-3 if label == "w4_gemm" else 1e-4
        assert err < bound, (n, k, group, m, dt, label, err)
        split = int(label[4:].split("x")[0]) if str(label).startswith("gemv") else label
        assert shape == ([m, n] if label == "w4_gemm" else [split, m, n])


def test_launch_settings_fit_every_k() -> None:
    for k in (128, 256, 640, 4096, 11008, 14336):
        for split in (1, 2, 4, 8, 16):
            cfg = tg.fit_w4_config(tg.W4Config(split, 64, 4, 3), k)
            assert (k // 128) % cfg.split_k == 0 and cfg.split_k <= split, (k, cfg)
    assert tg.fit_w4_config(tg.W4Config(8, 64, 4, 3), 640).split_k == 1  # 5 blocks: no power of two divides
    assert tg.w4_supported(4096, 128) and tg.w4_supported(4096, 64) and tg.w4_supported(4096, 256)
    assert not tg.w4_supported(576, 64)  # K not a multiple of 128 (SmolLM2's hidden size)
    assert not tg.w4_supported(4096, 8) and not tg.w4_supported(4096, 96)  # slice of 16 k / a group across blocks
    # an untuned shape splits K until there are enough programs for a large GPU
    cfg = tg.w4_config(1, 1024, 4096)
    assert cfg.split_k > 1 and -(-1024 // cfg.block_n) * cfg.split_k >= 256
    assert tg.w4_config(1, 64, 128).split_k == 1
    # the GEMV's blocks per step divide a split's blocks: 14336 = 112 blocks, split 16 -> 7 blocks, one per step
    assert tg.fit_w4_config(tg.W4Config(16, 64, 4, 3, True, 4), 14336).step_blocks == 1
    assert tg.fit_w4_config(tg.W4Config(4, 64, 4, 3, True, 4), 14336) == tg.W4Config(4, 64, 4, 3, True, 4)
    with pytest.raises(ValueError, match="M = 1"):  # the GEMV is for one row only
        import torch

        tg.launch_w4(torch.zeros(2, 256), torch.zeros(16, 32, dtype=torch.int32), torch.ones(2, 16), 128,
                     tg.W4Config(1, 16, 4, 2, True, 1))


@pytest.fixture
def table(tmp_path, monkeypatch):
    yield from tune_table(tmp_path, monkeypatch, tg, "W4_CONFIG_FILE", tg._w4_table, tg.w4_config)


def test_the_int4_plan_follows_the_measured_table(table) -> None:
    cfg = {"split_k": 2, "block_n": 64, "warps": 4, "stages": 3}
    gemv = {"split_k": 16, "block_n": 256, "warps": 4, "stages": 2, "gemv": True, "step_blocks": 1}
    table({"m1": {"6144x4096": {"config": cfg, "us": 20.0, "tinygemm_us": 30.0},
                  "4096x14336": {"config": gemv, "us": 15.0, "tinygemm_us": 18.5}},
           "decode": {"6144x4096": {"config": {**cfg, "block_n": 128}, "us": 50.0, "tinygemm_us": 40.0}}})
    # a GEMV row (the tune script writes both new fields) runs the GEMV at M = 1 on that shape, and only there
    assert tg.w4_config(1, 4096, 14336) == tg.W4Config(16, 256, 4, 2, gemv=True, step_blocks=1)
    assert not tg.w4_config(8, 4096, 14336).gemv and not tg.w4_config(1, 6144, 4096).gemv
    assert runtime.int4_decode_plan("triton_w4a16", "tinygemm", 4096, 14336, "x") == {
        "m1": "triton_w4a16", "decode": "tinygemm"}
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


def test_kernel_on_cuda_reproduces_the_dequantize_reference() -> None:
    """On the GPU, in bf16 (the bit trick the interpreter cannot run): the 8B decode shapes at M = 1, 8 and 16 under
    the shipped settings, group 128 and 64, against the layer's dequantize path (bf16 rounding of the dequantized
    weights there: rel err < 1e-2; a wrong nibble order or offset is off by O(1))."""
    import torch

    if os.environ.get("QUANTKIT_TEST_DEVICE") != "cuda" or not torch.cuda.is_available():
        pytest.skip("the compiled kernel: run with QUANTKIT_TEST_DEVICE=cuda")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for group in (128, 64):
        for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
            q = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=g)
            scale = torch.rand(n, k // group, device=dev, generator=g) * 1e-2 + 1e-3
            packed = q.to(torch.int16)[0::2] & 0xF | ((q.to(torch.int16)[1::2] & 0xF) << 4)  # ModelOpt's rows
            lay = runtime.QuantLinear("int4", {"weight": packed.to(torch.uint8), "weight_scale": scale}, k, n,
                                      torch.bfloat16, dev)
            lay.force_kernel("triton_w4a16")
            for m in (1, 8, 16):
                x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
                ref = lay._dequant_forward(x).float()
                err = ((lay(x).float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (group, n, k, m, err)
            # M = 1 on both kernels whatever the table chose: the GEMV and the tensor cores
            x = torch.randn(1, k, device=dev, generator=g).to(torch.bfloat16)
            ref = lay._dequant_forward(x).float()
            for cfg in (tg.W4Config(4, 128, 4, 3, True, 2), tg.W4Config(4, 128, 4, 3)):
                got = tg.launch_w4(x, lay.w4_weight, lay.w4_scale_t, group, tg.fit_w4_config(cfg, k)).sum(0)
                err = ((got - ref).norm() / ref.norm()).item()
                assert err < 1e-2, (group, n, k, cfg, err)
