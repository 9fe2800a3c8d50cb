"""Kernel libraries in quantkit.runtime (kernels/libs.py), on CPU.

gemlite needs CUDA, so CI checks everything around it: which kernels the plan picks (by the H200 measurement in
libs.CHOICES), that an absent / broken / failing library is not picked and says why, and that the mapping of
ModelOpt's tensors onto gemlite's layout computes the checkpoint's arithmetic. For the last, gemlite's kernels are
replaced by the formulas its source documents (gemlite 0.6.0.post2):
- 8-bit weights, channel_scale_mode 1 (triton_kernels/gemv_splitK_kernels.py, "#weight-only" epilogue; the GEMM
  kernels the same): y[m, n] = (sum_k x[m, k] * W_q[k, n]) * scales[n], W_q the stored weight transposed.
- 4-bit weights, W_group_mode 3 with a scalar zero (triton_kernels/utils.py `dequantize`):
  w[n, k] = (u[n, k] - zero) * scales[n, k // group].
and the result is compared with the fake-quantized ModelOpt model the checkpoint came from (independent ground
truth), with the usual CPU float32 bound. On the GPU the real gemlite kernels are checked at load
(runtime.library_kernel_ok) and by tests/test_runtime.py with QUANTKIT_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from _runtime_helpers import eval_ids, rel_err, roundtrip

from quantkit import runtime
from quantkit.errors import QuantkitError
from quantkit.kernels import libs
from quantkit.runtime import QuantLinear, load_quantized, unpack_modelopt_int4

CPU_BOUND = 1e-4  # tests/test_runtime.py: float32 rounding plus rare rounding-tie flips


# ---------------------------------------------------------------- gemlite, as its source documents it (torch)


def _emulated_build_a8w8(module, weight, scales, out_dtype):
    return libs.GemliteLayer([weight.t(), scales.reshape(1, -1)], [8], out_dtype, 0)


def _emulated_build_a16w4(module, q, scales, group, dtype):
    u = libs.a16w4_codes(q)
    assert u.dtype == torch.uint8 and int(u.min()) >= 0 and int(u.max()) <= 15
    return libs.GemliteLayer([u, scales.float(), torch.tensor(libs.INT4_ZERO)], [4, group], dtype,
                             u.numel() // 2 + scales.numel() * 4)


def _emulated_gemm(x, tensors, meta, out_dtype):
    if meta[0] == 8:  # channel_scale_mode 1: acc * scales[n]
        w_t, scales = tensors
        return ((x.double() @ w_t.double()) * scales.double()).to(out_dtype)
    u, scales, zero = tensors  # W_group_mode 3, scalar zero: (u - zero) * scale per group
    w = (u.to(torch.int32) - zero).float() * scales.repeat_interleave(meta[1], dim=1)
    return (x.double() @ w.double().t()).to(out_dtype)


@pytest.fixture
def fresh(monkeypatch):
    """Empty library and self-check caches (restored afterwards)."""
    monkeypatch.setattr(libs, "_LIBS", {})
    monkeypatch.setattr(libs, "_SKIP_LOGGED", set())
    monkeypatch.setattr(runtime, "_LIB_FAIL_LOGGED", set())
    monkeypatch.delenv("QUANTKIT_KERNEL_LIBS", raising=False)
    return monkeypatch


@pytest.fixture
def emulated(fresh):
    """gemlite 'installed' with its kernels replaced by the documented formulas."""
    fresh.setattr(libs, "_probe", lambda name, device: libs.Library(name, types.SimpleNamespace(), "0.6.0.post2",
                                                                     None))
    fresh.setattr(libs, "build_a8w8", _emulated_build_a8w8)
    fresh.setattr(libs, "build_a16w4", _emulated_build_a16w4)
    fresh.setattr(libs, "gemlite_gemm", _emulated_gemm)
    fresh.setattr(libs, "MEASURED_MIN_WEIGHTS", 0)  # the tiny test model's layers count as measured
    return fresh


# ---------------------------------------------------------------- the choice (libs.CHOICES, from the H200 table)


def test_choice_follows_the_measurement_per_format_and_m_range() -> None:
    yes, no = (lambda k: True), (lambda k: False)
    big = 4096 * 4096
    # int4 as the own plan reads the H200 tune table (runtime.int4_decode_plan): tinygemm at M = 1, quantkit's
    # W4A16 at M = 2..16 (80 us per 8B layer at M = 8 against gemlite's 123): it stays ahead of gemlite there
    own_int4 = {"m1": "tinygemm", "decode": "triton_w4a16", "prefill": "triton_dequant"}
    assert libs.choose("int4", own_int4, yes, big) == own_int4
    # an own plan on tinygemm alone (untuned shapes): gemlite takes M = 2..16, tinygemm stays at M = 1
    assert libs.choose("int4", {"decode": "tinygemm", "prefill": "triton_dequant"}, yes, big) == {
        "m1": "tinygemm", "decode": "gemlite_a16w4", "prefill": "triton_dequant"}
    # without tinygemm (float16 / float32 models) the own plan's W4A16 keeps every decode M; gemlite absent: same
    for usable in (yes, no):
        assert libs.choose("int4", {"decode": "triton_w4a16", "prefill": "triton_dequant"}, usable, big) == {
            "decode": "triton_w4a16", "prefill": "triton_dequant"}
    for fmt in ("fp8", "fp8_pt"):  # 79 vs 167 us at M = 1; prefill: _scaled_mm was faster in the whole model
        assert libs.choose(fmt, {"decode": "torch._scaled_mm", "prefill": "torch._scaled_mm"}, yes, big) == {
            "decode": "gemlite_a8w8", "prefill": "torch._scaled_mm"}
    for fmt in ("int8_sq", "int8_sq_pt"):  # 82 vs 170 us at M = 1, 512 vs 1506 us at M = 1024
        assert libs.choose(fmt, {"decode": "triton_w8a8", "prefill": "torch._int_mm"}, yes, big) == {
            "decode": "gemlite_a8w8", "prefill": "gemlite_a8w8"}
    # not measured for a library: unchanged
    own_wo = {"decode": "triton_w8a16", "prefill": "triton_dequant"}
    assert libs.choose("int8_wo", own_wo, yes, big) == own_wo
    assert libs.choose("w4a8", {"decode": "dequant", "prefill": "dequant"}, yes, big) == {"decode": "dequant",
                                                                                      "prefill": "dequant"}
    # a library kernel that is not usable (absent, failed self-check) is never picked
    assert libs.choose("int4", own_int4, no, big) == own_int4
    assert libs.choose("fp8", {"decode": "torch._scaled_mm", "prefill": "dequant"}, no, big) == {
        "decode": "torch._scaled_mm", "prefill": "dequant"}
    # smaller than anything measured (Llama-3.1-8B's k/v_proj, 1024 x 4096): quantkit's own plan
    tiny_only = {"decode": "tinygemm", "prefill": "triton_dequant"}
    assert libs.choose("int4", tiny_only, yes, 1024 * 4096 - 1) == tiny_only
    assert libs.choose("int4", tiny_only, yes, 1024 * 4096)["decode"] == "gemlite_a16w4"


def test_absent_library_is_skipped_with_its_reason(fresh, caplog) -> None:
    fresh.setattr(libs.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.INFO, logger="quantkit.kernels.libs"):
        lib = libs.library("gemlite", torch.device("cuda"))
    assert lib.module is None and lib.reason.startswith("not installed")
    assert "gemlite not used: not installed" in caplog.text
    assert not runtime.library_usable("gemlite_a8w8", torch.device("cuda"))


def test_disabled_library_is_skipped(fresh) -> None:
    fresh.setenv("QUANTKIT_KERNEL_LIBS", "none")
    assert libs.library("gemlite", torch.device("cuda")).reason == "disabled by QUANTKIT_KERNEL_LIBS"


def test_present_library_that_fails_to_import_is_reported_not_swallowed(fresh) -> None:
    fresh.setattr(libs.importlib.util, "find_spec", lambda name: object())

    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10 (built for another torch)")

    fresh.setattr(libs.importlib, "import_module", broken)
    with pytest.raises(QuantkitError) as err:
        libs.library("gemlite", torch.device("cuda"))
    text = str(err.value)
    assert "installed but fails to import" in text and "undefined symbol" in text and "QUANTKIT_KERNEL_LIBS" in text


def test_library_that_fails_its_self_check_is_not_used(emulated, caplog) -> None:
    emulated.setattr(libs, "gemlite_gemm", lambda x, t, m, d: _emulated_gemm(x, t, m, d) * 1.05)  # 5% off
    with caplog.at_level(logging.WARNING, logger="quantkit.runtime"):
        model, _ = load_quantized(roundtrip("fp8").hf_dir, "cpu", torch.float32)
    assert {v["decode"] for v in model.quantkit_kernels.values()} == {"dequant"}
    assert not any("library" in v for v in model.quantkit_kernels.values())
    assert "gemlite_a8w8 (gemlite 0.6.0.post2) failed its self-check for fp8" in caplog.text


# ---------------------------------------------------------------- the mapping of ModelOpt's tensors


def test_int4_codes_and_zero_dequantize_to_the_checkpoint_weight_exactly() -> None:
    """gemlite's (u - 8) * scale on the converted tensors == ModelOpt's q * scale, bit for bit."""
    from safetensors.torch import load_file

    rt = roundtrip("int4_awq")
    t = load_file(str(rt.hf_dir / "model.safetensors"))
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        q = unpack_modelopt_int4(t[f"{name}.weight"])
        scale = t[f"{name}.weight_scale"].float()
        group = q.shape[1] // scale.shape[1]
        layer = _emulated_build_a16w4(None, q, scale, group, torch.float32)
        u, s, zero = layer.tensors
        got = (u.to(torch.int32) - zero).float() * s.repeat_interleave(group, dim=1)
        ref = q.float() * scale.repeat_interleave(group, dim=1)
        assert torch.equal(got, ref), name
        mod = dict(load_quantized(rt.hf_dir, "cpu", torch.float32)[0].named_modules())[name]
        assert torch.equal(got, mod.dequantize_weight())


def test_a8w8_channel_scales_fold_the_static_input_scale() -> None:
    ws, s_in = torch.tensor(2e-4), torch.tensor(0.03)
    assert torch.equal(libs.a8w8_channel_scales(ws, s_in, 5), torch.full((5, 1), (ws * s_in).item()))
    per_row = torch.rand(5)
    assert torch.equal(libs.a8w8_channel_scales(per_row, None, 5), per_row.reshape(5, 1))


MAPPED = ["fp8", "fp8_pcpt", "int8_sq", "int8_sq_pt", "int4_awq", "int4_rtn"]
# fp8 prefill is quantkit's own kernel (torch._scaled_mm on a GPU, the dequant path on CPU)
EXPECTED = {"fp8": {"decode": "gemlite_a8w8", "prefill": "dequant"},
            "fp8_pcpt": {"decode": "gemlite_a8w8", "prefill": "dequant"},
            "int8_sq": {"decode": "gemlite_a8w8", "prefill": "gemlite_a8w8"},
            "int8_sq_pt": {"decode": "gemlite_a8w8", "prefill": "gemlite_a8w8"},
            # on CPU quantkit's own int4 decode is the dequant path (no tinygemm), so gemlite takes M = 1 too
            "int4_awq": {"decode": "gemlite_a16w4", "prefill": "dequant"},
            "int4_rtn": {"decode": "gemlite_a16w4", "prefill": "dequant"}}


@pytest.mark.parametrize("variant", MAPPED)
def test_library_path_reproduces_the_fake_quantized_model(emulated, variant: str) -> None:
    """Checkpoint -> libs' mapping -> gemlite's documented arithmetic == the ModelOpt model it came from, at
    decode M (1, 2 tokens) and prefill M; recorded in quantkit_kernels with the library's name and version."""
    rt = roundtrip(variant)
    model, _ = load_quantized(rt.hf_dir, "cpu", torch.float32)
    for name, info in model.quantkit_kernels.items():
        assert {k: info[k] for k in ("decode", "prefill")} == EXPECTED[variant], (name, info)
        assert info["library"] == "gemlite 0.6.0.post2"
    assert any("(gemlite 0.6.0.post2)" in k for k in runtime.kernel_summary(model))
    ids = eval_ids()
    with torch.no_grad():
        full = model(ids).logits
    ref = rt.reference_logits(ids)
    err = rel_err(full, ref)
    assert err < CPU_BOUND, err
    for m in (1, 2):  # decode-sized M through every layer
        with torch.no_grad():
            got = model(ids[:m, -1:]).logits
        assert rel_err(got, rt.reference_logits(ids[:m, -1:])) < CPU_BOUND


