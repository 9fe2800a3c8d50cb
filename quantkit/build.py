"""Build stage: the TensorRT-LLM engine plan per quantization method, `build/plan.json` + `build/build.sh`,
and the engine build itself where TensorRT-LLM and a CUDA GPU exist.

Two TensorRT-LLM lines are covered:
- engine line (TensorRT-LLM <= 1.2.x): the TensorRT-LLM checkpoint goes through `trtllm-build` into
  plugin-enabled engines; every quant_algo, including INT8 SmoothQuant.
- PyTorch backend (TensorRT-LLM >= 1.0, the default there): the HF unified checkpoint is served directly by
  `trtllm-serve` / the `LLM` API, no engine build. It has no INT8 SmoothQuant (nor INT8 weight-only)
  kernels: its quantization recipes are FP4, FP8 (per tensor, block, rowwise), FP8 KV cache and W4A16/W4A8
  AWQ/GPTQ (docs/source/features/quantization.md, TensorRT-LLM 1.2.0rc6).

Engine options per quant_algo are the ones NVIDIA's own ModelOpt deploy script sets
(NVIDIA/TensorRT-Model-Optimizer examples/llm_ptq/modelopt_to_tensorrt_llm.py, `build_tensorrt_llm`),
checked against what `trtllm-build` does with them (NVIDIA/TensorRT-LLM tensorrt_llm/commands/build.py).
"""

from __future__ import annotations

import difflib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from quantkit.errors import MissingDependencyError, QuantkitError
from quantkit.recipe import BuildSection

ENGINE_LINE = "engine"
PYTORCH_LINE = "pytorch"

# trtllm-build options that are store_true flags (tensorrt_llm/commands/build.py parse_arguments);
# every other boolean feature takes enable/disable.
STORE_TRUE = {
    "gather_context_logits", "gather_generation_logits", "gather_all_token_logits", "strip_plan", "weight_sparsity",
    "weight_streaming", "fast_build", "enable_debug_output", "dry_run", "monitor_memory",
}
# Options quantkit knows trtllm-build accepts (commands/build.py + plugin/plugin.py); others pass through with a note.
KNOWN_OPTIONS = STORE_TRUE | {
    "max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens", "opt_num_tokens",
    "max_encoder_input_len", "max_prompt_embedding_table_size", "kv_cache_type", "paged_kv_cache",
    "input_timing_cache", "output_timing_cache", "profiling_verbosity", "workers", "log_level", "logits_dtype",
    "visualize_network", "lora_dir", "lora_ckpt_source", "lora_target_modules", "max_lora_rank",
    "speculative_decoding_mode", "max_draft_len", "auto_parallel", "gpus_per_node", "cluster_key",
    "bert_attention_plugin", "gpt_attention_plugin", "gemm_plugin", "gemm_swiglu_plugin", "fp8_rowwise_gemm_plugin",
    "nccl_plugin", "lora_plugin", "dora_plugin", "moe_plugin", "mamba_conv1d_plugin", "low_latency_gemm_plugin",
    "low_latency_gemm_swiglu_plugin", "gemm_allreduce_plugin", "context_fmha", "bert_context_fmha_fp32_acc",
    "remove_input_padding", "reduce_fusion", "user_buffer", "tokens_per_block", "use_paged_context_fmha",
    "use_fp8_context_fmha", "fuse_fp4_quant", "multiple_profiles", "paged_state", "streamingllm", "use_fused_mlp",
    "norm_quant_fusion", "pp_reduce_scatter", "use_custom_all_reduce", "multi_block_mode", "enable_xqa",
    "context_fmha_fp32_acc", "use_context_fmha_for_generation", "lookup_plugin",
}

