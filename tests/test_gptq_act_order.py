"""int4_gptq `gptq_act_order`: GPTQ's activation order with static groups, checked against properties of the algorithm.

Ground truth is not quantkit's restatement of the update: (1) GPTQ processes columns in descending Hessian-diagonal
order, so where the stored order already descends, act order is the plain path bit for bit; (2) with static groups
the result depends on the input features only through their values, so permuting a layer's input features together
with its calibration inputs (groups kept as sets) permutes the result, which the stored-order GPTQ does not do;
(3) act order lowers the Hessian-weighted error GPTQ minimises when large-input features come last (the GPTQ
paper's motivation); (4) the checkpoint still reproduces the evaluated model (tests/test_gptq.py's decoder).
"""

from __future__ import annotations

import pytest
import torch
from _runtime_helpers import tiny_llama

from quantkit import quantize as qz
from quantkit.calibration import CalibrationSet
from quantkit.methods import build_modelopt_config, resolved_settings
from quantkit.quantize import quantize_model
from quantkit.recipe import QuantizeSection

GROUP = 16


class _OneLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _gptq_one_linear(weight: torch.Tensor, x: torch.Tensor, act_order: bool, calls: list | None = None,
                     damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (ModelOpt's, on max-calibrated static groups) of one linear layer.

    Returns the fake-quantized weight, the block amax, and plain rounding of the original weight on those scales."""
    section = QuantizeSection(method="int4_gptq", block_size=GROUP, gptq_block=2 * GROUP, gptq_scales="max",
                              gptq_layerwise=False, gptq_damping=damping)
    model = _OneLinear(weight)
    with pytest.MonkeyPatch.context() as mp:
        if calls is not None:
            own = qz._update_weights_act_order
            mp.setattr(qz, "_update_weights_act_order", lambda *a: (calls.append(1), own(*a))[1])
        with torch.no_grad(), qz.group_local_gptq(act_order=act_order):
            model = qz.quantize_in_steps(model, build_modelopt_config(section), lambda m: [m(b) for b in x])
    with torch.no_grad():
        q = model.proj.weight_quantizer
        return q(model.proj.weight).detach(), q.amax.detach(), q(weight).detach()


def _hessian(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).double()
    return flat.t() @ flat


def test_act_order_is_the_default_and_off_is_the_stored_order_path() -> None:
    """Off: the act-order update never runs (and the stored-order update is ModelOpt's bit for bit: test_gptq.py)."""
    assert resolved_settings(QuantizeSection(method="int4_gptq"))["gptq_act_order"] is True
    with pytest.raises(ValueError, match="'gptq_act_order' does not apply to method 'int4_awq'"):
        QuantizeSection(method="int4_awq", gptq_act_order=True)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    own = qz._update_weights_act_order
    for act_order, runs in ((False, 0), (None, 14)):  # None: the default; 7 linears x 2 layers
        calls: list[int] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qz, "_update_weights_act_order", lambda *a, calls=calls: (calls.append(1), own(*a))[1])
            quantize_model(tiny_llama(), QuantizeSection(method="int4_gptq", block_size=32, gptq_block=64,
                                                         gptq_act_order=act_order), CalibrationSet(ids, 4, "test"))
        assert len(calls) == runs, act_order


def test_descending_hessian_diagonal_gives_the_plain_path_bit_for_bit() -> None:
    """Where the stored column order is already GPTQ's activation order, both paths must agree exactly."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 4 * GROUP, generator=g)
    x = torch.randn(6, 32, 4 * GROUP, generator=g)
    x = x / x.reshape(-1, 4 * GROUP).norm(dim=0) * torch.linspace(3.0, 0.5, 4 * GROUP)  # exact descending energy
    perm = qz.act_order_permutation(_hessian(x).float())
    assert torch.equal(perm, torch.arange(4 * GROUP))  # the premise: the diagonal descends
    calls: list[int] = []
    plain, _, rtn = _gptq_one_linear(weight, x, act_order=False)
    ordered, _, _ = _gptq_one_linear(weight, x, act_order=True, calls=calls)
    assert calls == [1]  # the act-order path ran ...
    assert torch.equal(ordered, plain)  # ... and gave the plain path's weights
    assert (plain != rtn).float().mean() > 0.1  # which are GPTQ's, not plain rounding (a real update to compare)


def _group_preserving_permutation(n_groups: int, seed: int) -> torch.Tensor:
    """Reverses the order of the groups and shuffles the columns inside each: every group stays one group."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([k * GROUP + torch.randperm(GROUP, generator=g) for k in reversed(range(n_groups))])


def test_permuting_features_with_the_inputs_permutes_the_act_order_result() -> None:
    g = torch.Generator().manual_seed(4)
    n_groups = 4
    weight = torch.randn(16, n_groups * GROUP, generator=g)
    x = torch.randn(4, 16, n_groups * GROUP, generator=g)  # no ties in the Hessian diagonal
    p = _group_preserving_permutation(n_groups, 5)
    for act_order in (True, False):
        wq, amax, _ = _gptq_one_linear(weight, x, act_order)
        wq_p, amax_p, _ = _gptq_one_linear(weight[:, p], x[..., p], act_order)
        assert torch.equal(amax_p.reshape(16, n_groups), amax.reshape(16, n_groups).flip(1))  # same groups' scales
        if act_order:
            assert torch.equal(wq_p, wq[:, p])
        else:  # control: the stored-order update depends on the layout
            assert (wq_p != wq[:, p]).float().mean() > 0.1


def test_act_order_lowers_the_hessian_weighted_error_when_large_inputs_come_last() -> None:
    """tr(dW H dW^T), GPTQ's objective on its calibration inputs, with the high-energy features stored last."""
    errs: dict[bool, list[float]] = {True: [], False: []}
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        cols = 4 * GROUP
        weight = torch.randn(32, cols, generator=g)
        energy = torch.ones(cols)
        energy[-GROUP // 2:] = 8.0  # a few outlier features, as in LLM activations, at the end of the stored order
        x = torch.randn(8, 32, cols, generator=g) * energy
        h = _hessian(x)
        for act_order in (True, False):
            wq, _, _ = _gptq_one_linear(weight, x, act_order)
            dw = (wq - weight).double()
            errs[act_order].append(torch.trace(dw @ h @ dw.t()).item())
    assert all(a < 0.9 * b for a, b in zip(errs[True], errs[False], strict=True)), errs  # measured: about 0.8


def test_act_order_checkpoint_reproduces_the_evaluated_weights(tmp_path) -> None:
    """End to end on the tiny Llama (local_hessian scales, layer-wise): int4 codes x scales from the HF checkpoint
    decode, with the layout TensorRT-LLM reads, to the weights the fake-quantized model computes with."""
    from safetensors.torch import load_file

    from quantkit.export import export_hf, prepare_for_deployment
    from quantkit.runtime import unpack_modelopt_int4

    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    section = QuantizeSection(method="int4_gptq", block_size=32, gptq_block=64, gptq_act_order=True)
    model = quantize_model(tiny_llama(), section, CalibrationSet(ids, 4, "test"))
    plain = quantize_model(tiny_llama(), section.model_copy(update={"gptq_act_order": False}),
                           CalibrationSet(ids, 4, "test"))
    prepare_for_deployment(model)
    export_hf(model, tmp_path / "hf", dtype="float32")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    mods, plain_mods = dict(model.named_modules()), dict(plain.named_modules())
    names = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert len(names) == 14
    for name in names:
        codes = unpack_modelopt_int4(tensors[f"{name}.weight"]).float()
        scale = tensors[f"{name}.weight_scale"].float()
        step = scale.repeat_interleave(codes.shape[1] // scale.shape[1], 1)
        with torch.no_grad():
            evaluated = mods[name].weight_quantizer(mods[name].weight).float()
            other = plain_mods[name].weight_quantizer(plain_mods[name].weight).float()
        assert (codes * step - evaluated).abs().max() < 1e-5 * evaluated.abs().max(), name
        assert not torch.equal(evaluated, other), name  # act order changed this layer's result
