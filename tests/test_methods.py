"""Each method on a tiny random Llama: the exports hold real int8 / packed int4 / fp8 weights whose
dequantized values equal the in-memory fake-quantized weights, with the scale tensors each format needs."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny import make_tiny_llama
from safetensors import safe_open

from quantkit.calibration import CalibrationSet
from quantkit.errors import QuantkitError
from quantkit.export import export_hf, export_trtllm
from quantkit.methods import METHODS, build_modelopt_config
from quantkit.quantize import ForwardCounter, check_shapes, quantize_model
from quantkit.recipe import QuantizeSection

LAYER = "model.layers.1.self_attn.o_proj"  # maps 1:1 to the export (q/k/v get fused or folded)


def quantized(tmp_path, calib_ids, **kw):
    model = make_tiny_llama(vocab=256).to(torch.bfloat16)  # as the pipeline loads models
    model = quantize_model(model, QuantizeSection(**kw), CalibrationSet(calib_ids % 256, 4, "t"))
    export_trtllm(model, tmp_path / "trtllm")
    export_hf(model, tmp_path / "hf")
    return model


def tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def fake_quant_weight(model, name=LAYER):
    layer = model.get_submodule(name)
    with torch.no_grad():
        return layer.weight_quantizer(layer.weight).float()


def assert_dequantizes_to(deq: torch.Tensor, fake: torch.Tensor, step: torch.Tensor) -> None:
    """Equal to the fake-quantized weight, up to one step where the bf16 export rounded across a boundary."""
    diff = (deq - fake).abs()
    assert bool((diff <= step * 1.01 + 1e-7).all())
    # bf16 keeps 8 significant bits; the exporter divides in fp32, so a few values round the other way
    assert float((diff > 1e-6 + fake.abs() / 128).float().mean()) < 0.05


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's HF layout: byte [r, c] holds rows 2r (low nibble) and 2r+1 (high), two's complement."""
    p = packed.to(torch.int16)
    low, high = p & 0x0F, (p >> 4) & 0x0F
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(2 * packed.shape[0], packed.shape[1])