# modelopt_to_tensorrt_llm.py: these run as Q/DQ in TensorRT, so no --gemm_plugin (except FP8 at batch <= 4).
# The per-token SmoothQuant variant builds the same way: its plugin enables itself from the quant mode.
QDQ_ALGOS = {"FP8", "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"}
# modelopt_to_tensorrt_llm.py: paged context FMHA for these (and for unquantized checkpoints).
PAGED_CONTEXT_FMHA_ALGOS = {None, "FP8", "W4A8_AWQ", "NVFP4"}
# commands/build.py main(): use_fused_mlp is forced off for any quant_algo but these.
FUSED_MLP_ALGOS = {None, "FP8", "MIXED_PRECISION"}
# modelopt_to_tensorrt_llm.py: reduce_fusion for pp_size 1 except these architectures.
NO_REDUCE_FUSION = {"DbrxForCausalLM", "BaichuanForCausalLM", "QWenForCausalLM", "GPTForCausalLM"}
# PyTorch backend recipes (docs/source/features/quantization.md, 1.2.0rc6).
PYTORCH_ALGOS = {None, "FP8", "FP8_BLOCK_SCALES", "FP8_PER_CHANNEL_PER_TOKEN", "NVFP4", "W4A16_AWQ", "W4A8_AWQ",
                 "W4A16_GPTQ", "W4A8_GPTQ", "W4A16_MXFP4", "W4A8_MXFP4_FP8"}
# Which runtimes load the HF unified (ModelOpt) checkpoint of each quant_algo, from their documented format support;
# the one home of this fact (the plan's hf_consumers and the model card read it). {hf} and {tp} are filled in.
HF_CONSUMERS: tuple[dict[str, Any], ...] = (
    {"runtime": "TensorRT-LLM PyTorch backend (>= 1.0; after 1.2 the only line: no engine build, no INT8 "
                "SmoothQuant or INT8 weight-only)",
     "algos": PYTORCH_ALGOS, "command": "trtllm-serve {hf} --backend pytorch --tp_size {tp}",
     "source": "NVIDIA/TensorRT-LLM docs/source/features/quantization.md (PyTorch backend recipes)"},
    {"runtime": "vLLM (quantization=modelopt)", "algos": {"FP8", "FP8_PER_CHANNEL_PER_TOKEN"},
     "command": "vllm serve {hf} --quantization modelopt --tensor-parallel-size {tp}",
     "source": "vllm-project/vllm docs/features/quantization/modelopt.md (supported quant_algo: FP8, "
               "FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO; NVFP4 via modelopt_fp4)"},
    {"runtime": "vLLM (quantization=modelopt_fp4)", "algos": {"NVFP4"},
     "command": "vllm serve {hf} --quantization modelopt_fp4 --tensor-parallel-size {tp}",
     "source": "vllm-project/vllm docs/features/quantization/modelopt.md"},
    {"runtime": "SGLang (ModelOpt FP8 / NVFP4, detected from the checkpoint)", "algos": {"FP8", "NVFP4"},
     "command": "python -m sglang.launch_server --model-path {hf} --tp {tp}",
     "source": "docs.sglang.io advanced_features/quantization (pre-quantized ModelOpt checkpoints; no "
               "--quantization flag for offline-quantized models)"},
)


def hf_consumers(algo: str | None, hf_path: str, tp: int) -> list[dict[str, str]]:
    """The runtimes that load this HF checkpoint, with the command that serves it."""
    return [{"runtime": c["runtime"], "command": c["command"].format(hf=hf_path, tp=tp), "source": c["source"]}
            for c in HF_CONSUMERS if algo in c["algos"]]


# ModelOpt support matrix (docs guides/0_support_matrix) and the TensorRT-LLM hardware matrix.
GPU_NOTES = {
    "FP8": "FP8 needs Ada or Hopper (SM89+) or newer",
    "W4A8_AWQ": "W4A8 (FP8 activations) needs Ada or Hopper (SM89+) or newer",
    "W4A16_AWQ": "INT4 AWQ runs on Ampere (SM80) and newer",
    "W8A8_SQ_PER_CHANNEL": "INT8 SmoothQuant runs on Ampere (SM80) and newer, engine line only",
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": "INT8 SmoothQuant (per-token plugin) runs on Ampere (SM80) and newer, "
                                            "engine line only",
    "NVFP4": "NVFP4 needs Blackwell",
}


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise QuantkitError(f"no config.json in '{folder}'", where="build",
                            fix="run the export stage first (export/trtllm or export/hf)") from None
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"'{folder / 'config.json'}' is not valid JSON ({exc})", where="build") from None