def test_mapping_negative_control_forgetting_the_static_input_scale_fails(emulated) -> None:
    """The check above can fail: channel scales without the static input scale are far off."""
    emulated.setattr(libs, "a8w8_channel_scales", lambda ws, s_in, n: ws.float().reshape(-1).expand(n).reshape(n, 1))
    emulated.setattr(runtime, "library_kernel_ok", lambda layer, k: True)  # let the broken mapping through
    rt = roundtrip("int8_sq")
    model, _ = load_quantized(rt.hf_dir, "cpu", torch.float32)
    ids = eval_ids()
    with torch.no_grad():
        err = rel_err(model(ids).logits, rt.reference_logits(ids))
    assert err > 100 * CPU_BOUND


def test_self_check_runs_on_each_layer_with_its_own_tensors(emulated) -> None:
    """The check passes on the right arithmetic and catches a wrong one on the very layer (no shared verdict)."""
    rt = roundtrip("int8_sq_pt")
    model, _ = load_quantized(rt.hf_dir, "cpu", torch.float32)
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.kernels["decode"] == "gemlite_a8w8" and runtime.library_kernel_ok(layer, "gemlite_a8w8")
    layer.lib_arg1 = layer.lib_arg1 * 1.1  # channel scales 10% off on this layer only (the scales may be a view)
    assert not runtime.library_kernel_ok(layer, "gemlite_a8w8")


