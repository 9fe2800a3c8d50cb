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


_QUANTIZED: dict[str, torch.nn.Module] = {}
_EXPORTED: dict[tuple, Path] = {}


def quantized(settings: dict) -> torch.nn.Module:
    """The fake-quantized model as the pipeline evaluates it (after prepare_for_deployment), cached."""
    key = repr(sorted(settings.items()))
    if key not in _QUANTIZED:
        from quantkit.calibration import CalibrationSet
        from quantkit.export import prepare_for_deployment
        from quantkit.quantize import quantize_model
        from quantkit.recipe import QuantizeSection

        model = tiny_llama()
        ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
        model = quantize_model(model, QuantizeSection(**settings), CalibrationSet(ids, 4, "test"))
        _QUANTIZED[key] = prepare_for_deployment(model)
    return _QUANTIZED[key]


def pipeline_export(settings: dict, tp: int = 1, pp: int = 1) -> tuple[torch.nn.Module, Path]:
    """The fake-quantized model and the TensorRT-LLM checkpoint the pipeline ships for it (float16)."""
    from quantkit.export import export_trtllm

    model = quantized(settings)
    key = (repr(sorted(settings.items())), tp, pp)
    if key not in _EXPORTED:
        out = ROOT / f"{len(_EXPORTED)}"
        export_trtllm(model, out, dtype="float16", tp_size=tp, pp_size=pp)
        _EXPORTED[key] = out
    return model, _EXPORTED[key]


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

    monkeypatch.setattr(export, "layout_tensors", lambda t, cfg: None)
    model, _ = pipeline_export({"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_token"})
    export.export_trtllm(model, tmp_path / "old", dtype="float16")
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


# --------------------------------------------------------------------------- reproduction through the reference
#
# Bounds (relative L2 error of the logits against the fake-quantized model the pipeline evaluates). ModelOpt's
# TensorRT-LLM exporter writes 16-bit checkpoints only (float16 here): the unquantized model exported and run
# through the reference differs from itself by 4.6e-4 (16-bit storage of the weights), so weight-only methods,
# whose codes survive the export, get 2e-3. Where activations are quantized, 16-bit rounding flips activation
# codes (and ModelOpt's packer divides in float16, moving some weight codes one step) and the flips compound:
# these get the 16-bit bounds tests/test_runtime.py derives for the HF checkpoint (measured here: int8_sq 1.6%,
# int8_sq_pt 1.1%, fp8 3.0%, fp8_pcpt 2.8%, w4a8_awq 3.0%, fp8 KV 6.3%: TensorRT-LLM runs K and V with one scale,
# max(k, v), where ModelOpt fakes each with its own).
from test_runtime import _CUDA_BOUND  # noqa: E402 - the 16-bit bounds, one home

METHODS: dict[str, dict] = {
    "none": {"method": "none"},
    "int8_sq": {"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_tensor"},
    "int8_sq_pt": {"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_token"},
    "fp8": {"method": "fp8"},
    "fp8_kv": {"method": "fp8", "kv_cache": "fp8"},
    "fp8_pcpt": {"method": "fp8_pcpt"},
    "int4_awq": {"method": "int4_awq", "block_size": 64, "awq_algorithm": "awq_lite"},
    "int4_rtn": {"method": "int4_rtn", "block_size": 64},
    "w4a8_awq": {"method": "w4a8_awq", "block_size": 64},
    "int8_wo": {"method": "int8_wo"},
}
WEIGHT_ONLY_BOUND = 2e-3
MAPPINGS = [(1, 1), (2, 1), (1, 2)]


WEIGHT_ONLY = {"none", "int4_awq", "int4_rtn", "int8_wo"}


def bound(variant: str) -> float:
    return WEIGHT_ONLY_BOUND if variant in WEIGHT_ONLY else _CUDA_BOUND[variant]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _reproduction_error(variant: str, ckpt: Path) -> float:
    from _runtime_helpers import eval_ids, rel_err

    from quantkit.trtllm_reference import load_reference

    ids = eval_ids()
    return rel_err(_logits(load_reference(ckpt), ids), _logits(quantized(METHODS[variant]), ids))


@pytest.mark.parametrize(("tp", "pp"), MAPPINGS, ids=[f"tp{t}pp{p}" for t, p in MAPPINGS])
@pytest.mark.parametrize("variant", list(METHODS))
def test_checkpoint_reproduces_the_evaluated_model(variant: str, tp: int, pp: int) -> None:
    """Export, check and run through TensorRT-LLM's layer arithmetic (ranks merged back) for every CPU method."""
    import json

    _, ckpt = pipeline_export(METHODS[variant], tp, pp)
    assert sorted(p.name for p in ckpt.glob("rank*.safetensors")) == [f"rank{r}.safetensors" for r in range(tp * pp)]
    assert json.loads((ckpt / "config.json").read_text())["mapping"]["world_size"] == tp * pp
    assert check_trtllm(ckpt) == []
    err = _reproduction_error(variant, ckpt)
    print(f"{variant} tp{tp} pp{pp}: rel err {err:.3g} (bound {bound(variant):g})")
    assert err < bound(variant)


