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