def engine_options(config: dict, build: BuildSection, *, accuracy_build: bool = False) -> tuple[dict, dict]:
    """trtllm-build options (name -> value) for a TensorRT-LLM checkpoint config, and why each is set."""
    q = config.get("quantization") or {}
    algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    dtype = config.get("dtype", "float16")
    exclude = q.get("exclude_modules") or []
    mapping = config.get("mapping") or {}
    mo = "modelopt_to_tensorrt_llm.py"
    opts: dict[str, Any] = {}
    why: dict[str, str] = {}

    def put(name: str, value: Any, reason: str) -> None:
        opts[name], why[name] = value, reason

    put("max_batch_size", build.max_batch_size, "recipe build.max_batch_size")
    put("max_input_len", build.max_input_len, "recipe build.max_input_len")
    put("max_seq_len", build.max_seq_len, "recipe build.max_seq_len")
    put("max_num_tokens", min(build.max_batch_size * build.max_input_len, 16384),
        f"min(max_batch_size * max_input_len, 16384), the bound {mo} uses (TensorRT-LLM recommends <= 16384)")
    if algo is None:
        put("gemm_plugin", dtype, f"unquantized: GEMM plugin in the model dtype ({mo} passes 'auto', which resolves "
            "to the checkpoint dtype)")
    elif algo == "FP8" and build.max_batch_size <= 4:
        put("gemm_plugin", "fp8", f"FP8 at max_batch_size <= 4: the FP8 GEMM plugin wins at low batch ({mo})")
    elif algo == "NVFP4":
        put("gemm_plugin", "nvfp4", f"NVFP4 GEMM plugin ({mo})")
    elif algo in QDQ_ALGOS:
        put("gemm_plugin", "disable", f"{algo} runs as Q/DQ fused by TensorRT; {mo} passes no --gemm_plugin"
            + (" (SmoothQuant GEMM and norm-quant plugins enable themselves)" if algo.startswith("W8A8") else ""))
    else:
        put("gemm_plugin", "auto", f"{algo}: the weight-only/groupwise plugin enables itself; 'auto' covers the "
            f"unquantized GEMMs such as lm_head ({mo})")
    put("gpt_attention_plugin", "auto", "attention plugin in the checkpoint dtype")
    put("context_fmha", "enable", "fused multi-head attention in the context phase (TensorRT-LLM default)")
    put("remove_input_padding", "enable", "packed inputs, required by inflight batching (TensorRT-LLM default)")
    put("kv_cache_type", "paged", "paged KV cache (the current spelling of the deprecated --paged_kv_cache enable, "
        "commands/build.py)")
    dense_excluded = any("attention.dense" in m for m in exclude)
    # Both FMHA switches are written explicitly: plugin/plugin.py PluginConfig defaults them to false in 0.x
    # and to true in 1.x, so leaving them out would build different engines on different versions.
    if algo in PAGED_CONTEXT_FMHA_ALGOS and not dense_excluded:
        put("use_paged_context_fmha", "enable", f"{algo or 'unquantized'}: paged context FMHA ({mo})")
    else:
        put("use_paged_context_fmha", "disable", f"{mo} enables paged context FMHA only for FP8, W4A8_AWQ, NVFP4 "
            "and unquantized checkpoints, and not when attention.dense is excluded; explicit because the default "
            "differs between 0.x and 1.x")
    if algo == "FP8" and kv == "FP8" and not dense_excluded:
        put("use_fp8_context_fmha", "enable", "FP8 weights + FP8 KV cache: FP8 context FMHA (layers/attention.py "
            "requires the FP8 Q/DQ workflow; the attention plugin supports it on SM89/SM90)")
    else:
        put("use_fp8_context_fmha", "disable", "FP8 context FMHA needs FP8 weights and an FP8 KV cache "
            "(layers/attention.py asserts FP8 Q/DQ; FP8 without FP8 KV fails to build, NVIDIA/TensorRT-LLM#2112); "
            "explicit because 1.x defaults it to true")
    fused = algo in FUSED_MLP_ALGOS and not any("gate" in m or "fc" in m for m in exclude)
    put("use_fused_mlp", "enable" if fused else "disable",
        "fused gate/up MLP" if fused else
        f"trtllm-build turns fused MLP off for {algo} (commands/build.py), or gate/fc are excluded ({mo})")
    if int(mapping.get("pp_size", 1) or 1) == 1 and config.get("architecture") not in NO_REDUCE_FUSION:
        put("reduce_fusion", "enable", f"fuse residual add + norm after all-reduce for pp_size 1 ({mo}; no effect "
            "at tp_size 1)")
    if accuracy_build:
        put("gather_context_logits", True, "accuracy build: context logits for log-likelihood evaluation")
    return opts, why


