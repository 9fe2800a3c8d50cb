"""Resume state: what calibration found, without a copy of the weights.

A rerun (other evaluation tasks, a crash after calibration) reloads the source weights and restores onto them:
- ModelOpt's own state (`mto.modelopt_state`: which quantizers exist and how they are configured),
- every quantizer's tensors (amax, pre-quant scales, ...; `get_quantizer_state_dict`; block-wise and per-channel
  weight amax as one-byte codes over the weights' block maxima, see `_encode_amax`) and the tensor attributes
  ModelOpt keeps outside the state dict (`_amax_for_smoothing`, read again when fused layers are re-smoothed),
- the calibration's in-place weight edits. SmoothQuant and AWQ-lite fold a per-input-channel scale into the
  weight (`model_calib._apply_weight_pre_quant_scale`, the only place ModelOpt 0.47's calibration writes
  weights); the fp32 scale of every fold is recorded and replayed with the same arithmetic, so the restored
  weights are bit-identical. An exact integer checksum of every weight proves it on restore.
For an 8B model this is a few MB instead of the 16 GB `mto.save` writes (weights included).
Algorithms that rewrite weights outright (GPTQ's error feedback) cannot be replayed from scales: the weights they
changed are stored as they are (`rewritten`), so an int4_gptq state is about the size of its quantized layers.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

STATE_FILE = "quantizer_state.pth"
FORMAT = 1
_EXTRA_ATTRS = ("_amax_for_smoothing",)  # quantizer tensors ModelOpt sets as plain attributes
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@contextlib.contextmanager
def record_weight_folds(model: torch.nn.Module) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Record (linear name, fp32 scale) for every pre-quant scale folded into a weight while the block runs."""
    from modelopt.torch.quantization import model_calib

    original = model_calib._apply_weight_pre_quant_scale
    names = {id(m): n for n, m in model.named_modules()}
    folds: list[tuple[str, torch.Tensor]] = []

    def recording(linear: torch.nn.Module, pre_quant_scale: torch.Tensor) -> None:
        if model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS:  # else the scale lives in a quantizer buffer
            folds.append((names[id(linear)], pre_quant_scale.detach().to(torch.float32).cpu().clone()))
        original(linear, pre_quant_scale)

    model_calib._apply_weight_pre_quant_scale = recording
    try:
        yield folds
    finally:
        model_calib._apply_weight_pre_quant_scale = original


def _fold(linear: torch.nn.Module, scale: torch.Tensor) -> None:
    # The same expression as model_calib._apply_weight_pre_quant_scale, so the bits match.
    w = linear.weight
    w.data.copy_((w * scale.to(w.device).squeeze()[None, :]).to(w.dtype))


CHECKSUM_CHUNK = 1 << 24  # elements summed at a time: the int64 temporary stays at 128 MiB


def bits_sum(t: torch.Tensor) -> int:
    """Exact integer sum of a tensor's bits, read as signed integers of its element size.

    `sum(dtype=torch.int64)` casts its whole input to int64 first: for an 8B model's 1 GiB embedding that is a 4 GiB
    temporary on the GPU (the peak the 8B cost table showed above direct ModelOpt). Chunks bound it; integer
    addition is exact, so the value is the same."""
    flat = t.detach().contiguous().view(_INT_VIEW[t.element_size()]).reshape(-1)
    return sum(int(c.sum(dtype=torch.int64)) for c in flat.split(CHECKSUM_CHUNK))


def weight_checksums(model: torch.nn.Module) -> dict[str, int]:
    """Exact integer sum of each resident parameter's bits (offloaded ones, on meta, are skipped)."""
    with torch.no_grad():
        return {name: bits_sum(p) for name, p in model.named_parameters()
                if not p.is_meta and p.element_size() in _INT_VIEW}


def _block_max(weight: torch.Tensor, amax: torch.Tensor) -> torch.Tensor | None:
    """Each block's absolute maximum, in amax's shape and dtype: what max calibration finds for block-wise and
    per-channel weight amax (row-major blocks of weight.numel() / amax.numel() elements). None if it cannot apply."""
    if weight.is_meta or amax.numel() <= 1 or weight.numel() % amax.numel():
        return None
    block = weight.numel() // amax.numel()
    w = weight.detach().reshape(-1, block).to(amax.device)
    return w.abs().amax(dim=-1).to(amax.dtype).reshape(amax.shape)


def _encode_amax(amax: torch.Tensor, derived: torch.Tensor) -> dict:
    """Weight amax as codes over the block maxima: 0 = the block max itself (max calibration, AWQ-lite), k = the
    block max times ratios[k-1] (AWQ-clip's shrink grid, found from the data and verified bit for bit); values that
    fit neither are stored as they are. An 8B model's block amax shrink from 4 bytes to 1 per block."""
    codes = torch.zeros(amax.shape, dtype=torch.uint8, device=amax.device)
    done = amax == derived
    ratios: list[float] = []
    if not bool(done.all()):
        cand = torch.unique(torch.round((amax[~done] / derived[~done]).double() * 100) / 100).tolist()
        for r in [c for c in cand if 0 < c < 1][:254]:
            hit = ~done & ((derived * r) == amax)
            if bool(hit.any()):
                ratios.append(r)
                codes[hit] = len(ratios)
                done |= hit
    rest = (~done).flatten().nonzero().flatten()
    return {"codes": codes.cpu() if ratios else None, "ratios": ratios, "rest_idx": rest.cpu(),
            "rest": amax.flatten()[rest].cpu(), "shape": tuple(amax.shape), "dtype": amax.dtype}