def test_int8_sq(tmp_path, calib_ids):
    model = quantized(tmp_path, calib_ids, method="int8_sq", smoothquant_alpha=0.5, activations="per_tensor")
    hf = tensors(tmp_path / "hf" / "model.safetensors")
    w, s = hf[f"{LAYER}.weight"], hf[f"{LAYER}.weight_scale"]
    assert w.dtype == torch.int8 and w.shape == (128, 128) and s.shape == (128,)
    assert int(w.abs().max()) == 127  # per-channel max maps to 127
    assert_dequantizes_to(w.float() * s[:, None], fake_quant_weight(model), s[:, None].expand(-1, 128))
    assert hf[f"{LAYER}.input_scale"].numel() == 1 and hf[f"{LAYER}.pre_quant_scale"].shape == (128,)
    config = json.loads((tmp_path / "trtllm" / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    trt = tensors(tmp_path / "trtllm" / "rank0.safetensors")
    assert trt["transformer.layers.0.attention.qkv.weight"].dtype == torch.int8
    assert trt["transformer.layers.0.attention.qkv.weights_scaling_factor"].shape == (128 + 2 * 64,)
    assert trt["transformer.layers.0.attention.qkv.activation_scaling_factor"].numel() == 1


@pytest.mark.parametrize("method", ["int4_awq", "int4_rtn"])
def test_int4_blockwise(tmp_path, calib_ids, method):
    kw = {"awq_algorithm": "awq_lite"} if method == "int4_awq" else {}  # awq_lite writes pre-quant scales
    model = quantized(tmp_path, calib_ids, method=method, block_size=64, **kw)
    hf = tensors(tmp_path / "hf" / "model.safetensors")
    packed, scale = hf[f"{LAYER}.weight"], hf[f"{LAYER}.weight_scale"]
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128)  # [out/2, in]
    assert scale.shape == (128, 2)  # [out, in/block]
    q = unpack_int4(packed)
    assert q.min() >= -8 and q.max() <= 7
    deq = q.float() * scale.repeat_interleave(64, dim=1)
    assert_dequantizes_to(deq, fake_quant_weight(model), scale.repeat_interleave(64, dim=1))
    config = json.loads((tmp_path / "trtllm" / "config.json").read_text())["quantization"]
    assert (config["quant_algo"], config["group_size"]) == ("W4A16_AWQ", 64)
    trt = tensors(tmp_path / "trtllm" / "rank0.safetensors")
    assert trt["transformer.layers.0.attention.dense.weights_scaling_factor"].shape == (128, 2)
    has_prequant = "transformer.layers.0.attention.dense.prequant_scaling_factor" in trt
    assert has_prequant == (method == "int4_awq")  # RTN has no AWQ scales


@pytest.mark.parametrize("kv_cache", [None, "fp8"])
def test_fp8(tmp_path, calib_ids, kv_cache):
    model = quantized(tmp_path, calib_ids, method="fp8", kv_cache=kv_cache)
    hf = tensors(tmp_path / "hf" / "model.safetensors")
    w, s = hf[f"{LAYER}.weight"], hf[f"{LAYER}.weight_scale"]
    assert w.dtype == torch.float8_e4m3fn and s.numel() == 1
    fake = fake_quant_weight(model)
    assert_dequantizes_to(w.float() * s, fake, fake.abs() / 8)  # E4M3 has 3 mantissa bits
    assert float(w.float().abs().max()) == 448.0  # the per-tensor max maps to E4M3's largest value
    quant = json.loads((tmp_path / "trtllm" / "config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "FP8" and quant["kv_cache_quant_algo"] == ("FP8" if kv_cache else None)
    trt = tensors(tmp_path / "trtllm" / "rank0.safetensors")
    assert ("transformer.layers.0.attention.kv_cache_scaling_factor" in trt) == bool(kv_cache)
    assert ("model.layers.0.self_attn.k_proj.k_scale" in hf) == bool(kv_cache)


def test_excluded_modules_stay_in_high_precision(tmp_path, calib_ids):
    quantized(tmp_path, calib_ids, method="fp8", exclude=["lm_head", "mlp.down_proj"])
    hf = tensors(tmp_path / "hf" / "model.safetensors")
    assert hf["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16 or \
        hf["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert "model.layers.0.mlp.down_proj.weight_scale" not in hf
    assert hf["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("method", ["int4_rtn", "int8_wo"])
def test_data_free_methods_make_no_calibration_forward(calib_ids, method):
    model = make_tiny_llama(vocab=256)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    counter = ForwardCounter()
    kw = {"block_size": 64} if method == "int4_rtn" else {}
    quantize_model(model, QuantizeSection(method=method, **kw), CalibrationSet(calib_ids % 256, 4, "t"), counter)
    assert counter.batches == 0 and forwards == []
    assert model.model.layers[0].self_attn.q_proj.weight_quantizer.amax is not None  # still calibrated


def test_calibrated_methods_run_every_batch(calib_ids):
    counter = ForwardCounter()
    quantize_model(make_tiny_llama(vocab=256), QuantizeSection(method="fp8"), CalibrationSet(calib_ids % 256, 4, "t"),
                   counter)
    assert counter.batches == 2  # 8 samples / batch 4


def test_block_size_that_does_not_divide_fails_before_calibration():
    model = make_tiny_llama(hidden=96, vocab=256)  # in-features 96 and 192
    with pytest.raises(QuantkitError) as err:
        check_shapes(model, QuantizeSection(method="int4_awq", block_size=64))
    assert err.value.where == "quantize.block_size" and "set quantize.block_size to 32" in str(err.value)


def test_configs_come_from_modelopt_presets():
    import modelopt.torch.quantization as mtq

    cfg = build_modelopt_config(QuantizeSection(method="int4_awq", block_size=64, awq_algorithm="awq_clip"))
    assert cfg["algorithm"]["method"] == "awq_clip"
    weight = next(e for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer")
    assert weight["cfg"]["block_sizes"][-1] == 64 and weight["cfg"]["num_bits"] == 4
    sq = build_modelopt_config(QuantizeSection(method="int8_sq", smoothquant_alpha=0.8, activations="per_token"))
    assert sq["algorithm"] == {"method": "smoothquant", "alpha": 0.8}
    auto = build_modelopt_config(QuantizeSection(method="int8_sq", smoothquant_alpha="auto"))
    assert auto["algorithm"] is None  # quantkit.smoothquant calibrates per layer
    assert build_modelopt_config(QuantizeSection(method="fp8"))["quant_cfg"][:3] == mtq.FP8_DEFAULT_CFG["quant_cfg"][:3]
    assert build_modelopt_config(QuantizeSection(method="none", exclude=[])) is None
    assert set(METHODS) >= {"none", "int8_sq", "int4_awq", "int4_rtn", "fp8", "w4a8_awq", "int8_wo"}


def test_smoothquant_alpha_auto_picks_per_layer_alphas(calib_ids):
    from quantkit.smoothquant import ALPHA_GRID, layer_error

    model = make_tiny_llama(vocab=256).to(torch.bfloat16)
    model = quantize_model(model, QuantizeSection(method="int8_sq", smoothquant_alpha="auto"),
                           CalibrationSet(calib_ids % 256, 4, "t"))
    alphas = model.quantkit_smoothquant_alphas
    assert len(alphas) == 2 * 7 and set(alphas.values()) <= set(ALPHA_GRID)  # every linear of 2 layers
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.input_quantizer.pre_quant_scale is not None and layer.input_quantizer.is_enabled
    # The search criterion itself: on inputs with a few outlier channels, smoothing beats none (alpha 0).
    torch.manual_seed(0)
    x, w = torch.randn(256, 64), torch.randn(32, 64) * 0.05
    x[:, :3] *= 50
    amax = x.abs().amax(dim=0)
    assert min(layer_error(x, w, amax, a, True) for a in ALPHA_GRID) < layer_error(x, w, amax, 0.0, True)


def test_per_token_smoothquant_exports_the_per_token_algo(tmp_path, calib_ids):
    model = quantized(tmp_path, calib_ids, method="int8_sq", smoothquant_alpha=0.5, activations="per_token")
    layer = model.get_submodule(LAYER)
    assert layer.input_quantizer._dynamic and layer.input_quantizer.block_sizes == {-1: None}
    trt_cfg = json.loads((tmp_path / "trtllm" / "config.json").read_text())["quantization"]
    assert trt_cfg["quant_algo"] == "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    trt = tensors(tmp_path / "trtllm" / "rank0.safetensors")
    assert not [k for k in trt if k.endswith("activation_scaling_factor")]  # scales come per token at run time
    # the plugin layout (quantkit.trtllm_layout): per_channel_scale [1, out], the row linear's smoother [1, in]
    assert trt["transformer.layers.0.attention.dense.per_channel_scale"].shape == (1, 128)
    hf = tensors(tmp_path / "hf" / "model.safetensors")
    assert f"{LAYER}.input_scale" not in hf and hf[f"{LAYER}.weight"].dtype == torch.int8
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["quant_algo"] == \
        "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
