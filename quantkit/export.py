"""Export stage: TensorRT-LLM checkpoint (config.json + rank*.safetensors) and HF unified checkpoint."""

from __future__ import annotations

import contextlib
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
from quantkit.models import DTYPES

log = logging.getLogger(__name__)


@contextlib.contextmanager
def staging_dir(target: Path):
    """Write into a temporary sibling folder and rename it into place only on success."""
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def prepare_for_deployment(model: torch.nn.Module) -> torch.nn.Module:
    """Make the in-memory model compute what the checkpoints will hold, before exporting and evaluating.

    Layers that read the same input (q/k/v, gate/up) must share one pre-quant scale and input scale in a
    deployed engine. Both ModelOpt exporters re-balance them (`requantize_resmooth_fused_llm_layers`), the HF
    one on its own copy: doing it once here, in place, means the evaluated model is the shipped model.
    """
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    _ensure_architectures(model)
    with _quiet(), torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)
    return model


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
    with staging_dir(target) as tmp, _quiet():
        try:
            export_tensorrt_llm_checkpoint(model, decoder_type=decoder_type, dtype=DTYPES[dtype],
                                           export_dir=tmp, inference_tensor_parallel=tp_size,
                                           inference_pipeline_parallel=pp_size)
        except Exception as exc:
            raise QuantkitError(f"TensorRT-LLM export failed for {model.config.model_type}: {exc}",
                                where="export.trtllm",
                                fix="set export.trtllm: null to skip it, or report the model type") from exc
        _fix_pre_quant_flag(tmp)
        _label_per_token_smoothquant(tmp / "config.json", "quantization", "rank*.safetensors",
                                     ".activation_scaling_factor")
    return target


def _label_per_token_smoothquant(config_path: Path, key: str, shards: str, act_suffix: str) -> None:
    """ModelOpt labels every SmoothQuant export W8A8_SQ_PER_CHANNEL. Without static activation scales
    (per-token dynamic activations) TensorRT-LLM must run its per-token SmoothQuant plugin instead."""
    from quantkit.methods import PER_TOKEN_SQ_ALGO

    cfg = json.loads(config_path.read_text())
    quant = cfg.get(key) or {}
    if quant.get("quant_algo") != "W8A8_SQ_PER_CHANNEL":
        return
    for shard in config_path.parent.glob(shards):
        with safe_open(str(shard), "pt") as f:
            if any(k.endswith(act_suffix) for k in f.keys()):  # noqa: SIM118 - safe_open has no __iter__
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


def export_hf(model: torch.nn.Module, target: Path, dtype: str = "bfloat16") -> Path:
    """HF unified checkpoint via `modelopt.torch.export.export_hf_checkpoint` (ModelOpt format).

    The exporter packs weights in place (the model no longer runs afterwards), so it works on a copy.
    """
    import copy

    from modelopt.torch.export import export_hf_checkpoint

    model = copy.deepcopy(model)

    _ensure_architectures(model)
    with staging_dir(target) as tmp, _quiet():
        if _unquantized_moe(model):
            # ModelOpt 0.47 refuses an unquantized model with fused experts ("MoE model with experts type ...
            # not supported"); unquantized, the HF checkpoint is the transformers model itself
            model.to(DTYPES[dtype]).save_pretrained(tmp)
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


def save_tokenizer(tokenizer, *targets: Path) -> None:
    for t in targets:
        tokenizer.save_pretrained(t)
