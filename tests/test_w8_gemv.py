"""quantkit's 8-bit split-K GEMV (kernels/triton_gemm.py `w8_gemv_partials`, M = 1) and the table it runs under.

The kernel runs in Triton's interpreter on CPU: both weight kinds (int8, fp8 E4M3), both paths (fp32 FMAs,
tensor-core dot on the row repeated to 16) and split-K partial sums must give the float64 product of the same 8-bit
values, also where N is not a multiple of the tile; through QuantLinear (fp8 static, int8_sq static and per token,
per-row fp8 scales as fused q/k/v have) it must reproduce the dequantize reference of the checkpoint's arithmetic.
The plan must follow what bench/w8_tune.py measured against gemlite (kernels/w8_gemv_configs.json); on the GPU
(QUANTKIT_TEST_DEVICE=cuda) the compiled kernel runs the 8B shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _runtime_helpers import tune_table

from quantkit import runtime
from quantkit.kernels import libs
from quantkit.kernels import triton_gemm as tg

_SCRIPT = r"""
import json, torch
from quantkit import runtime
from quantkit.kernels import triton_gemm as tg
g = torch.Generator().manual_seed(0)
out = []
for kind in ("int8", "fp8"):
    for n, k in [(40, 256), (24, 688), (16, 1024)]:  # N = 40 / 24 not multiples of the tile; 688 = 43 x 16
        if kind == "int8":
            w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            x = torch.randint(-127, 128, (1, k), generator=g, dtype=torch.int8)
        else:
            w = (torch.randn(n, k, generator=g) * 60).to(torch.float8_e4m3fn)
            x = (torch.randn(1, k, generator=g) * 60).to(torch.float8_e4m3fn)
        ref = x.double() @ w.double().t()
        for split in (1, 2, 4):
            for dot in (False, True):
                cfg = tg.fit_w8_config(tg.W8Config(split, dot, 16, 64, 4, 2), k)
                parts = tg.launch_w8_gemv(x, w, cfg)
                err = ((parts.sum(0).double() - ref[0]).norm() / ref.norm()).item()
                out.append(["kernel", kind, n, k, cfg.split_k, dot, list(parts.shape), err])
# through QuantLinear: the layer's M = 1 output against its dequantize reference (float32)
k, n = 256, 48
for fmt, static, rowwise in [("fp8", True, False), ("fp8", True, True), ("int8_sq", True, False),
                             ("int8_sq", False, False)]:
    wf = torch.randn(n, k, generator=g)
    ws = (wf.abs().amax(1) / (448 if fmt == "fp8" else 127)) if rowwise or fmt != "fp8" else wf.abs().max() / 448
    w = (wf / (ws[:, None] if ws.dim() else ws))
    w = w.to(torch.float8_e4m3fn) if fmt == "fp8" else w.round().clamp(-127, 127).to(torch.int8)
    t = {"weight": w, "weight_scale": ws}
    x = torch.randn(1, k, generator=g)
    if static:
        t["input_scale"] = x.abs().max() / (448 if fmt == "fp8" else 127) * 0.9  # some clipping
    lay = runtime.QuantLinear(fmt, t, k, n, torch.float32, torch.device("cpu"))
    ref = lay._dequant_forward(x)
    lay.force_kernel("triton_w8_gemv")
    got = lay(x)
    out.append(["layer", fmt, static, rowwise, ((got - ref).norm() / ref.norm()).item()])