def _decode_amax(spec: dict, derived: torch.Tensor) -> torch.Tensor:
    amax = derived.clone()
    if spec["codes"] is not None:
        codes = spec["codes"].to(derived.device)
        for k, r in enumerate(spec["ratios"], 1):
            hit = codes == k
            amax[hit] = (derived * r)[hit]
    flat = amax.view(-1)
    flat[spec["rest_idx"].to(flat.device)] = spec["rest"].to(flat.device, flat.dtype)
    return amax


def _owner_weight(modules: dict, quantizer_name: str) -> torch.Tensor | None:
    owner, sep, _ = quantizer_name.rpartition(".weight_quantizer")
    return getattr(modules.get(owner), "weight", None) if sep else None


def state_bytes(model: torch.nn.Module, folds: list[tuple[str, torch.Tensor]], extra: dict | None = None,
                source_checksums: dict[str, int] | None = None) -> bytes:
    """Serialize the resume state of a just-calibrated model. `source_checksums` (weight_checksums before
    calibration): weights that changed other than by a recorded fold are stored whole."""
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.utils import get_quantizer_state_dict

    modules = dict(model.named_modules())
    quantizers, derived_amax = {}, {}
    for name, sd in get_quantizer_state_dict(model).items():
        sd = dict(sd)
        weight = _owner_weight(modules, name)
        amax = sd.get("_amax")
        derived = _block_max(weight, amax) if weight is not None and isinstance(amax, torch.Tensor) else None
        if derived is not None:
            derived_amax[name] = _encode_amax(amax.detach(), derived)
            del sd["_amax"]
        quantizers[name] = {k: v.detach().cpu() for k, v in sd.items()}
    attrs = {}
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            found = {a: getattr(m, a).detach().cpu() for a in _EXTRA_ATTRS
                     if isinstance(getattr(m, a, None), torch.Tensor)}
            if found:
                attrs[name] = found
    checksums = weight_checksums(model)
    folded = {f"{name}.weight" for name, _ in folds}
    params = dict(model.named_parameters())
    rewritten = {n: params[n].detach().cpu().clone() for n, c in (source_checksums or {}).items()
                 if n not in folded and checksums.get(n, c) != c}
    state = {"format": FORMAT, "modelopt_state": mto.modelopt_state(model), "quantizers": quantizers,
             "derived_amax": derived_amax, "attrs": attrs, "folds": folds, "rewritten": rewritten,
             "checksums": checksums, "extra": extra or {}}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def restore(model: torch.nn.Module, path: Path) -> tuple[torch.nn.Module, dict]:
    """Restore a quantized model onto freshly loaded source weights; return (model, extra)."""
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.utils import set_quantizer_state_dict
    from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback

    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise QuantkitError(f"resume state '{path}' has format {state.get('format')}, this quantkit reads {FORMAT}",
                            where=str(path), fix="rerun with --force to calibrate again")
    model = mto.restore_from_modelopt_state(model, state["modelopt_state"])
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, scale in state["folds"]:  # first: derived amax are block maxima of the folded weights
            linear = modules[name]
            with enable_weight_access_and_writeback(linear, model, modules):
                _fold(linear, scale)
        params = dict(model.named_parameters())
        for name, weight in state.get("rewritten", {}).items():  # GPTQ: the weights it wrote
            owner = modules[name.rpartition(".")[0]]
            with enable_weight_access_and_writeback(owner, model, modules):
                params[name].data.copy_(weight.to(params[name].device))
        quantizers = state["quantizers"]
        for name, spec in state["derived_amax"].items():
            owner = modules[name.rpartition(".weight_quantizer")[0]]
            with enable_weight_access_and_writeback(owner, model, modules, writeback=False):  # offloaded: load it
                like = torch.empty(spec["shape"], dtype=spec["dtype"], device=owner.weight.device)
                amax = _decode_amax(spec, _block_max(owner.weight, like))
            quantizers[name] = {**quantizers[name], "_amax": amax}
    set_quantizer_state_dict(model, quantizers)
    for name, attrs in state["attrs"].items():
        for attr, value in attrs.items():
            setattr(modules[name], attr, value)
    got = weight_checksums(model)
    bad = [n for n, want in state["checksums"].items() if n in got and got[n] != want]
    if bad:
        raise QuantkitError(f"restoring '{path}' onto the source weights does not reproduce the calibrated "
                            f"weights ({len(bad)} differ, e.g. {bad[0]}): the model folder changed since "
                            "calibration", where=str(path), fix="rerun with --force to calibrate again")
    return model, state["extra"]
