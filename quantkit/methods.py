"""The one registry of quantization methods, built on ModelOpt's shipped presets (`mtq.*_CFG`).

A method names a ModelOpt preset and the few knobs a recipe may turn (block size, SmoothQuant
alpha, AWQ algorithm, activation granularity, KV cache, exclusions). Everything else comes from
the preset as NVIDIA ships it, so quantkit never re-types quantizer configs by hand.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantkit.recipe import QuantizeSection


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    preset: str | None                  # attribute of modelopt.torch.quantization, e.g. "INT4_AWQ_CFG"
    uses_calibration_data: bool         # False: weights-only statistics, no forward pass over data
    knobs: frozenset[str] = field(default_factory=frozenset)   # QuantizeSection fields it honours
    defaults: dict[str, Any] = field(default_factory=dict)
    trtllm_quant_algo: str | None = None  # what the TensorRT-LLM export writes
    needs_cuda: bool = False


_COMMON = frozenset({"kv_cache", "exclude"})

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("none", "no quantization: the unquantized baseline", None, False, frozenset()),
        Method(
            "int8_sq", "INT8 weights (per channel) and activations, SmoothQuant", "INT8_SMOOTHQUANT_CFG", True,
            _COMMON | {"smoothquant_alpha", "activations"},
            # Defaults measured on SmolLM2-135M (eval/RESULTS.md): per-token activations, per-layer alpha search.
            {"smoothquant_alpha": "auto", "activations": "per_token"},
            "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN (per-token, default) / W8A8_SQ_PER_CHANNEL (per-tensor)",
        ),
        Method(
            "int4_awq", "INT4 block-wise weights, AWQ scale search, 16-bit activations", "INT4_AWQ_CFG", True,
            # awq_lite (ModelOpt's preset): at 8B awq_clip's clipping search costs minutes where awq_lite takes
            # about one (eval/RESULTS.md "AWQ default at scale"); the SmolLM2 recipes pin awq_clip, better there.
            _COMMON | {"block_size", "awq_algorithm"}, {"block_size": 128, "awq_algorithm": "awq_lite"}, "W4A16_AWQ",
        ),
        Method(
            "int4_rtn", "INT4 block-wise weights, plain rounding (max calibration, no data): the floor for AWQ",
            "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", False, _COMMON | {"block_size"}, {"block_size": 128}, "W4A16_AWQ",
        ),
        Method(
            "int4_gptq", "INT4 block-wise weights, GPTQ (Hessian-weighted error compensation), 16-bit activations",
            # Same weight format as int4_rtn (no pre-quant scales): ModelOpt's `gptq` only moves the weights.
            "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", True,
            _COMMON | {"block_size", "gptq_damping", "gptq_block", "gptq_layerwise", "gptq_scales", "gptq_act_order"},
            # Sequential layer-wise Hessians (the GPTQ paper's procedure; ModelOpt's default is all at once) and damping
            # 0.1, not ModelOpt's 0.01: held-out layer error lower in 15 of 16 SmolLM2 layers (eval/RESULTS.md, GPTQ).
            # Scales from local_hessian, not ModelOpt's max: SmolLM2 block 64 CPU proxy +19.5% against +132.9%.
            # Activation order (static groups): full wiki split, block 64, +29.8% -> +24.7% (eval/RESULTS.md).
            {"block_size": 128, "gptq_damping": 0.1, "gptq_block": 128, "gptq_layerwise": True,
             "gptq_scales": "local_hessian", "gptq_act_order": True},
            "W4A16_AWQ",
        ),
        Method(
            "int4_hessian",
            "INT4 block-wise weights, each block's scale searched for the least Hessian-weighted output error "
            "(ModelOpt local_hessian), 16-bit activations",
            # Same weight format as int4_rtn: only the per-block amax changes (no weight updates, no pre-quant scales).
            # Halves RTN's loss at block 64 on SmolLM2-135M (CPU proxy, eval/RESULTS.md "Choosing the best INT4").
            "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", True, _COMMON | {"block_size"}, {"block_size": 128}, "W4A16_AWQ",
        ),
        Method(
            "w4a8_awq", "INT4 block-wise weights with AWQ, FP8 activations", "W4A8_AWQ_BETA_CFG", True,
            _COMMON | {"block_size", "awq_algorithm"}, {"block_size": 128, "awq_algorithm": "awq_lite"}, "W4A8_AWQ",
        ),
        Method("fp8", "FP8 E4M3 weights and activations, per-tensor static scales", "FP8_DEFAULT_CFG", True,
               _COMMON, {}, "FP8"),
        Method("fp8_pcpt", "FP8 E4M3 per-channel weights, dynamic per-token activations (no calibration data)",
               "FP8_PER_CHANNEL_PER_TOKEN_CFG", False, _COMMON, {}, "FP8_PER_CHANNEL_PER_TOKEN"),
        Method("int8_wo", "INT8 per-channel weights only", "INT8_WEIGHT_ONLY_CFG", False, _COMMON, {}, "W8A16"),
        Method(
            "auto", "per-layer formats chosen by ModelOpt auto_quantize under an effective-bits budget",
            # Searched with max calibration (all ModelOpt 0.47 auto_quantize accepts), then calibrated once more
            # with the INT4 candidate's algorithm (int4_gptq: local_hessian block scales, then GPTQ in act order).
            "auto_quantize", True, frozenset({"exclude", "block_size", "effective_bits", "candidates"}),
            {"block_size": 128, "candidates": ["int4_gptq", "fp8"]}, "MIXED_PRECISION",
        ),
        Method("nvfp4", "NVFP4 weights and activations (Blackwell)", "NVFP4_DEFAULT_CFG", True, _COMMON, {},
               "NVFP4", needs_cuda=True),
    ]
}

_TUNABLE = ("block_size", "smoothquant_alpha", "awq_algorithm", "activations", "gptq_damping", "gptq_block",
            "gptq_layerwise", "gptq_scales", "gptq_act_order", "effective_bits", "candidates")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"field 'method': unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def check_method_settings(section: QuantizeSection) -> None:
    """Reject knobs the method ignores, so a recipe never looks like it set something it did not."""
    method = get_method(section.method)
    for knob in _TUNABLE + ("kv_cache",):
        value = getattr(section, knob)
        if value is not None and knob not in method.knobs:
            raise ValueError(
                f"field '{knob}': '{knob}' does not apply to method '{method.name}' (it applies to: "
                f"{', '.join(m.name for m in METHODS.values() if knob in m.knobs)}); remove it"
            )


def resolved_settings(section: QuantizeSection) -> dict[str, Any]:
    """The method's knobs with defaults filled in (what the run actually used)."""
    method = get_method(section.method)
    out = {k: getattr(section, k) if getattr(section, k) is not None else method.defaults.get(k) for k in _TUNABLE
           if k in method.knobs}
    out.update(method=method.name, kv_cache=section.kv_cache, exclude=list(section.exclude))
    return out


