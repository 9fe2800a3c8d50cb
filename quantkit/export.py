"""Export stage: TensorRT-LLM checkpoint (config.json + rank*.safetensors) and HF unified checkpoint."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.archs import trtllm_decoder_type
from quantkit.errors import QuantkitError
from quantkit.models import DTYPES, input_device

log = logging.getLogger(__name__)


@contextlib.contextmanager
def staging_dir(target: Path):
    """Write into a temporary sibling folder and rename it into place only on success."""
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        # mkdtemp makes 0700 and some writers 0600: checkpoints are handed to other people and services.
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # folders made for this checkpoint alone go with it (a failed export leaves no empty shell)
            with contextlib.suppress(OSError):
                p.rmdir()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


PREPARED = "quantkit_prepared_for_deployment"  # set on a model once its fused-layer scales are re-shared


def prepare_for_deployment(model: torch.nn.Module) -> torch.nn.Module:
    """Make the in-memory model compute what the checkpoints will hold, before exporting and evaluating.

    Layers that read the same input (q/k/v, gate/up) must share one pre-quant scale and input scale in a
    deployed engine. Both ModelOpt exporters re-balance them (`requantize_resmooth_fused_llm_layers`; `export_hf`
    puts back what the HF one rebinds): doing it once here, in place, means the evaluated model is the shipped one.
    """
    from unittest import mock

    from modelopt.torch.export import unified_export_hf
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    if getattr(model, PREPARED, False):  # the pipeline prepared it already; export_trtllm asks again
        return model
    _ensure_architectures(model)
    # AWQ: the function also folds the shared pre-quant scale of q/k/v and gate/up into the preceding norm and
    # deletes it from those linears. Done in place, the TensorRT-LLM exporter then writes no
    # prequant_scaling_factor for qkv/fc/gate while config.json says pre_quant_scale: true, and TensorRT-LLM's
    # WeightOnlyGroupwiseQuantLinear requires one on every linear (issue 12). Re-share, do not fold: the HF
    # exporter folds while it writes (undone afterwards by export_hf), which computes the same thing.
    with _quiet(), torch.no_grad(), mock.patch.object(unified_export_hf, "fuse_prequant_layernorm",
                                                      lambda *_a, **_k: None):
        requantize_resmooth_fused_llm_layers(model)
        _share_kv_scale(model)
    setattr(model, PREPARED, True)
    return model


def share_fused_scales(model: torch.nn.Module) -> torch.nn.Module:
    """Do ahead, in place, what ModelOpt's TensorRT-LLM exporter does to layers it fuses (q/k/v, gate/up:
    `layer_utils.build_qkv`/`build_mlp` call `quant_utils.preprocess_linear_fusion`, which gives them one input
    and one weight amax). The HF path skips FP8 groups (`unified_export_hf._fuse_shared_input_modules`), so for
    FP8 only this makes the evaluated model the TensorRT-LLM one; for other formats it is already done and this is
    a no-op. Afterwards the exporter changes nothing, so an evaluation-only rerun needs no export at all.
    """
    from modelopt.torch.export import quant_utils
    from modelopt.torch.export.quant_utils import QUANTIZATION_NONE, get_quantization_format
    from modelopt.torch.export.unified_export_hf import collect_shared_input_modules

    def dummy_forward() -> None:
        model(torch.ones([1, 2], dtype=torch.long, device=input_device(model)))

    with _quiet(), torch.no_grad():
        groups, _ = collect_shared_input_modules(model, dummy_forward)
        for modules in groups.values():
            formats = {get_quantization_format(m) for m in modules}
            if len(modules) > 1 and len(formats) == 1 and QUANTIZATION_NONE not in formats:
                quant_utils.preprocess_linear_fusion(modules)  # looked up late: offload_aware_fusion patches it
    return model


@contextlib.contextmanager
def offload_aware_fusion(model: torch.nn.Module):
    """Let ModelOpt's fused-layer re-smoothing (`preprocess_linear_fusion`, called by `prepare_for_deployment`,
    `share_fused_scales` and the exporters) work on an accelerate-offloaded model: each call materializes just its
    group's layers and writes the changed weights back. Unpatched, it computes on the meta placeholders of offloaded
    weights and leaves meta amax behind. Memory stays at one group of layers. No-op for a resident model."""
    from modelopt.torch.export import layer_utils, quant_utils, unified_export_hf
    from modelopt.torch.quantization.utils.core_utils import enable_weight_access_and_writeback, has_accelerate_offload

    if not has_accelerate_offload(model):
        yield model
        return
    original = quant_utils.preprocess_linear_fusion
    name_to_module = dict(model.named_modules())

    def fusion(modules: list[torch.nn.Module], *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for m in modules:
                stack.enter_context(enable_weight_access_and_writeback(m, model, name_to_module))
            return original(modules, *args, **kwargs)

    owners = (quant_utils, unified_export_hf, layer_utils)
    for owner in owners:
        owner.preprocess_linear_fusion = fusion
    try:
        yield model
    finally:
        for owner in owners:
            owner.preprocess_linear_fusion = original


@contextlib.contextmanager
def materialized(model: torch.nn.Module):
    """All weights and buffers of an accelerate-offloaded model on their execution device while the block runs (for
    an exporter that reads `module.weight` directly), offloaded again after; nothing is written back. No-op for a
    resident model. (ModelOpt's `weight_access_and_writeback_context` skips modules without parameters, so the
    amax buffers of offloaded quantizers would stay on meta.)"""
    from modelopt.torch.quantization.plugins.accelerate import _get_offload_hook

    hooked = [(m, hook) for m in model.modules() if (hook := _get_offload_hook(getattr(m, "_hf_hook", None)))]
    loaded = []
    try:
        for m, hook in hooked:
            if any(t is not None and t.is_meta for t in [*m._parameters.values(), *m._buffers.values()]):
                hook.pre_forward(m)
                loaded.append((m, hook))
            hook.offload = False
        yield model
    finally:
        for _m, hook in hooked:
            hook.offload = True
        for m, hook in loaded:
            hook.post_forward(m, None)


def _share_kv_scale(model: torch.nn.Module) -> None:
    """FP8 KV cache: TensorRT-LLM runs K and V with one scale per attention, max(k, v)
    (modeling_utils.preprocess_weights.process_kv_scaling_factor), where ModelOpt calibrates one each. Evaluate
    what TensorRT-LLM computes: both quantizers take the larger amax (a coarser step for the smaller of the two)."""
    for module in model.modules():
        k, v = getattr(module, "k_bmm_quantizer", None), getattr(module, "v_bmm_quantizer", None)
        if k is None or v is None or not (k.is_enabled and v.is_enabled):
            continue
        if getattr(k, "amax", None) is None or getattr(v, "amax", None) is None:
            continue
        shared = torch.maximum(k.amax, v.amax)
        k.amax, v.amax = shared.clone(), shared.clone()


def _ensure_architectures(model: torch.nn.Module) -> None:
    """ModelOpt's HF exporter and its fused-layer rewrite iterate `config.architectures` (a config built in code
    has none): the transformers class is that name, for any family."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]


