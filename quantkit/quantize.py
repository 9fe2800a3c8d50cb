"""Quantize stage: recipe → ModelOpt config → `mtq.quantize(model, cfg, forward_loop)`."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import math

import torch
from tqdm.auto import tqdm

from quantkit.calibration import CalibrationSet
from quantkit.errors import QuantkitError
from quantkit.methods import build_modelopt_config, get_method, resolved_settings
from quantkit.moe import ExpertTokenCounter
from quantkit.recipe import QuantizeSection

log = logging.getLogger(__name__)


def _excluded(name: str, patterns: list[str]) -> bool:
    # name + ".": ModelOpt matches the same patterns against quantizer names ("<module>.weight_quantizer"), so a
    # pattern such as "mlp.gate." (a MoE router, not mlp.gate_proj) means the same module in both places
    return any(fnmatch.fnmatch(name + ".", f"*{p}*") for p in patterns)


def with_family_defaults(model: torch.nn.Module, section: QuantizeSection) -> QuantizeSection:
    """The recipe's quantize section plus the family file's default exclusions (MoE routers, ...)."""
    from quantkit.archs import default_exclude

    merged = default_exclude(getattr(model.config, "model_type", ""), section.exclude)
    return section if merged == list(section.exclude) else section.model_copy(update={"exclude": merged})


def quantized_linears(model: torch.nn.Module, exclude: list[str]) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _excluded(n, exclude)}


def check_shapes(model: torch.nn.Module, section: QuantizeSection) -> None:
    """Fail before calibration when a block size does not divide a layer's in-features."""
    settings = resolved_settings(section)
    block = settings.get("block_size")
    if not block:
        return
    section = with_family_defaults(model, section)
    bad = {n: m.in_features for n, m in quantized_linears(model, section.exclude).items() if m.in_features % block}
    if bad:
        dims = sorted(set(bad.values()))
        fits = math.gcd(*dims)
        good = [b for b in (128, 64, 32, 16) if fits % b == 0]
        first = ", ".join(f"{n} ({d})" for n, d in list(bad.items())[:3])
        raise QuantkitError(
            f"block_size {block} does not divide the in-features of {len(bad)} layers, e.g. {first}",
            where="quantize.block_size",
            fix=(f"set quantize.block_size to {good[0]}" if good else "exclude those layers via quantize.exclude")
            + f" (in-features present: {', '.join(map(str, dims))})",
        )


class ForwardCounter:
    """Counts calibration forward passes (a data-free method must make none)."""

    def __init__(self) -> None:
        self.batches = 0


def make_forward_loop(calib: CalibrationSet, counter: ForwardCounter, desc: str = "calibrate"):
    def forward_loop(model: torch.nn.Module) -> None:
        device = next(model.parameters()).device
        # AWQ calls the loop more than once (search, then apply): one bar per pass.
        with torch.no_grad():
            for batch in tqdm(calib.batches(), total=len(calib), desc=desc, unit="batch", leave=False):
                model(batch.to(device))
                counter.batches += 1

    return forward_loop


def quantize_model(model: torch.nn.Module, section: QuantizeSection, calib: CalibrationSet | None,
                   counter: ForwardCounter | None = None) -> torch.nn.Module:
    """Quantize `model` in place (ModelOpt fake quantization) and return it."""
    method = get_method(section.method)
    section = with_family_defaults(model, section)
    cfg = build_modelopt_config(section)
    if cfg is None:
        return model
    if method.needs_cuda and not torch.cuda.is_available():
        raise QuantkitError(f"method '{method.name}' needs a CUDA GPU; this machine has none",
                            where="quantize.method", fix="run it on a GPU machine or pick another method")
    check_shapes(model, section)
    import modelopt.torch.quantization as mtq

    counter = counter or ForwardCounter()
    forward_loop = None
    if method.uses_calibration_data:
        if calib is None:
            raise QuantkitError(f"method '{method.name}' needs calibration data", where="calibration")
        forward_loop = make_forward_loop(calib, counter, desc=f"calibrate {method.name}")
        experts = ExpertTokenCounter(model)  # MoE: which experts the calibration data reaches
        forward_loop = experts.wrap(forward_loop)
        if experts.routers:
            model.quantkit_expert_tokens = experts.counts  # recorded in the manifest by the pipeline
    # ModelOpt prints its config and every inserted quantizer: keep that in the debug log, not the terminal.
    settings = resolved_settings(section)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        model = mtq.quantize(model, cfg, forward_loop if cfg.get("algorithm") is not None else None)
        if method.name == "int8_sq" and settings["smoothquant_alpha"] == "auto":
            from quantkit.smoothquant import smoothquant_auto

            alphas = smoothquant_auto(model, forward_loop, per_token=settings["activations"] == "per_token")
            model.quantkit_smoothquant_alphas = alphas  # recorded in the manifest by the pipeline
    log.debug("modelopt output:\n%s", chatter.getvalue())
    if settings.get("activations") == "per_token":
        use_per_token_activations(model)
    return model


def use_per_token_activations(model: torch.nn.Module) -> int:
    """Switch calibrated static int8 input quantizers of linear layers to dynamic per-token scaling.

    SmoothQuant's smoothing factors stay in the weights and pre-quant scales; only the activation scale
    changes from one calibrated number per tensor to one computed per token at run time.
    """
    from quantkit.methods import PER_TOKEN_INT8

    switched = 0
    for name, module in model.named_modules():
        if name.endswith("input_quantizer") and getattr(module, "is_enabled", False) and module.num_bits == 8:
            module.set_from_attribute_config(PER_TOKEN_INT8)
            if hasattr(module, "_amax"):
                delattr(module, "_amax")  # no static scale: exporters then write none
            switched += 1
    return switched


def quantizer_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many quantizers of each kind are enabled (a sanity line for the log and results)."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Quantizer") and getattr(module, "is_enabled", False):
            kind = name.rsplit(".", 1)[-1]
            counts[kind] = counts.get(kind, 0) + 1
    return counts