def build_modelopt_config(section: QuantizeSection) -> dict[str, Any] | None:
    """Return the ModelOpt `mtq.quantize` config for a recipe's quantize section (None for 'none')."""
    import modelopt.torch.quantization as mtq

    method = get_method(section.method)
    if method.preset is None:
        return None
    if method.name == "auto":
        raise ValueError("method 'auto' has no single config: use quantize.auto_quantize_model")
    settings = resolved_settings(section)
    cfg = copy.deepcopy(getattr(mtq, method.preset))
    entries: list[dict] = cfg["quant_cfg"]

    def weight_cfgs() -> list[dict]:
        out = []
        for e in entries:
            if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e:
                out.extend(e["cfg"] if isinstance(e["cfg"], list) else [e["cfg"]])
        return out

    if settings.get("block_size") is not None:
        for wc in weight_cfgs():
            if wc.get("block_sizes") and wc.get("num_bits") == 4:
                wc["block_sizes"] = {**wc["block_sizes"], -1: settings["block_size"]}
                wc["block_sizes"].pop("-1", None)
    if method.name == "int8_sq":
        # Per-token activations are switched on after calibration (quantize.py): ModelOpt's SmoothQuant
        # search needs static per-channel statistics on the input quantizers while it runs.
        cfg["algorithm"] = {"method": "smoothquant", "alpha": settings["smoothquant_alpha"]}
        if settings["smoothquant_alpha"] == "auto":
            cfg["algorithm"] = None  # quantizers only: quantkit.smoothquant calibrates and smooths per layer
    if method.name == "int4_gptq":
        cfg["algorithm"] = gptq_algorithm(settings)
        if settings["gptq_scales"] == "local_hessian":  # in order; quantize.py keeps the searched scales for gptq
            cfg["algorithm"] = [local_hessian_algorithm(settings["block_size"]), cfg["algorithm"]]
    if method.name == "int4_hessian":
        cfg["algorithm"] = local_hessian_algorithm(settings["block_size"])
    if settings.get("awq_algorithm") is not None:
        algo = cfg["algorithm"]
        cfg["algorithm"] = {**(algo if isinstance(algo, dict) else {}), "method": settings["awq_algorithm"]}
        if settings["awq_algorithm"] == "awq_clip":
            cfg["algorithm"].pop("alpha_step", None)
    for pattern in section.exclude:
        entries.append({"quantizer_name": f"*{pattern}*", "enable": False})
    if section.kv_cache == "fp8":
        cfg = mtq.update_quant_cfg_with_kv_cache_quant(cfg, mtq.FP8_KV_CFG["quant_cfg"])
    return cfg


def local_hessian_algorithm(block_size: int) -> dict[str, Any]:
    """ModelOpt 0.47 `LocalHessianCalibConfig` for INT4 blocks: per-block amax by Hessian-weighted output error.

    block_size: the Hessian's blocks must be the quantization groups (ModelOpt's default 16 is NVFP4's);
    fp8_scale_sweep off: with it on, ModelOpt searches NVFP4 scales only and leaves INT4 at max calibration.
    """
    return {"method": "local_hessian", "block_size": block_size, "fp8_scale_sweep": False}