def test_gemlite_op_declares_its_real_output_dtype_to_torch_compile() -> None:
    """gemlite's own op says 'output dtype = input dtype', wrong for fp8/int8 input; quantkit's wrapper op tells
    torch.compile the truth (checked through its fake implementation, which is what the compiler sees)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 256, dtype=torch.float8_e4m3fn)
        w_t = torch.empty(256, 64, dtype=torch.float8_e4m3fn)  # gemlite keeps W_q as [K, N]
        y = libs.gemlite_gemm(x, [w_t, torch.empty(1, 64)], [0] * 12, torch.float32)
    assert y.shape == (3, 64) and y.dtype == torch.float32


# ---------------------------------------------------------------- the real kernels (QUANTKIT_TEST_DEVICE=cuda)

GPU_PLAN = {"fp8": {"decode": "gemlite_a8w8", "prefill": "torch._scaled_mm"},
            "fp8_pt": {"decode": "gemlite_a8w8", "prefill": "torch._scaled_mm"},
            "int8_sq": {"decode": "gemlite_a8w8", "prefill": "gemlite_a8w8"},
            "int8_sq_pt": {"decode": "gemlite_a8w8", "prefill": "gemlite_a8w8"},
            "int4": {"m1": "tinygemm", "decode": "gemlite_a16w4", "prefill": "triton_dequant"}}


@pytest.mark.parametrize("fmt", list(GPU_PLAN))
def test_gemlite_kernels_on_the_gpu_match_the_reference_at_llama_shapes(fmt: str) -> None:
    """On the card: the plan is libs.CHOICES's, every layer passed its self-check, and eager, compiled and
    CUDA-graph-replayed calls reproduce the dequantize reference at M = 1, 2, 8, 16 and 1024."""
    import sys
    from pathlib import Path

    from _runtime_helpers import device_under_test

    dev = device_under_test()
    if dev.type != "cuda":
        pytest.skip("real gemlite kernels: run with QUANTKIT_TEST_DEVICE=cuda")
    if libs.library("gemlite", dev).reason is not None:
        pytest.skip(f"gemlite: {libs.library('gemlite', dev).reason}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from kernels import _tensors  # bench/kernels.py: random tensors in the exported layout

    for n, k in ((6144, 4096), (4096, 14336)):  # fused q/k/v and down_proj of Llama-3.1-8B
        q = QuantLinear(fmt, _tensors(fmt, n, k, dev), k, n, torch.bfloat16, dev)
        assert {r: q.kernels[r] for r in GPU_PLAN[fmt]} == GPU_PLAN[fmt], q.kernels
        assert q.kernels["library"] == f"gemlite {libs.version('gemlite')}"
        compiled = torch.compile(q.forward, dynamic=False)
        for m in (1, 2, 8, 16, 1024):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = q._dequant_forward(x)
            with torch.no_grad():
                outs = [q(x)]
                if m in (1, 8) and n == 6144:  # as the bench decodes: compiled, replayed from a CUDA graph
                    outs.append(compiled(x))
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        outs.append(compiled(x))
                    graph.replay()
            for got in outs:
                assert rel_err(got, ref) < 1e-2, (fmt, n, k, m, q.kernels, rel_err(got, ref))


def test_the_kernels_extra_pins_the_measured_version() -> None:
    """pyproject's `kernels` extra and libs.GEMLITE_MEASURED name the same gemlite (the one the table measured)."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert f"gemlite=={libs.GEMLITE_MEASURED}" in meta["project"]["optional-dependencies"]["kernels"]