def _apply_overrides(opts: dict, why: dict, overrides: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    applied = {}
    for name, value in overrides.items():
        name = name.removeprefix("--")
        if name in ("checkpoint_dir", "output_dir"):
            raise QuantkitError(f"build.overrides may not set '{name}'; quantkit sets the paths",
                                where="build.overrides")
        if name not in KNOWN_OPTIONS:
            close = difflib.get_close_matches(name, sorted(KNOWN_OPTIONS), n=1)
            notes.append(f"override '{name}' is not a trtllm-build option quantkit knows"
                         + (f" (did you mean '{close[0]}'?)" if close else "") + "; passed through as given")
        if value is None:
            opts.pop(name, None)
            why.pop(name, None)
        else:
            opts[name] = value
            why[name] = "recipe build.overrides"
        applied[name] = value
    return applied


def _line_for(algo: str | None, has_hf: bool) -> tuple[str, str]:
    if algo and algo.startswith("W8A8_SQ"):
        return ENGINE_LINE, (
            "INT8 SmoothQuant builds only as TensorRT engines (trtllm-build, TensorRT-LLM <= 1.2.x): the PyTorch "
            "backend of TensorRT-LLM 1.x has no INT8 SmoothQuant kernels (its recipes: FP4, FP8, FP8 KV, W4A16/W4A8 "
            "AWQ/GPTQ; docs/source/features/quantization.md), so the HF checkpoint cannot be served there")
    if algo not in PYTORCH_ALGOS:
        return ENGINE_LINE, f"{algo} is not among the PyTorch backend's quantization recipes; engine line only"
    if not has_hf:
        return ENGINE_LINE, "No HF unified checkpoint was exported (export.hf: false), so only the engine line applies"
    return PYTORCH_LINE, (
        "The PyTorch backend is TensorRT-LLM 1.x's default and serves the HF unified checkpoint directly (no engine "
        "build); the engine plan is written too, for deployments pinned to TensorRT-LLM <= 1.2.x")


def _mixed_algos(trt_dir: Path | None, hf_dir: Path | None) -> set[str | None]:
    """The per-layer quant_algos of a MIXED_PRECISION checkpoint (method auto)."""
    layers: dict = {}
    if hf_dir is not None and (hf_dir / "hf_quant_config.json").is_file():
        layers = json.loads((hf_dir / "hf_quant_config.json").read_text()).get("quantization", {})
    elif trt_dir is not None and (trt_dir / "quant_cfg.json").is_file():
        layers = json.loads((trt_dir / "quant_cfg.json").read_text())
    return {lc.get("quant_algo") for lc in (layers.get("quantized_layers") or {}).values()}


def _line_for_mixed(layer_algos: set[str | None], has_hf: bool) -> tuple[str, str]:
    """Mixed checkpoints: the PyTorch backend builds each linear with its own QuantConfig from hf_quant_config.json
    (tensorrt_llm/_torch/model_config.py quant_config_dict), so it serves them when it has every layer's recipe;
    the engine line reads quant_cfg.json (models/modeling_utils.py PretrainedConfig.from_json_file)."""
    unsupported = sorted(str(a) for a in layer_algos - PYTORCH_ALGOS)
    if unsupported:
        return ENGINE_LINE, (f"MIXED_PRECISION with {', '.join(unsupported)} layers, which the PyTorch backend has no "
                             "recipe for: engine line only (trtllm-build reads quant_cfg.json)")
    if not has_hf:
        return ENGINE_LINE, "No HF unified checkpoint was exported (export.hf: false), so only the engine line applies"
    return PYTORCH_LINE, (f"MIXED_PRECISION ({', '.join(sorted(str(a) for a in layer_algos))} per layer): the PyTorch "
                          "backend reads each layer's quant_algo from hf_quant_config.json and serves the HF "
                          "checkpoint; the engine plan (quant_cfg.json) is written too, for TensorRT-LLM <= 1.2.x")


def make_build_plan(checkpoint_dir: Path, build: BuildSection, *, accuracy_build: bool = False,
                    hf_dir: Path | None = None, engine_dir: Path | None = None) -> dict:
    """The build plan for one exported model.

    `checkpoint_dir` is the TensorRT-LLM checkpoint (or, with no TensorRT-LLM export, the HF unified one);
    `hf_dir` defaults to its sibling `hf/`, `engine_dir` to `<checkpoint_dir>/../../build/engines`.
    """
    from quantkit.check import check_checkpoint, detect_format

    checkpoint_dir = Path(checkpoint_dir)
    kind = detect_format(checkpoint_dir)
    if kind is None:
        raise QuantkitError(f"'{checkpoint_dir}' is not a TensorRT-LLM or HF checkpoint", where="build",
                            fix="pass export/trtllm (or export/hf) of a run folder")
    trt_dir = checkpoint_dir if kind == "trtllm" else None
    if hf_dir is None:
        sibling = checkpoint_dir.parent / "hf"
        hf_dir = checkpoint_dir if kind == "hf" else (sibling if detect_format(sibling) == "hf" else None)
    engine_dir = Path(engine_dir) if engine_dir else checkpoint_dir.parent.parent / "build" / "engines"
    notes: list[str] = []

    if trt_dir is not None:
        config = _read_config(trt_dir)
        q = config.get("quantization") or {}
        mapping = config.get("mapping") or {}
        algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
        tp, pp = int(mapping.get("tp_size", 1) or 1), int(mapping.get("pp_size", 1) or 1)
        dtype, arch = config.get("dtype"), config.get("architecture")
    else:
        config = _read_config(hf_dir)
        hq = {}
        if (hf_dir / "hf_quant_config.json").exists():
            hq = json.loads((hf_dir / "hf_quant_config.json").read_text()).get("quantization") or {}
        algo, kv, tp, pp = hq.get("quant_algo"), hq.get("kv_cache_quant_algo"), 1, 1
        dtype, arch = config.get("dtype") or config.get("torch_dtype"), (config.get("architectures") or [None])[0]

    layer_algos = _mixed_algos(trt_dir, hf_dir) if algo == "MIXED_PRECISION" else None
    if layer_algos is not None:
        line, why = _line_for_mixed(layer_algos, hf_dir is not None)
        notes.extend(GPU_NOTES[a] for a in sorted(layer_algos) if a in GPU_NOTES)
    else:
        line, why = _line_for(algo, hf_dir is not None)
    engine = None
    if trt_dir is not None:
        opts, reasons = engine_options(config, build, accuracy_build=accuracy_build)
        applied = _apply_overrides(opts, reasons, dict(build.overrides), notes)
        engine = {
            "tensorrt_llm": "TensorRT-LLM <= 1.2.x, trtllm-build engines",
            "options": opts,
            "reasons": reasons,
            "overrides": applied,
            "world_size": tp * pp,
        }
    else:
        notes.append("no TensorRT-LLM checkpoint (export.trtllm: null): no engine plan; set export.trtllm to get one")

    serve = None
    if hf_dir is not None and (algo in PYTORCH_ALGOS or (layer_algos is not None and layer_algos <= PYTORCH_ALGOS)):
        serve = {
            "tensorrt_llm": "TensorRT-LLM >= 1.0, PyTorch backend via trtllm-serve or the LLM API",
            "options": {"backend": "pytorch", "max_batch_size": build.max_batch_size,
                        "max_num_tokens": min(build.max_batch_size * build.max_input_len, 16384),
                        "max_seq_len": build.max_seq_len, "tp_size": tp, "pp_size": pp},
            "note": "quant_algo and KV cache dtype are read from hf_quant_config.json"
                    + ("; FP8 KV cache is used as exported" if kv else ""),
        }
    elif algo and algo.startswith("W8A8_SQ"):
        notes.append("INT8 SmoothQuant: the TensorRT-LLM PyTorch backend does not support it; deploy the engines "
                     "(build/build.sh) with TensorRT-LLM <= 1.2.x")
    consumers = hf_consumers(algo, str(hf_dir), tp) if hf_dir is not None else []
    if hf_dir is not None and not consumers:
        notes.append(f"No documented runtime loads the HF checkpoint of {algo} (TensorRT-LLM's PyTorch backend, "
                     "vLLM and SGLang have no such recipe): serve the TensorRT-LLM engines (build/build.sh, "
                     "TensorRT-LLM <= 1.2.x, the last line with engine builds)")
    if algo in GPU_NOTES:
        notes.append(GPU_NOTES[algo])
    if engine and engine["options"].get("use_fp8_context_fmha") == "enable":
        notes.append("use_fp8_context_fmha: the FP8 FMHA kernels of the attention plugin need SM89/SM90")

    checked = [v for d in (trt_dir, hf_dir) if d is not None for v in check_checkpoint(d)]
    return {
        "format": 1,
        "quant_algo": algo,
        "kv_cache_quant_algo": kv,
        "dtype": dtype,
        "architecture": arch,
        "mapping": {"tp_size": tp, "pp_size": pp},
        "accuracy_build": accuracy_build,
        "target": {"line": line, "why": why},
        "paths": {"trtllm_checkpoint": str(trt_dir) if trt_dir else None,
                  "hf_checkpoint": str(hf_dir) if hf_dir else None, "engine_dir": str(engine_dir)},
        "engine": engine,
        "serve": serve,
        "hf_consumers": consumers,
        "check": {"violations": len(checked), "first": [v.to_dict() for v in checked[:20]]},
        "notes": notes,
        "sources": [
            "NVIDIA/TensorRT-Model-Optimizer examples/llm_ptq/modelopt_to_tensorrt_llm.py (build_tensorrt_llm)",
            "NVIDIA/TensorRT-LLM tensorrt_llm/commands/build.py (trtllm-build options, fused MLP rule)",
            "NVIDIA/TensorRT-LLM tensorrt_llm/plugin/plugin.py (PluginConfig defaults and accepted values)",
            "NVIDIA/TensorRT-LLM tensorrt_llm/layers/attention.py (FP8 context FMHA needs FP8 Q/DQ)",
            "NVIDIA/TensorRT-LLM docs/source/features/quantization.md (PyTorch backend recipes)",
        ],
    }


# --------------------------------------------------------------------------- commands and files


def _argv_value(value: Any) -> str:
    if value is True:
        return "enable"
    if value is False:
        return "disable"
    return str(value)


def build_argv(plan: dict, paths: dict[str, str | None] | None = None) -> list[str]:
    """The exact trtllm-build argument list (after the program name) for a plan."""
    paths = paths or plan["paths"]
    argv = ["--checkpoint_dir", str(paths["trtllm_checkpoint"]), "--output_dir", str(paths["engine_dir"])]
    for name, value in plan["engine"]["options"].items():
        if name in STORE_TRUE:
            if value:
                argv.append(f"--{name}")
        else:
            argv += [f"--{name}", _argv_value(value)]
    return argv


def serve_argv(plan: dict, paths: dict[str, str | None] | None = None) -> list[str] | None:
    paths = paths or plan["paths"]
    if not plan.get("serve") or not paths.get("hf_checkpoint"):
        return None
    argv = ["trtllm-serve", str(paths["hf_checkpoint"])]
    for name, value in plan["serve"]["options"].items():
        argv += [f"--{name}", str(value)]
    return argv


def _relative(paths: dict[str, str | None], root: Path) -> dict[str, str | None]:
    """Paths relative to root (build.sh cd's there); a path outside root stays absolute."""
    out: dict[str, str | None] = {}
    root = root.resolve()
    for key, value in paths.items():
        if value is None:
            out[key] = None
            continue
        p = Path(value).resolve()  # relative paths are relative to the caller's working directory
        out[key] = p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)
    return out