def test_tensor_parallel_ranks_hold_split_shapes() -> None:
    """tp 2: column linears split along out (each rank its own q, k, v heads), row linears along in."""
    _, ckpt = pipeline_export(METHODS["int8_sq_pt"], 2, 1)
    for r in range(2):
        with safe_open(str(ckpt / f"rank{r}.safetensors"), "pt") as f:
            assert f.get_tensor("transformer.layers.0.attention.qkv.weight").shape == (128, 128)  # (64 + 2*32) x in
            assert f.get_tensor("transformer.layers.0.attention.qkv.per_channel_scale").shape == (1, 128)
            assert f.get_tensor("transformer.layers.0.attention.dense.weight").shape == (128, 64)
            assert f.get_tensor("transformer.layers.0.attention.dense.smoother").shape == (1, 64)
            assert f.get_tensor("transformer.layers.0.mlp.proj.weight").shape == (128, 128)


def _corrupt(variant: str, tmp_path: Path, edit) -> Path:
    from _exports import edit_tensors

    _, ckpt = pipeline_export(METHODS[variant])
    target = tmp_path / variant
    shutil.copytree(ckpt, target)
    edit_tensors(target / "rank0.safetensors", edit)
    return target


@pytest.mark.parametrize("variant", ["int8_sq_pt", "w4a8_awq", "fp8"])
def test_negative_controls_fail(variant: str, tmp_path: Path) -> None:
    """A transposed weight or a rescaled scale breaks the reproduction; a renamed tensor fails load and check."""
    from quantkit.errors import QuantkitError
    from quantkit.trtllm_reference import load_reference

    dense = "transformer.layers.0.attention.dense"
    scale = {"int8_sq_pt": "per_channel_scale", "w4a8_awq": "weights_scaling_factor",
             "fp8": "weights_scaling_factor"}[variant]

    def transpose(t: dict) -> None:
        t[f"{dense}.weight"] = t[f"{dense}.weight"].t().contiguous() if variant != "w4a8_awq" else \
            t[f"{dense}.weight"].flip(0).contiguous()  # packed [out/2, in] is not square: reverse its rows

    def rescale(t: dict) -> None:
        for name in [n for n in t if n.endswith("." + scale) and ".layers.0." in n]:
            t[name] = t[name] * 1.25

    for edit in (transpose, rescale):
        err = _reproduction_error(variant, _corrupt(variant, tmp_path / edit.__name__, edit))
        assert err > 2 * bound(variant), (edit.__name__, err)

    renamed = _corrupt(variant, tmp_path / "renamed",
                       lambda t: t.__setitem__(f"{dense}.renamed", t.pop(f"{dense}.{scale}")))
    with pytest.raises(QuantkitError, match=scale):
        load_reference(renamed)
    assert any(v.rule == "scale.missing" and v.tensor_or_field == f"{dense}.{scale}" for v in check_trtllm(renamed))


def test_llama3_rope_reaches_the_checkpoint(tmp_path: Path) -> None:
    """ModelOpt 0.47 under transformers 5 writes no rotary_base / rotary_scaling: TensorRT-LLM would run a
    Llama-3.1 with base 10000 and no llama3 scaling. The reference caught it (1.6% logits error at 100 tokens)."""
    import json

    from _runtime_helpers import eval_ids, rel_err

    from quantkit.export import export_trtllm
    from quantkit.trtllm_reference import load_reference

    model = tiny_llama(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    export_trtllm(model, tmp_path / "t", dtype="float16")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["rotary_base"] == 500000.0 and cfg["rotary_scaling"]["type"] == "llama3"
    ids = eval_ids(seq=100)
    assert rel_err(_logits(load_reference(tmp_path / "t"), ids), _logits(model, ids)) < WEIGHT_ONLY_BOUND
    cfg.pop("rotary_scaling")
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    assert rel_err(_logits(load_reference(tmp_path / "t"), ids), _logits(model, ids)) > 5 * WEIGHT_ONLY_BOUND


def test_per_token_smoothquant_refuses_excluded_decoder_linears(tmp_path: Path) -> None:
    """smooth_quantize_plugin swaps every decoder layer (no exclusion): a checkpoint with an excluded decoder
    linear cannot be expressed in the plugin layout, and per-token activations have no static scales for the
    non-plugin algo. One error, nothing written."""
    from quantkit.errors import QuantkitError
    from quantkit.export import export_trtllm

    model = quantized({"method": "int8_sq", "smoothquant_alpha": 0.5, "activations": "per_token",
                       "exclude": ["lm_head", "layers.1.mlp.down_proj"]})
    with pytest.raises(QuantkitError, match=r"layers\.1\.mlp\.proj"):
        export_trtllm(model, tmp_path / "t", dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_reference_moves_every_tensor_it_reads_with_to() -> None:
    """On the H200 the reference failed with 'Expected all tensors to be on the same device': the checkpoint tensors
    of each linear sat in a plain dict that `.to(device)` does not see. A dtype move shows the same on CPU."""
    from quantkit.trtllm_reference import TrtLinear, load_reference

    _, ckpt = pipeline_export(METHODS["fp8_kv"], 1, 1)
    model = load_reference(ckpt).to(torch.float64)
    linears = [m for m in model.modules() if isinstance(m, TrtLinear)]
    assert linears
    for m in linears:
        assert m.weight_f.dtype == torch.float64
        assert all(v.dtype == torch.float64 for v in m.t.values() if v.is_floating_point())
    assert all(layer.self_attn.quantkit_k_scale.dtype == torch.float64 for layer in model.model.layers)