print("RESULT " + json.dumps(out))
"""


def test_gemv_matches_the_exact_product_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "QUANTKIT_TEST_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    rows = json.loads(line[0][len("RESULT "):])
    kernel = [r for r in rows if r[0] == "kernel"]
    assert {r[4] for r in kernel} == {1, 2, 4} and {r[1] for r in kernel} == {"int8", "fp8"}
    for _, kind, n, k, split, dot, shape, err in kernel:
        assert err < 1e-6, (kind, n, k, split, dot, err)  # fp32 sums of exact 8-bit products
        assert shape == [split, n]
    layers = [r for r in rows if r[0] == "layer"]
    assert len(layers) == 4
    for _, fmt, static, rowwise, err in layers:
        assert err < 1e-5, (fmt, static, rowwise, err)


def test_launch_settings_fit_every_k() -> None:
    for k in (256, 688, 4096, 11008, 14336):
        for split in (1, 2, 4, 8):
            cfg = tg.fit_w8_config(tg.W8Config(split, True, 64, 512, 4, 3), k)
            assert k % cfg.split_k == 0 and (k // cfg.split_k) % cfg.block_k == 0, (k, cfg)
            assert cfg.block_k & (cfg.block_k - 1) == 0 and cfg.block_k >= 16  # a power of two; dot needs 16 k
    assert tg.w8_gemv_supported(4096) and not tg.w8_gemv_supported(4100)


@pytest.fixture
def table(tmp_path, monkeypatch):
    yield from tune_table(tmp_path, monkeypatch, tg, "W8_CONFIG_FILE", tg._w8_table, tg.w8_config)


def test_m1_follows_the_measured_table_and_gemlite_keeps_the_rest(table) -> None:
    cfg = {"split_k": 4, "dot": True, "block_n": 64, "block_k": 128, "warps": 4, "stages": 3}
    table({"fp8": {"4096x4096": {"config": cfg, "us": 6.1, "gemlite_us": 11.3},
                   "6144x4096": {"config": cfg, "us": 8.1, "gemlite_us": 8.0}}})
    assert tg.w8_gemv_beats_gemlite("fp8", 4096, 4096) and not tg.w8_gemv_beats_gemlite("fp8", 6144, 4096)
    assert not tg.w8_gemv_beats_gemlite("int8", 4096, 4096)  # not tuned: gemlite
    assert tg.w8_config("fp8", 4096, 4096) == tg.W8Config(**cfg)
    gemlite_here = lambda c: c == "gemlite_a8w8"  # noqa: E731 - the library counts as installed and loading
    own = {"m1": "triton_w8_gemv", "decode": "torch._scaled_mm", "prefill": "torch._scaled_mm"}
    big = 4096 * 4096
    assert libs.choose("fp8", own, gemlite_here, big) == {**own, "decode": "gemlite_a8w8"}
    own.pop("m1")  # where gemlite measured faster the own plan has no m1: gemlite takes every M <= 16
    assert libs.choose("fp8", own, gemlite_here, big) == {**own, "decode": "gemlite_a8w8"}
    int8_own = {"m1": "triton_w8_gemv", "decode": "triton_w8a8", "prefill": "torch._int_mm"}
    assert libs.choose("int8_sq", int8_own, gemlite_here, big) == {
        "m1": "triton_w8_gemv", "decode": "gemlite_a8w8", "prefill": "gemlite_a8w8"}
    # without gemlite the own plan stays as it is
    assert libs.choose("int8_sq", int8_own, lambda c: False, big) == int8_own


def test_only_static_activation_scales_take_the_gemv(table, monkeypatch) -> None:
    """A layer whose shape the table says the GEMV wins takes it at M = 1 with a static input scale, and keeps its
    decode kernel with per-token scales (whose amax would have to sum the split-K partials; measured slower)."""
    cfg = {"split_k": 2, "dot": False, "block_n": 16, "block_k": 64, "warps": 4, "stages": 3}
    table({"int8": {"48x256": {"config": cfg, "us": 1.0, "gemlite_us": 2.0},
                    "48x128": {"config": cfg, "us": 3.0, "gemlite_us": 2.0}},
           "fp8": {"48x256": {"config": cfg, "us": 1.0, "gemlite_us": 2.0}}})
    monkeypatch.setattr(runtime, "kernel_ok", lambda name, dev: True)  # as on a GPU where every kernel checks out
    monkeypatch.setenv("QUANTKIT_KERNEL_LIBS", "none")
    w8 = torch.randint(-127, 128, (48, 256), dtype=torch.int8)

    def plan(fmt: str, w: torch.Tensor, static: bool) -> dict[str, str]:
        t = {"weight": w, "weight_scale": torch.full((w.shape[0],), 0.01)}
        if static:
            t["input_scale"] = torch.tensor(0.02)
        return runtime.QuantLinear(fmt, t, w.shape[1], w.shape[0], torch.float32, torch.device("cpu")).kernels

    assert plan("int8_sq", w8, True)["m1"] == "triton_w8_gemv"
    assert plan("fp8", w8.to(torch.float8_e4m3fn), True)["m1"] == "triton_w8_gemv"
    assert "m1" not in plan("int8_sq_pt", w8, False) and "m1" not in plan("fp8_pt", w8.to(torch.float8_e4m3fn), False)
    assert "m1" not in plan("int8_sq", w8[:, :128].contiguous(), True)  # gemlite measured faster on that shape


def test_the_shipped_table_parses_and_fits() -> None:
    rows = json.loads(tg.W8_CONFIG_FILE.read_text())
    assert set(rows) <= {"fp8", "int8"}
    for kind, shapes in rows.items():
        for shape, row in shapes.items():
            n, k = (int(v) for v in shape.split("x"))
            cfg = tg.w8_config(kind, n, k)
            assert cfg == tg.W8Config(**row["config"]) == tg.fit_w8_config(cfg, k)  # tuned settings need no fitting
            assert row["us"] > 0 and row["gemlite_us"] > 0


def test_gemv_on_cuda_reproduces_the_dequantize_reference() -> None:
    """On the GPU: the 8B decode shapes at M = 1 under the shipped settings, fp8 and int8_sq, against the layer's
    dequantize path (bf16 rounding of the dequantized activations and weights there: rel err < 1e-2)."""
    if os.environ.get("QUANTKIT_TEST_DEVICE") != "cuda" or not torch.cuda.is_available():
        pytest.skip("the compiled kernel: run with QUANTKIT_TEST_DEVICE=cuda")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for fmt in ("fp8", "int8_sq"):
        for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
            wf = torch.randn(n, k, device=dev, generator=g)
            top = 448 if fmt == "fp8" else 127
            ws = wf.abs().amax(1) / top
            w = wf / ws[:, None]
            w = w.to(torch.float8_e4m3fn) if fmt == "fp8" else w.round().clamp(-127, 127).to(torch.int8)
            x = torch.randn(1, k, device=dev, generator=g)
            lay = runtime.QuantLinear(fmt, {"weight": w, "weight_scale": ws, "input_scale": x.abs().max() / top},
                                      k, n, torch.bfloat16, dev)
            xb = x.to(torch.bfloat16)
            ref = lay._dequant_forward(xb).float()
            lay.force_kernel("triton_w8_gemv")
            err = ((lay(xb).float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (fmt, n, k, err)