def render_build_sh(plan: dict) -> str:
    """build.sh for a plan whose paths are relative to the folder above build/."""
    q = lambda s: shlex.quote(str(s))  # noqa: E731
    lines = [
        "#!/usr/bin/env bash",
        f"# TensorRT-LLM engine build for quant_algo={plan['quant_algo']} kv_cache={plan['kv_cache_quant_algo']}, "
        "written by quantkit.",
        f"# Target line: {plan['target']['line']}. {plan['target']['why']}.",
        "# Why each option is set: build/plan.json -> engine.reasons.",
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        "",
    ]
    if plan.get("engine"):
        argv = build_argv(plan)
        lines.append(f"# {plan['engine']['tensorrt_llm']}")
        body, i = [], 0
        while i < len(argv):
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                body.append(f"{argv[i]} {q(argv[i + 1])}")
                i += 2
            else:
                body.append(argv[i])
                i += 1
        lines.append("trtllm-build \\\n    " + " \\\n    ".join(body))
        hf = plan["paths"].get("hf_checkpoint")
        lines += ["", "# Serve the engines (TensorRT backend, TensorRT-LLM 1.x; on 0.x drop --backend):",
                  f"#   trtllm-serve {q(plan['paths']['engine_dir'])}"
                  + (f" --tokenizer {q(hf)}" if hf else "") + " --backend tensorrt"]
    else:
        lines.append("echo 'no TensorRT-LLM checkpoint in this run: nothing to build (see plan.json notes)' >&2")
        lines.append("exit 1")
    serve = serve_argv(plan)
    if serve:
        lines += ["", f"# Or serve the HF unified checkpoint ({plan['serve']['tensorrt_llm']}):",
                  "#   " + " ".join(q(a) for a in serve)]
    for note in plan.get("notes", []):
        lines.append(f"# Note: {note}")
    return "\n".join(lines) + "\n"


