"""int4_hessian: ModelOpt 0.47's local_hessian scale search for INT4 blocks, exported and checked.

Ground truth is independent of quantkit's and ModelOpt's own bookkeeping: the objective is recomputed here from the
unquantized model's layer inputs (per block b: dw_b H_b dw_b^T with H_b = X_b^T X_b, the error the search minimises),
and the exported int4 codes and scales are decoded with the layout TensorRT-LLM reads (tests/test_runtime.py pins it).
"""

from __future__ import annotations

import pytest
import torch
from _runtime_helpers import roundtrip, tiny_llama

from quantkit.calibration import CalibrationSet
from quantkit.methods import build_modelopt_config
from quantkit.quantize import quantize_model
from quantkit.recipe import QuantizeSection
from quantkit.runtime import unpack_modelopt_int4

IDS = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
GROUP = 32


def test_config_is_modelopts_local_hessian_on_the_quantization_groups() -> None:
    from modelopt.torch.quantization.config import LocalHessianCalibConfig

    cfg = build_modelopt_config(QuantizeSection(method="int4_hessian", block_size=GROUP))
    algo = LocalHessianCalibConfig(**cfg["algorithm"])  # ModelOpt's own schema accepts it
    assert (algo.block_size, algo.fp8_scale_sweep) == (GROUP, False)
    weights = [e["cfg"] for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"]
    assert weights[0]["num_bits"] == 4 and weights[0]["block_sizes"][-1] == GROUP


def _layer_inputs() -> dict[str, torch.Tensor]:
    ref, inputs = tiny_llama(), {}
    def keep(m: torch.nn.Module, a: tuple, o: torch.Tensor, n: str) -> None:
        inputs[n] = a[0].detach().reshape(-1, a[0].shape[-1])

    hooks = [m.register_forward_hook(lambda m, a, o, n=n: keep(m, a, o, n))
             for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    with torch.no_grad():
        ref(IDS)
    for h in hooks:
        h.remove()
    return inputs


def _block_hessian_error(x: torch.Tensor, dw: torch.Tensor) -> float:
    """sum over input blocks b of trace(dw_b X_b^T X_b dw_b^T) = sum_b ||X_b dw_b^T||^2."""
    return sum((x[:, b:b + GROUP] @ dw[:, b:b + GROUP].t()).pow(2).sum().item() for b in range(0, x.shape[1], GROUP))


def test_scales_lower_the_block_hessian_error_and_leave_the_weights() -> None:
    inputs, source = _layer_inputs(), dict(tiny_llama().named_modules())
    errs: dict[str, dict[str, float]] = {}
    amax: dict[str, dict[str, torch.Tensor]] = {}
    for method in ("int4_rtn", "int4_hessian"):
        section = QuantizeSection(method=method, block_size=GROUP)
        model = quantize_model(tiny_llama(), section, CalibrationSet(IDS, 4, "t"))
        mods = dict(model.named_modules())
        errs[method], amax[method] = {}, {}
        with torch.no_grad():
            for n, x in inputs.items():
                w0 = source[n].weight
                assert torch.equal(mods[n].weight, w0)  # scales only: the weights themselves are not touched
                errs[method][n] = _block_hessian_error(x, w0 - mods[n].weight_quantizer(w0))
                amax[method][n] = mods[n].weight_quantizer.amax.flatten()
    for n in inputs:
        assert errs["int4_hessian"][n] < errs["int4_rtn"][n], (n, errs["int4_rtn"][n], errs["int4_hessian"][n])
        # each block's amax is max calibration's times one of the search's multipliers (ModelOpt's MseCalibrator:
        # linspace(0.25, 4.0, 39)), and they differ between blocks: a search per block, not one factor per layer
        ratio = amax["int4_hessian"][n] / amax["int4_rtn"][n]
        grid = torch.linspace(0.25, 4.0, 39)
        assert (ratio[:, None] - grid).abs().min(1).values.max() < 1e-4, n
        assert len(ratio.round(decimals=3).unique()) > 1, n


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"])
def test_exported_codes_and_scales_are_the_evaluated_weights(name: str) -> None:
    from safetensors.torch import load_file

    rt = roundtrip("int4_hessian")
    t = load_file(str(rt.hf_dir / "model.safetensors"))
    q, scale = unpack_modelopt_int4(t[f"{name}.weight"]).float(), t[f"{name}.weight_scale"].float()
    assert f"{name}.pre_quant_scale" not in t  # the format of int4_rtn: scales and codes only
    lin = dict(rt.fake.named_modules())[name]
    with torch.no_grad():
        evaluated = lin.weight_quantizer(lin.weight).float().cpu()
    deq = q * scale.repeat_interleave(q.shape[1] // scale.shape[1], 1)
    assert (deq - evaluated).abs().max() < 1e-5 * evaluated.abs().max()
    # the searched scales are not max calibration's (amax / 7 per block)
    w = lin.weight.detach().float().cpu()
    rtn_scale = w.reshape(w.shape[0], scale.shape[1], -1).abs().amax(-1) / 7
    assert (scale - rtn_scale).abs().max() > 1e-3 * rtn_scale.max()


@pytest.mark.parametrize("section", [{"method": "int4_hessian", "block_size": GROUP},
                                     {"method": "int4_gptq", "block_size": GROUP, "gptq_block": 64,
                                      "gptq_scales": "local_hessian"}], ids=["int4_hessian", "int4_gptq"])
def test_resume_state_restores_the_searched_model(tmp_path, section: dict) -> None:
    """The small resume state (quantizer state + rewritten weights) gives back the searched scales bit for bit."""
    from quantkit import resume

    model = tiny_llama()
    source = resume.weight_checksums(model)
    with resume.record_weight_folds(model) as folds:
        quantize_model(model, QuantizeSection(**section), CalibrationSet(IDS, 4, "t"))
    path = tmp_path / resume.STATE_FILE
    path.write_bytes(resume.state_bytes(model, folds, source_checksums=source))
    restored, _ = resume.restore(tiny_llama(), path)
    want, got = model.state_dict(), restored.state_dict()
    assert set(want) == set(got)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    assert any(k.endswith("weight_quantizer._amax") for k in want)  # the searched scales are in what was compared