def _unquantized_moe(model: torch.nn.Module) -> bool:
    from quantkit.archs import family

    return family(model.config.model_type).moe_router is not None and not any(
        type(m).__name__ == "TensorQuantizer" for m in model.modules())


def export_trtllm(model: torch.nn.Module, target: Path, dtype: str = "float16", tp_size: int = 1,
                  pp_size: int = 1) -> Path:
    """TensorRT-LLM checkpoint via `modelopt.torch.export.export_tensorrt_llm_checkpoint`."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    decoder_type = trtllm_decoder_type(model.config.model_type)  # the family file's, or why there is none
    # The plugin SmoothQuant and AWQ layouts need the fused layers' shared scales; skipped after the pipeline's call.
    prepare_for_deployment(model)
    with staging_dir(target) as tmp, _quiet():
        try:
            with _layout_while_writing():
                export_tensorrt_llm_checkpoint(model, decoder_type=decoder_type, dtype=DTYPES[dtype],
                                               export_dir=tmp, inference_tensor_parallel=tp_size,
                                               inference_pipeline_parallel=pp_size)
        except QuantkitError:
            raise  # the layout's own paragraph (an exclusion the plugin layout cannot express)
        except Exception as exc:
            raise QuantkitError(f"TensorRT-LLM export failed for {model.config.model_type}: {exc}",
                                where="export.trtllm",
                                fix="set export.trtllm: null to skip it, or report the model type") from exc
        _fix_pre_quant_flag(tmp)
        _fix_mixed_pre_quant_flags(tmp)
        _label_per_token_smoothquant(tmp / "config.json", "quantization", "rank*.safetensors",
                                     ".activation_scaling_factor")
        _write_rope(tmp / "config.json", model.config)
    return target


def _write_rope(config_path: Path, hf_config) -> None:
    """ModelOpt 0.47 under transformers 5 writes neither rotary_base nor rotary_scaling (transformers 5 keeps them in
    config.rope_parameters), so TensorRT-LLM would run Llama-3.1 with its default base 10000 and no llama3 scaling.
    Write them as TensorRT-LLM's LLaMAConfig.from_hugging_face reads them (rope_theta, rope_scaling)."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(hf_config, "rope_theta", None))
    cfg = json.loads(config_path.read_text())
    if theta is not None and "rotary_base" not in cfg:
        cfg["rotary_base"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" and not cfg.get("rotary_scaling"):
        cfg["rotary_scaling"] = {"type": rope_type, **rope}
    config_path.write_text(json.dumps(cfg, indent=4))


def _layout_algo(quant: dict | None, names) -> str | None:
    """The TensorRT-LLM layout a rank's tensors need, from ModelOpt's label and the tensor names: ModelOpt labels
    every SmoothQuant export W8A8_SQ_PER_CHANNEL, and one without static activation scales is per-token."""
    from quantkit.methods import PER_TOKEN_SQ_ALGO

    algo = (quant or {}).get("quant_algo")
    if _per_token_smoothquant(algo, names, ".activation_scaling_factor"):
        return PER_TOKEN_SQ_ALGO
    return algo if algo in (PER_TOKEN_SQ_ALGO, "W8A16") else None


def _per_token_smoothquant(algo: str | None, names, act_suffix: str) -> bool:
    """ModelOpt's SmoothQuant label with no static activation scale among the tensor names: per-token activations."""
    return algo == "W8A8_SQ_PER_CHANNEL" and not any(n.endswith(act_suffix) for n in names)


def layout_tensors(t: dict[str, torch.Tensor], cfg: dict) -> None:
    """Rewrite one rank's tensors, in place, into the layout TensorRT-LLM builds for the quant_algo
    (quantkit.trtllm_layout); `cfg` is that rank's TensorRT-LLM config.

    ModelOpt writes every SmoothQuant export in the non-plugin names (weights_scaling_factor,
    prequant_scaling_factor) and INT8 weight-only as int8 + weights_scaling_factor; TensorRT-LLM's per-token
    SmoothQuant plugin layers and its weight-only layers read other parameters (issue 12 defect 1).
    """
    from quantkit.methods import PER_TOKEN_SQ_ALGO
    from quantkit.trtllm_layout import COLUMN_LINEARS, NORM_FEEDS, ROW_LINEARS

    quant = cfg.get("quantization") or {}
    algo = _layout_algo(quant, t)
    if algo is None:
        return
    if algo == PER_TOKEN_SQ_ALGO:
        # smooth_quantize_plugin replaces every decoder layer whatever exclude_modules says.
        names = [f"transformer.layers.{i}.{lin}" for i in range(int(cfg.get("num_hidden_layers", 0)))
                 for lin in COLUMN_LINEARS + ROW_LINEARS]
        hit = [p for p in quant.get("exclude_modules") or [] if any(fnmatch.fnmatchcase(n, p) for n in names)]
        if hit:
            raise QuantkitError(
                f"per-token SmoothQuant with decoder linears excluded ({', '.join(sorted(set(hit)))}): TensorRT-LLM's "
                "SmoothQuant plugin layers quantize every decoder layer and cannot leave one unquantized",
                where="quantize.exclude", fix="exclude only lm_head, or use activations: per_tensor")
        _smoothquant_plugin(t, f"rank{cfg.get('rank', 0)}.safetensors", NORM_FEEDS, ROW_LINEARS)
    else:
        _weight_only_float(t, DTYPES[cfg["dtype"]])


@contextlib.contextmanager
def _layout_while_writing():
    """Convert each rank's tensors between ModelOpt's conversion and its write (`export_tensorrt_llm_checkpoint`
    saves what `torch_to_tensorrt_llm_checkpoint` yields), so every shard is written once in its final layout.
    Rewriting the files afterwards read and wrote every shard again: 13 s of int8_sq's 30 s export at 8B."""
    from unittest import mock

    from modelopt.torch.export import model_config_export

    original = model_config_export.torch_to_tensorrt_llm_checkpoint

    def converted(*args, **kwargs):
        for cfg, weights, quant_config in original(*args, **kwargs):
            layout_tensors(weights, cfg)
            yield cfg, weights, quant_config

    with mock.patch.object(model_config_export, "torch_to_tensorrt_llm_checkpoint", converted):
        yield


def _weight_only_float(t: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """W8A16: TensorRT-LLM quantizes float weights itself at load (weight_only_quantize_dict skips int8 ones and its
    plugin needs its own interleaved layout); per-channel amax / 127 of w8 * s gives back ModelOpt's codes."""
    for name in [n for n in t if n.endswith(".weights_scaling_factor")]:
        module = name[: -len(".weights_scaling_factor")]
        scale = t.pop(name).float()
        t[f"{module}.weight"] = (t[f"{module}.weight"].float() * scale.reshape(-1, 1)).to(dtype)


def _smoothquant_plugin(t: dict[str, torch.Tensor], shard: str, norm_feeds: dict[str, tuple[str, ...]],
                        row_linears: tuple[str, ...]) -> None:
    """Per-token SmoothQuant in the plugin layout, as TensorRT-LLM's models/llama/convert.py writes it for
    --smoothquant --per_token --per_channel: the column linears' smoothing moves into their norm's weight, the row
    linears' into `smoother` (their input is divided by it), weight scales become per_channel_scale [1, out], and
    each decoder norm gets scale_to_int = 1.0."""
    layers = sorted({n.split(".layers.")[0] + ".layers." + n.split(".layers.")[1].split(".")[0]
                     for n in t if ".layers." in n})
    for layer in layers:
        for norm, linears in norm_feeds.items():
            pqs = [t.pop(f"{layer}.{lin}.prequant_scaling_factor").float() for lin in linears]
            if any(not torch.equal(p, pqs[0]) for p in pqs[1:]):
                raise QuantkitError(
                    f"{shard}: {', '.join(linears)} of {layer} have different pre-quant scales; the SmoothQuant "
                    f"plugin folds one into {norm}", where="export.trtllm",
                    fix="export through quantkit's pipeline (prepare_for_deployment re-shares them)")
            w = t[f"{layer}.{norm}.weight"]
            t[f"{layer}.{norm}.weight"] = (w.float() * pqs[0]).to(w.dtype)
            t[f"{layer}.{norm}.scale_to_int"] = torch.ones(1, dtype=torch.float32)
        for lin in row_linears:
            pqs = t.pop(f"{layer}.{lin}.prequant_scaling_factor").float()
            t[f"{layer}.{lin}.smoother"] = (1.0 / pqs).reshape(1, -1).contiguous()
        for name in [n for n in t if n.startswith(layer + ".") and n.endswith(".weights_scaling_factor")]:
            t[name.replace(".weights_scaling_factor", ".per_channel_scale")] = t.pop(name).float().reshape(1, -1)


def _label_per_token_smoothquant(config_path: Path, key: str, shards: str, act_suffix: str) -> None:
    """ModelOpt labels every SmoothQuant export W8A8_SQ_PER_CHANNEL. Without static activation scales
    (per-token dynamic activations) TensorRT-LLM must run its per-token SmoothQuant plugin instead."""
    from quantkit.methods import PER_TOKEN_SQ_ALGO

    cfg = json.loads(config_path.read_text())
    quant = cfg.get(key) or {}
    if quant.get("quant_algo") != "W8A8_SQ_PER_CHANNEL":
        return
    names: list[str] = []
    for shard in config_path.parent.glob(shards):
        with safe_open(str(shard), "pt") as f:
            names.extend(f.keys())
    if not _per_token_smoothquant(quant["quant_algo"], names, act_suffix):
        return
    quant["quant_algo"] = PER_TOKEN_SQ_ALGO
    config_path.write_text(json.dumps(cfg, indent=4))


def _fix_pre_quant_flag(folder: Path) -> None:
    """INT4 RTN: ModelOpt writes `pre_quant_scale: true` but no pre-quant scales. TensorRT-LLM would then give
    every int4 linear a prequant_scaling_factor parameter and fail to load ('Required but not provided tensors')."""
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    quant = cfg.get("quantization") or {}
    if not quant.get("pre_quant_scale"):
        return
    for shard in folder.glob("rank*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            if any(k.endswith(".prequant_scaling_factor") for k in f.keys()):  # noqa: SIM118 - safe_open has no __iter__
                return
    quant["pre_quant_scale"] = False
    cfg_path.write_text(json.dumps(cfg, indent=4))


@contextlib.contextmanager
def _undo_in_place_export(model: torch.nn.Module):
    """Give back the model as it was after ModelOpt's HF exporter, without a second copy of the weights.

    The exporter packs each weight into a new tensor (`setattr(module, "weight", nn.Parameter(packed))`),
    registers scale buffers and re-types amax attributes: it rebinds names, it does not write into the tensors
    the model holds. Keeping every module's names bound to their tensors (references, no data) and putting them
    back afterwards restores the model bit for bit (tests/test_scale.py checks state dict and logits).
    """
    saved = []
    for m in model.modules():
        d = dict(m.__dict__)
        d["_parameters"], d["_buffers"], d["_modules"] = dict(m._parameters), dict(m._buffers), dict(m._modules)
        d["_non_persistent_buffers_set"] = set(m._non_persistent_buffers_set)
        saved.append((m, d))
    config = getattr(model, "config", None)
    config_state = copy.deepcopy(config.__dict__) if config is not None else None
    try:
        yield
    finally:
        for m, d in saved:
            m.__dict__.clear()
            m.__dict__.update(d)
        if config is not None:
            config.__dict__.clear()
            config.__dict__.update(config_state)


def _fix_mixed_pre_quant_flags(folder: Path) -> None:
    """MIXED_PRECISION (method auto): the same `pre_quant_scale: true` without scales, per layer in quant_cfg.json,
    which TensorRT-LLM reads for each layer's QuantConfig (models/modeling_utils.py PretrainedConfig.from_json_file)."""
    path = folder / "quant_cfg.json"
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    names: set[str] = set()
    for shard in folder.glob("rank*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names.update(f.keys())
    for layer, lc in (cfg.get("quantized_layers") or {}).items():
        if lc.get("pre_quant_scale") and f"{layer}.prequant_scaling_factor" not in names:
            lc["pre_quant_scale"] = False
    path.write_text(json.dumps(cfg, indent=4))


def export_hf(model: torch.nn.Module, target: Path, dtype: str = "bfloat16", keep_model: bool = True) -> Path:
    """HF unified checkpoint via `modelopt.torch.export.export_hf_checkpoint` (ModelOpt format).

    The exporter packs weights in place; with `keep_model`, `_undo_in_place_export` hands the model back unchanged
    (so evaluation can follow) without a deep copy, but the 16-bit weights stay alive next to the packed ones until
    the end (8B fp8: 15 + 6.5 GiB). `keep_model=False` when nothing uses the model afterwards: each replaced
    weight is freed as the exporter goes, as in a plain ModelOpt export, and the model is left packed.
    Offloaded models take ModelOpt's streaming writer (one layer materialized at a time).
    """
    from modelopt.torch.export import export_hf_checkpoint

    _ensure_architectures(model)
    undo = _undo_in_place_export(model) if keep_model else contextlib.nullcontext()
    with staging_dir(target) as tmp, undo, _quiet():
        if _unquantized_moe(model):
            # ModelOpt 0.47 refuses an unquantized model with fused experts ("MoE model with experts type ...
            # not supported"); unquantized, the HF checkpoint is the transformers model itself
            model.save_pretrained(tmp, state_dict={k: v.to(DTYPES[dtype]) for k, v in model.state_dict().items()})
        else:
            export_hf_checkpoint(model, dtype=DTYPES[dtype], export_dir=tmp)
        if (tmp / "hf_quant_config.json").is_file():
            _label_per_token_smoothquant(tmp / "hf_quant_config.json", "quantization", "*.safetensors", ".input_scale")
            algo = json.loads((tmp / "hf_quant_config.json").read_text())["quantization"].get("quant_algo")
            config = json.loads((tmp / "config.json").read_text())
            qc = config.get("quantization_config") or {}
            if qc.get("quant_algo") not in (None, algo):
                qc["quant_algo"] = algo  # keep config.json consistent with hf_quant_config.json
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return target


def _stored_weight_bytes(cfg: dict | None) -> float | None:
    """Bytes per element of a quantized linear weight as the checkpoints store it, block scales included,
    read from the ModelOpt config's weight quantizer (the first of a sequence is the stored format: W4A8 keeps
    int4). None: weights stay in the export dtype."""
    if not cfg:
        return None
    entry = next((e for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer" and "cfg" in e), None)
    if entry is None or entry.get("enable") is False:
        return None
    wc = entry["cfg"][0] if isinstance(entry["cfg"], list) else entry["cfg"]
    bits = wc["num_bits"]
    bits = 1 + sum(bits) if isinstance(bits, (list, tuple)) else bits  # (4, 3): sign + exponent + mantissa = 8
    block = (wc.get("block_sizes") or {}).get(-1)
    scale_bytes = 1 if (wc.get("block_sizes") or {}).get("scale_bits") == (4, 3) else 2  # NVFP4: fp8 scales
    return bits / 8 + (scale_bytes / block if block else 0)


def checkpoint_bytes(skeleton: torch.nn.Module, cfg: dict | None, exclude: list[str], dtype: str) -> int:
    """Upper-bound estimate of one checkpoint's bytes from shapes (a meta skeleton) and the ModelOpt config:
    quantized linears at their stored width, everything else in `dtype`; tied embeddings counted twice
    (TensorRT-LLM writes lm_head apart)."""
    from quantkit.quantize import quantized_linears

    per_weight = _stored_weight_bytes(cfg)
    quantized = set() if per_weight is None else {f"{n}.weight" for n in quantized_linears(skeleton, exclude)}
    unquant_bytes = DTYPES[dtype].itemsize
    total = 0.0
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        total += p.numel() * (per_weight if name in quantized else unquant_bytes)
    return int(total * 1.02) + (1 << 20)  # 2% and 1 MiB: per-tensor scales, headers, config files
