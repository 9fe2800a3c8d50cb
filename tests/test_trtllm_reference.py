"""TensorRT-LLM checkpoints as the pipeline writes them (quantize -> prepare_for_deployment -> export_trtllm).

tests/_exports.py exports without `prepare_for_deployment`, which is why the fused-layer defect of issue 12 went
unseen on CPU; every checkpoint here goes through the pipeline's own order.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from _runtime_helpers import tiny_llama
from safetensors import safe_open

from quantkit.check import check_trtllm

ROOT = Path(tempfile.mkdtemp(prefix="quantkit-test-trtllm-"))


def teardown_module() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)


_CACHE: dict[tuple, tuple[torch.nn.Module, Path]] = {}


def pipeline_export(settings: dict, tp: int = 1, pp: int = 1) -> tuple[torch.nn.Module, Path]:
    """The fake-quantized model as the pipeline evaluates it and the TensorRT-LLM checkpoint it ships."""
    key = (tuple(sorted(settings.items())), tp, pp)
    if key in _CACHE:
        return _CACHE[key]
    from quantkit.calibration import CalibrationSet
    from quantkit.export import export_trtllm, prepare_for_deployment
    from quantkit.quantize import quantize_model
    from quantkit.recipe import QuantizeSection

    model = tiny_llama()
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    model = quantize_model(model, QuantizeSection(**settings), CalibrationSet(ids, 4, "test"))
    prepare_for_deployment(model)
    out = ROOT / f"{len(_CACHE)}"
    export_trtllm(model, out, dtype="float32", tp_size=tp, pp_size=pp)
    _CACHE[key] = (model, out)
    return _CACHE[key]


AWQ_WITH_PREQUANT = {
    "int4_awq_lite": {"method": "int4_awq", "block_size": 64, "awq_algorithm": "awq_lite"},
    "int4_awq_full": {"method": "int4_awq", "block_size": 64, "awq_algorithm": "awq_full"},
    "w4a8_awq": {"method": "w4a8_awq", "block_size": 64},
}


@pytest.mark.parametrize("variant", list(AWQ_WITH_PREQUANT))
def test_awq_fused_layers_keep_prequant_scales(variant: str) -> None:
    """Issue 12 defect 2: after the in-place prepare_for_deployment, qkv / fc / gate lost their
    prequant_scaling_factor (folded into the norms) while config.json says pre_quant_scale: true."""
    _, ckpt = pipeline_export(AWQ_WITH_PREQUANT[variant])
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        names = set(f.keys())
    for layer in range(2):
        for lin in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"):
            assert f"transformer.layers.{layer}.{lin}.prequant_scaling_factor" in names
    assert check_trtllm(ckpt) == []


def test_per_token_smoothquant_is_written_in_the_plugin_layout() -> None:
    """Issue 12 defect 1: W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN builds SmoothQuantRmsNorm / SmoothQuantAttention /
    SmoothQuantGatedMLP, which read per_channel_scale, smoother and scale_to_int (quantkit.trtllm_layout)."""
    _, ckpt = pipeline_export({"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_token"})
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    pre = "transformer.layers.0."
    assert t[pre + "attention.qkv.per_channel_scale"].shape == (1, 256)
    assert t[pre + "attention.dense.smoother"].shape == (1, 128)
    assert t[pre + "mlp.proj.smoother"].shape == (1, 256)
    assert t[pre + "input_layernorm.scale_to_int"].tolist() == [1.0]
    assert not [k for k in t if k.endswith(("weights_scaling_factor", "prequant_scaling_factor"))]
    assert check_trtllm(ckpt) == []


def test_check_rejects_modelopt_names_under_the_plugin_label(tmp_path: Path, monkeypatch) -> None:
    """What quantkit wrote before (ModelOpt's non-plugin tensors relabelled *_PLUGIN) now fails the check."""
    from quantkit import export

    monkeypatch.setattr(export, "to_trtllm_layout", lambda folder: None)
    model, _ = pipeline_export({"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_token"})
    export.export_trtllm(model, tmp_path / "old", dtype="float32")
    rules = {(v.tensor_or_field.rsplit(".", 1)[-1], v.rule) for v in check_trtllm(tmp_path / "old")}
    assert {("per_channel_scale", "scale.missing"), ("smoother", "scale.missing"),
            ("scale_to_int", "scale.missing")} <= rules


def test_int8_weight_only_holds_float_weights_tensorrt_llm_quantizes() -> None:
    """W8A16: TensorRT-LLM's weight-only layers read `weight` + `per_channel_scale` in their own interleaved int8
    layout, made at load from a float weight (weight_only_quantize_dict skips int8 weights)."""
    _, ckpt = pipeline_export({"method": "int8_wo"})
    with safe_open(str(ckpt / "rank0.safetensors"), "pt") as f:
        w = f.get_tensor("transformer.layers.0.mlp.fc.weight")
        assert not [k for k in f.keys() if "scaling_factor" in k]  # noqa: SIM118 - safe_open has no __iter__
    assert w.dtype == torch.float16
    # every output channel holds at most 255 distinct values: 127 * per-channel scale steps
    assert max(len(torch.unique(w[o])) for o in range(w.shape[0])) <= 255
    assert check_trtllm(ckpt) == []