def gptq_algorithm(settings: dict[str, Any]) -> dict[str, Any]:
    """ModelOpt 0.47 `GPTQCalibConfig`: damping, update block and layer-wise (sequential) Hessians.

    ModelOpt 0.47 has no activation-order (`act_order`) option: its columns are updated in their stored order, with
    each group's scale fixed before the updates (static groups). `gptq_act_order` is not part of this config:
    quantize.group_local_gptq applies it around ModelOpt's per-layer update.
    """
    gptq_block = settings["gptq_block"]
    group = settings["block_size"]
    if gptq_block % group:
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"gptq_block {gptq_block} is not a multiple of block_size {group}",
                            where="quantize.gptq_block", fix=f"set quantize.gptq_block to a multiple of {group}")
    return {"method": "gptq", "perc_damp": settings["gptq_damping"], "block_size": gptq_block,
            "layerwise": {"enable": bool(settings["gptq_layerwise"])}}


# Candidates of `auto` whose format the search can calibrate with max: the INT4 ones share one format.
AUTO_CANDIDATES = ("int4_gptq", "int4_rtn", "fp8", "fp8_pcpt", "int8_wo", "nvfp4")
_INT4 = ("int4_gptq", "int4_rtn")


def check_auto_candidates(candidates: list[str]) -> None:
    """Reject candidates ModelOpt's auto_quantize cannot search (raises ValueError with the fix)."""
    for name in candidates:
        get_method(name)
        if name not in AUTO_CANDIDATES:
            raise ValueError(
                f"field 'candidates': '{name}' cannot be an auto candidate: ModelOpt 0.47 auto_quantize searches only "
                f"max/mse-calibrated formats, and {name} is defined by its calibration algorithm; use one of "
                f"{', '.join(AUTO_CANDIDATES)}")
    if sum(c in _INT4 for c in candidates) > 1 or len(set(candidates)) != len(candidates):
        raise ValueError(f"field 'candidates': {candidates} lists one format twice (int4_gptq and int4_rtn share "
                         "the INT4 format; the method only decides its calibration); keep one")


def auto_candidate_configs(section: QuantizeSection) -> dict[str, dict[str, Any]]:
    """{candidate method: its ModelOpt config with max calibration}, as `mtq.auto_quantize` searches them."""
    from quantkit.recipe import QuantizeSection

    settings = resolved_settings(section)
    out = {}
    for name in settings["candidates"]:
        knobs = {"block_size": settings["block_size"]} if "block_size" in METHODS[name].knobs else {}
        cfg = build_modelopt_config(QuantizeSection(method=name, exclude=section.exclude, **knobs))
        cfg["algorithm"] = "max"
        out[name] = cfg
    return out


def auto_final_algorithm(section: QuantizeSection) -> list[dict[str, Any]] | dict[str, Any] | str:
    """The calibration of the searched model: the INT4 candidate's algorithm (int4_gptq's: its block-scale search,
    then GPTQ), else max.

    The scale search (local_hessian) also searches the FP8 layers' per-tensor weight scales, and GPTQ then writes
    every layer's weights back on its grid, so no exported weight lies outside its scale. Its INT4 layers take
    int4_gptq's activation order (`auto_act_order`); the FP8 ones keep the stored column order (no fixed groups).
    """
    settings = resolved_settings(section)
    if "int4_gptq" in settings["candidates"]:
        gptq = {**METHODS["int4_gptq"].defaults, "block_size": settings["block_size"]}
        if gptq["gptq_scales"] == "local_hessian":
            return [local_hessian_algorithm(settings["block_size"]), gptq_algorithm(gptq)]
        return gptq_algorithm(gptq)
    return "max"


def run_settings(section: QuantizeSection) -> dict[str, Any]:
    """What decides the quantized weights besides the recipe's own fields: the method's defaults as they resolve
    now and, for auto, its final calibration. Part of the quantize stage's fingerprint, so a run folder made under
    other defaults (a new quantkit) is recomputed instead of reused."""
    out = resolved_settings(section)
    if section.method == "auto":
        out.update(final_calibration=auto_final_algorithm(section), gptq_act_order=auto_act_order(section))
    return out


def auto_act_order(section: QuantizeSection) -> bool:
    """Whether auto's final GPTQ runs its INT4 layers in activation order: int4_gptq's default, as its algorithm."""
    return "int4_gptq" in resolved_settings(section)["candidates"] and bool(
        METHODS["int4_gptq"].defaults["gptq_act_order"])


# Dynamic per-token int8 activations (what TensorRT-LLM's per-token SmoothQuant plugin computes at run time).
PER_TOKEN_INT8 = {"num_bits": 8, "axis": None, "type": "dynamic", "block_sizes": {-1: None}}
PER_TOKEN_SQ_ALGO = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