def write_build_files(run_dir: Path, plan: dict) -> None:
    """Write build/plan.json and an executable build/build.sh; paths become relative to `run_dir`."""
    from quantkit.runfolder import atomic_write_text

    run_dir = Path(run_dir)
    plan = {**plan, "paths": _relative(plan["paths"], run_dir)}
    atomic_write_text(run_dir / "build" / "plan.json", json.dumps(plan, indent=2) + "\n")
    atomic_write_text(run_dir / "build" / "build.sh", render_build_sh(plan), mode=0o755)


# --------------------------------------------------------------------------- the real build (GPU + TensorRT-LLM)


def _missing_runtime() -> list[str]:
    missing = []
    try:
        import tensorrt_llm  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError
        missing.append(f"the tensorrt_llm package is not importable ({type(exc).__name__}: {str(exc)[:120]})")
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("no CUDA GPU is visible to torch")
    except ImportError:
        missing.append("torch is not installed")
    return missing


def build_engines(run_dir: Path, plan: dict) -> dict:
    """Build the engines with TensorRT-LLM's own Python entry point, then load them and generate a few tokens.

    Runs `tensorrt_llm.commands.build.main()` (the code behind `trtllm-build`, same arguments as build.sh,
    in-process) rather than re-assembling `BuildConfig`, whose constructor changed between 0.x and 1.x.
    """
    run_dir = Path(run_dir).resolve()
    missing = _missing_runtime()
    if missing:
        raise MissingDependencyError(
            "cannot build TensorRT-LLM engines here: " + "; ".join(missing)
            + f". The plan is in {run_dir / 'build' / 'plan.json'} and the exact command in "
            f"{run_dir / 'build' / 'build.sh'}", where="build",
            fix="run build/build.sh on a machine with TensorRT-LLM <= 1.2.x and an NVIDIA GPU"
                + (", or serve the HF checkpoint with trtllm-serve (plan.json 'serve')" if plan.get("serve") else ""))
    if not plan.get("engine"):
        raise QuantkitError("the plan has no engine section (no TensorRT-LLM checkpoint)", where="build")
    import tensorrt_llm
    from tensorrt_llm.commands import build as trtllm_build

    paths = {k: (str((run_dir / v).resolve()) if v and not Path(v).is_absolute() else v)
             for k, v in plan["paths"].items()}
    engine_dir = Path(paths["engine_dir"])
    engine_dir.mkdir(parents=True, exist_ok=True)
    argv = ["trtllm-build", *build_argv(plan, paths)]
    saved, sys.argv = sys.argv, argv
    t0 = time.perf_counter()
    try:
        trtllm_build.main()
    finally:
        sys.argv = saved
    seconds = time.perf_counter() - t0
    engines = sorted(engine_dir.glob("rank*.engine"))
    if not engines:
        raise QuantkitError(f"trtllm-build finished but wrote no rank*.engine into {engine_dir}", where="build")
    result = {
        "tensorrt_llm_version": tensorrt_llm.__version__,
        "build_seconds": round(seconds, 1),
        "engine_dir": str(engine_dir),
        "engines": {p.name: p.stat().st_size for p in engines},
        "total_bytes": sum(p.stat().st_size for p in engine_dir.iterdir() if p.is_file()),
        "smoke": _smoke_generate(engine_dir, paths.get("hf_checkpoint") or paths["trtllm_checkpoint"],
                                 plan["engine"]["world_size"]),
    }
    from quantkit.runfolder import RunFolder, atomic_write_json, fingerprint

    atomic_write_json(run_dir / "build" / "engine.json", result)
    RunFolder.open(run_dir).record("engine", fingerprint(plan), seconds, engine_dir=result["engine_dir"],
                                   engine_bytes=result["total_bytes"], smoke=result["smoke"])
    return result


