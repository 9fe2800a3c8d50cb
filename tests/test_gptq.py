"""int4_gptq: ModelOpt's GPTQ behind the method registry, exported, checked and reproduced.

Ground truth is independent of quantkit: the exported int4 codes and scales are decoded with the layout TensorRT-LLM
reads (tests/test_runtime.py pins it), and GPTQ's purpose is checked on the layer outputs it minimises.
"""

from __future__ import annotations

import pytest
import torch
from _runtime_helpers import roundtrip, tiny_llama

from quantkit.calibration import CalibrationSet
from quantkit.errors import QuantkitError
from quantkit.methods import build_modelopt_config, resolved_settings
from quantkit.quantize import quantize_model
from quantkit.recipe import QuantizeSection
from quantkit.runtime import unpack_modelopt_int4


def test_knobs_reach_modelopt_gptq_config() -> None:
    from modelopt.torch.quantization.config import GPTQCalibConfig

    q = QuantizeSection(method="int4_gptq", block_size=32, gptq_damping=0.05, gptq_block=64, gptq_layerwise=False)
    cfg = build_modelopt_config(q)
    scales, gptq = cfg["algorithm"]  # default gptq_scales local_hessian: the scale search, then GPTQ
    assert scales["method"] == "local_hessian" and scales["block_size"] == 32
    assert build_modelopt_config(q.model_copy(update={"gptq_scales": "max"}))["algorithm"] == gptq
    algo = GPTQCalibConfig(**gptq)  # ModelOpt's own schema accepts it
    assert (algo.perc_damp, algo.block_size, algo.layerwise.enable) == (0.05, 64, False)
    weights = [e["cfg"] for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
    assert weights[0]["num_bits"] == 4 and weights[0]["block_sizes"][-1] == 32
    defaults = resolved_settings(QuantizeSection(method="int4_gptq"))
    assert (defaults["gptq_layerwise"], defaults["gptq_damping"], defaults["gptq_act_order"]) == (True, 0.1, True)


def test_gptq_block_must_be_a_multiple_of_the_group() -> None:
    with pytest.raises(QuantkitError, match="gptq_block 96 is not a multiple of block_size 64"):
        build_modelopt_config(QuantizeSection(method="int4_gptq", block_size=64, gptq_block=96))


def test_gptq_knobs_rejected_elsewhere() -> None:
    with pytest.raises(ValueError, match="'gptq_damping' does not apply to method 'int4_awq'"):
        QuantizeSection(method="int4_awq", gptq_damping=0.1)


def _codes_and_scales(variant: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    t = load_file(str(roundtrip(variant).hf_dir / "model.safetensors"))
    return unpack_modelopt_int4(t[f"{name}.weight"]).float(), t[f"{name}.weight_scale"].float()


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
def test_exported_weights_dequantize_to_the_evaluated_weights(name: str) -> None:
    """codes x scale from the checkpoint equal the fake-quantized weight the model computes with, within one step."""
    rt = roundtrip("int4_gptq")
    q, scale = _codes_and_scales("int4_gptq", name)
    lin = dict(rt.fake.named_modules())[name]
    with torch.no_grad():
        evaluated = lin.weight_quantizer(lin.weight).float().cpu()
    step = scale.repeat_interleave(q.shape[1] // scale.shape[1], 1)
    deq = q * step
    assert ((deq - evaluated).abs() <= step + 1e-6).all()
    assert (deq - evaluated).abs().max() < 1e-5 * evaluated.abs().max()  # in fact exact in float32
    # and GPTQ did something: its codes are not plain rounding of the original weights
    q_rtn, _ = _codes_and_scales("int4_rtn", name)
    assert (q != q_rtn).float().mean() > 0.05


def test_gptq_lowers_the_layer_output_error_it_minimises() -> None:
    """GPTQ minimises ||X W^T - X Wq^T|| on the calibration activations: it must beat RTN there, layer by layer."""
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    inputs: dict[str, torch.Tensor] = {}
    ref = tiny_llama()
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        ref(ids)
    for h in hooks:
        h.remove()
    errs = {}
    for method in ("int4_rtn", "int4_gptq"):
        kw = {"gptq_block": 64, "gptq_layerwise": False} if method == "int4_gptq" else {}
        model = quantize_model(tiny_llama(), QuantizeSection(method=method, block_size=64, **kw),
                               CalibrationSet(ids, 4, "test"))
        mods = dict(model.named_modules())
        errs[method] = {}
        with torch.no_grad():
            for n, x in inputs.items():
                w0 = dict(ref.named_modules())[n].weight
                wq = mods[n].weight_quantizer(mods[n].weight)
                errs[method][n] = ((x @ (w0 - wq).t()).norm() / (x @ w0.t()).norm()).item()
    better = [n for n in inputs if errs["int4_gptq"][n] < errs["int4_rtn"][n]]
    assert len(better) == len(inputs), {n: (errs["int4_rtn"][n], errs["int4_gptq"][n]) for n in inputs}


def test_group_local_update_is_modelopts_update_bit_for_bit() -> None:
    """quantkit's faster GPTQ column update gives exactly the weights of ModelOpt's own `gptq_blockwise_update`."""
    import modelopt.torch.quantization.utils.calib_utils as calib_utils

    from quantkit import quantize as qz

    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    # stored column order: the order ModelOpt's own update knows (act order is tests/test_gptq_act_order.py's)
    section = QuantizeSection(method="int4_gptq", block_size=32, gptq_block=64, gptq_act_order=False)
    calls: list[str] = []
    own, original = qz._gptq_update_by_group, calib_utils.gptq_blockwise_update

    def spy_own(*a):
        calls.append("quantkit")
        return own(*a)

    def spy_modelopt(*a):
        calls.append("modelopt")
        return original(*a)

    weights = {}
    for name, patch in (("modelopt", lambda **kw: qz.contextlib.nullcontext()), ("quantkit", qz.group_local_gptq)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qz, "_gptq_update_by_group", spy_own)
            mp.setattr(calib_utils, "gptq_blockwise_update", spy_modelopt)
            mp.setattr(qz, "group_local_gptq", patch)
            model = quantize_model(tiny_llama(), section, CalibrationSet(ids, 4, "test"))
        weights[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert calls.count("modelopt") == calls.count("quantkit") == 14  # 7 linears x 2 layers, each path once
    source = tiny_llama().state_dict()
    moved = [n for n in weights["quantkit"] if not torch.equal(weights["modelopt"][n], source[n])]
    assert len(moved) == 14  # GPTQ rewrote every quantized linear weight ...
    for n in weights["quantkit"]:
        assert torch.equal(weights["quantkit"][n], weights["modelopt"][n]), n  # ... identically on both paths


def test_gptq_on_local_hessian_scales_keeps_the_searched_scales() -> None:
    """gptq_scales: local_hessian: GPTQ updates the weights on int4_hessian's block scales, not max calibration's.

    ModelOpt 0.47 cannot run this list itself: its `gptq` starts with max_calibrate, which fails on the calibrators
    local_hessian leaves behind (and would reset the scales otherwise): the negative control below.
    """
    import modelopt.torch.quantization as mtq

    from quantkit import quantize as qz

    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    calib = CalibrationSet(ids, 4, "test")

    def amax_and_weights(section: QuantizeSection) -> tuple[dict, dict]:
        model = quantize_model(tiny_llama(), section, calib)
        mods = dict(model.named_modules())
        names = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        return ({n: mods[n].weight_quantizer.amax.detach().clone() for n in names},
                {n: mods[n].weight.detach().clone() for n in names})

    searched, w_source = amax_and_weights(QuantizeSection(method="int4_hessian", block_size=32))
    rtn, _ = amax_and_weights(QuantizeSection(method="int4_rtn", block_size=32))
    combo = QuantizeSection(method="int4_gptq", block_size=32, gptq_block=64, gptq_scales="local_hessian")
    assert [a["method"] for a in build_modelopt_config(combo)["algorithm"]] == ["local_hessian", "gptq"]
    kept, w_gptq = amax_and_weights(combo)
    for n in searched:
        assert torch.equal(kept[n], searched[n]), n  # the searched scales survive GPTQ ...
        assert not torch.equal(searched[n], rtn[n]), n  # ... and they are not max calibration's
        assert not torch.equal(w_gptq[n], w_source[n]), n  # and GPTQ did update the weights
    with pytest.raises(TypeError, match="NoneType"), qz.group_local_gptq():
        mtq.quantize(tiny_llama(), build_modelopt_config(combo), lambda m: [m(b) for b in calib.batches()])


def test_gptq_on_searched_scales_refuses_a_quantizer_the_search_left_uncalibrated() -> None:
    """The scale keeper skips GPTQ's max calibration only where every enabled quantizer already has its scale: one
    that the calibration never reached is a clear error naming it, not GPTQ on an undefined scale."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import model_calib

    from quantkit import quantize as qz

    cfg = build_modelopt_config(QuantizeSection(method="int4_rtn", block_size=32))
    model = mtq.quantize(tiny_llama(), {**cfg, "algorithm": None})  # quantizers inserted, never calibrated
    with qz.kept_weight_scales(model), pytest.raises(QuantkitError, match=r"without an amax \(first: .*proj"):
        model_calib.max_calibrate(model)