def _smoke_generate(engine_dir: Path, tokenizer_dir: str, world_size: int, prompt: str = "The capital of France is",
                    new_tokens: int = 8) -> dict:
    """Load the engine with TensorRT-LLM's ModelRunner and generate a few tokens."""
    if world_size > 1:
        return {"skipped": f"world size {world_size}: run the smoke test under mpirun -n {world_size}"}
    import torch
    from tensorrt_llm.runtime import ModelRunner
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids[0].to(torch.int32)
    runner = ModelRunner.from_dir(engine_dir=str(engine_dir), rank=0)
    eos = tokenizer.eos_token_id
    out = runner.generate([ids], max_new_tokens=new_tokens, end_id=eos,
                          pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    torch.cuda.synchronize()
    new = out[0][0][len(ids):].tolist()  # [batch, beam, tokens], prompt included
    return {"prompt": prompt, "output_ids": new, "text": tokenizer.decode(new, skip_special_tokens=True)}


# --------------------------------------------------------------------------- CLI


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "build", help="write build/plan.json + build/build.sh for a run, then build engines where TensorRT-LLM exists",
        description="Derive the trtllm-build options per quantization method, write them to RUN/build/, and build "
        "the engines where tensorrt_llm and a CUDA GPU are available (exit 2 with the reason otherwise).")
    p.add_argument("run", type=Path, help="run folder (holds recipe.yaml and export/)")
    p.add_argument("--accuracy", action="store_true", help="accuracy build: gather context logits")
    p.set_defaults(func=run_build_cli)


def _build_section(run_dir: Path) -> BuildSection:
    recipe_path = run_dir / "recipe.yaml"
    if not recipe_path.exists():
        return BuildSection()
    from quantkit.recipe import load_recipe

    return load_recipe(recipe_path).build


def run_build_cli(args) -> int:
    run_dir: Path = args.run
    try:
        build = _build_section(run_dir)
        if not build.enabled:
            print(f"{run_dir / 'recipe.yaml'}: build.enabled is false; nothing to do (set build.enabled: true)")
            return 0
        export = run_dir / "export"
        ckpt = export / "trtllm" if (export / "trtllm").is_dir() else export / "hf"
        if not ckpt.is_dir():
            raise QuantkitError(f"'{run_dir}' has no export/trtllm or export/hf", where="build",
                                fix="run the export stage first")
        plan = make_build_plan(ckpt, build, accuracy_build=args.accuracy,
                               engine_dir=run_dir / "build" / "engines")
        write_build_files(run_dir, plan)
    except QuantkitError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    print(f"wrote {run_dir / 'build' / 'plan.json'} and {run_dir / 'build' / 'build.sh'} "
          f"(target: {plan['target']['line']}; quant_algo {plan['quant_algo']})")
    if plan["check"]["violations"]:
        print(f"warning: the checkpoints have {plan['check']['violations']} check violation(s); "
              f"run `quantkit check {run_dir}` (the engine build will fail on them)", file=sys.stderr)
    if not plan.get("engine"):
        return 0
    try:
        result = build_engines(run_dir, plan)
    except QuantkitError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    print(f"built {len(result['engines'])} engine(s) in {result['build_seconds']} s "
          f"({result['total_bytes'] / 2**20:.1f} MiB) -> {result['engine_dir']}; smoke: {result['smoke']}")
    return 0
