"""Checkpoint validation: a TensorRT-LLM checkpoint or an HF unified (ModelOpt) checkpoint against the
rules its runtime enforces, so a deployment team finds a broken hand-off here and not in `trtllm-build`.

Every rule below names the file it comes from (read through the search tool, NVIDIA/TensorRT-LLM and
NVIDIA/TensorRT-Model-Optimizer on GitHub):

- `tensorrt_llm/models/modeling_utils.py`: `PretrainedConfig.__init__` (required config fields),
  `QuantConfig` (group_size default 128, exclude_modules as fnmatch patterns),
  `PretrainedModel.from_checkpoint` (one `rank{r}.safetensors` per tp*pp rank),
  `PretrainedModel.load` ("Required but not provided tensors": every parameter of a quantized layer must
  be in the file), `preprocess_perlayer_weights` (W4A16_AWQ/W4A8_AWQ weights are int8 `[out/2, in]`,
  transposed there to `[in, out/2]`; `weights_scaling_factor` `[out, in/group]`, transposed there;
  W4A8_AWQ pops `activation_scaling_factor` and `weights_scaling_factor_2`; FP8 weights are F8_E4M3 or
  int8 viewed as F8), `preprocess_weights.process_kv_scaling_factor` (k/v cache scales come in pairs).
- `tensorrt_llm/quantization/layers.py`: `FP8Linear` (scalar weights/activation scaling factors),
  `Int8SmoothQuantLinear` (`weights_scaling_factor` `[out]`, `activation_scaling_factor` `[1]`,
  `prequant_scaling_factor` `[in]`), `WeightOnlyGroupwiseQuantLinear` (`prequant_scaling_factor`
  `[1, in]` exists exactly when `pre_quant_scale` is true).
- `tensorrt_llm/quantization/quantize.py`: `quantize_layers` (every Linear not matched by
  `exclude_modules` becomes a quantized layer; embeddings never do).
- `tensorrt_llm/quantization/mode.py`: `QuantAlgo`, `KV_CACHE_QUANT_ALGO_LIST`.
- `modelopt/torch/export/quant_utils.py` (`pack_int4_in_uint8`: HF int4 weights are uint8 `[out/2, in]`,
  two output rows per byte) and `unified_export_hf.py` (HF names `weight_scale`, `weight_scale_2`,
  `input_scale`, `pre_quant_scale`, `k_scale`/`v_scale`; q/k/v and gate/up pre-quant scales may be folded
  into the preceding norm, so HF `pre_quant_scale` is optional).
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.trtllm_layout import (
    ANY,
    GROUP,
    LAYOUTS,
    PER_IN,
    PER_OUT,
    ROW_IN,
    ROW_LINEARS,
    ROW_OUT,
    SCALAR,
    Layout,
    scale_suffixes,
)

# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Violation:
    tensor_or_field: str
    rule: str
    message: str
    checkpoint: str = ""  # which checkpoint folder (a run folder or bundle holds two)

    def __str__(self) -> str:
        where = f"{self.checkpoint}: " if self.checkpoint else ""
        return f"{where}{self.tensor_or_field} [{self.rule}] {self.message}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# --------------------------------------------------------------------------- formats and rules

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
SCALE_DTYPES = FLOAT_DTYPES | {"F8_E4M3"}  # NVFP4 block scales are FP8
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# tensorrt_llm/quantization/mode.py: QuantAlgo and KV_CACHE_QUANT_ALGO_LIST.
QUANT_ALGOS = {
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
}
KV_CACHE_ALGOS = {"FP8", "INT8", "NVFP4"}

# Scale shapes, relative to the linear's logical [out, in] (one home: quantkit.trtllm_layout).


@dataclass(frozen=True)
class AlgoRule:
    """What one quantized linear must carry for a quant_algo, in one checkpoint format."""

    weight_dtypes: tuple[str, ...]
    packed_int4: bool  # weight holds two int4 per byte along `out`: [out/2, in]
    required: dict[str, str]  # scale suffix -> shape kind
    optional: dict[str, str] = field(default_factory=dict)
    writer: str = ""  # the ModelOpt method that writes this algo (for mismatch messages)
    row_required: dict[str, str] = field(default_factory=dict)  # row linears (attention.dense, mlp.proj) only
    float_weights: bool = False  # the runtime quantizes float weights itself at load (TensorRT-LLM W8A16)
    source: str = ""  # where the rule comes from, when more precise than the format's source
    scale_dtypes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per scale, where the runtime fixes it


def _rule_from_layout(lay: Layout) -> AlgoRule:
    return AlgoRule(lay.weight.dtypes, lay.packed_int4, lay.required(row=False),
                    {lay.pre_quant.name: lay.pre_quant.shape} if lay.pre_quant else {}, writer=lay.writer,
                    row_required={p.name: p.shape for p in lay.row_params},
                    float_weights=set(lay.weight.dtypes) <= FLOAT_DTYPES,
                    scale_dtypes={p.name: p.dtypes for p in (*lay.params, *lay.row_params,
                                                             *([lay.pre_quant] if lay.pre_quant else []))},
                    source=f"{lay.column_class} / {lay.row_class}: "
                    f"{lay.params[0].source if lay.params else lay.weight.source}")


# TensorRT-LLM checkpoint names: derived from the one layout table (quantkit.trtllm_layout, cited per entry).
TRTLLM_RULES: dict[str, AlgoRule] = {algo: _rule_from_layout(lay) for algo, lay in LAYOUTS.items()}
TRTLLM_SCALE_SUFFIXES = (*scale_suffixes(), "act_scale", "alpha", "zero")
TRTLLM_KV_SUFFIXES = ("kv_cache_scaling_factor", "k_cache_scaling_factor", "v_cache_scaling_factor",
                      "kv_cache_rcp_scaling_factor")

# HF unified checkpoint names (modelopt/torch/export/unified_export_hf.py). pre_quant_scale is optional
# because the exporter folds it into the preceding norm where it can (q/k/v, gate/up).
HF_RULES: dict[str, AlgoRule] = {
    "FP8": AlgoRule(("F8_E4M3",), False, {"weight_scale": SCALAR, "input_scale": SCALAR}, writer="fp8"),
    "W8A8_SQ_PER_CHANNEL": AlgoRule(("I8",), False, {"weight_scale": PER_OUT, "input_scale": SCALAR},
                                    {"pre_quant_scale": PER_IN}, writer="int8_sq"),
    "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN": AlgoRule(("I8",), False, {"weight_scale": PER_OUT},
                                                     {"pre_quant_scale": PER_IN},
                                                     writer="int8_sq (activations: per_token)"),
    "FP8_PER_CHANNEL_PER_TOKEN": AlgoRule(("F8_E4M3",), False, {"weight_scale": PER_OUT}, writer="fp8_pcpt"),
    "W4A16_AWQ": AlgoRule(("U8",), True, {"weight_scale": GROUP}, {"pre_quant_scale": PER_IN},
                          writer="int4_awq / int4_rtn"),
    "W4A8_AWQ": AlgoRule(("U8",), True,
                         {"weight_scale": GROUP, "weight_scale_2": SCALAR, "input_scale": SCALAR},
                         {"pre_quant_scale": PER_IN}, writer="w4a8_awq"),
    "W8A16": AlgoRule(("I8",), False, {"weight_scale": PER_OUT}, writer="int8_wo"),
    "NVFP4": AlgoRule(("U8",), False, {"weight_scale": ANY, "weight_scale_2": SCALAR, "input_scale": SCALAR},
                      writer="nvfp4"),
}
HF_SCALE_SUFFIXES = ("weight_scale_2", "weight_scale", "input_scale", "pre_quant_scale", "k_scale", "v_scale")
KV_SUFFIXES = {"k_scale", "v_scale", *TRTLLM_KV_SUFFIXES}

# Block scales of NVFP4 may be zero for an all-zero block; every other scale divides or multiplies.
ZERO_ALLOWED = {("NVFP4", "weights_scaling_factor"), ("NVFP4", "weight_scale")}

# Embedding tables are 2-D but never become quantized linears (quantization/quantize.py quant_map).
_EMBEDDING = re.compile(r"(^|\.)(vocab_embedding|position_embedding|embed_tokens|embed_positions|wte|wpe|"
                        r"word_embeddings|embeddings?)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# --------------------------------------------------------------------------- safetensors headers


class HeaderError(Exception):
    pass


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without loading data (a truncated file is an error)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"file is {size} bytes; a safetensors file starts with an 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise HeaderError(f"header length {n} is larger than the {size - 8} bytes after it (truncated file?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeaderError(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"entry for '{name}' lacks dtype/shape/data_offsets") from None
        if dtype in DTYPE_BYTES and end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise HeaderError(f"'{name}' ({dtype} {list(shape)}) spans {end - start} bytes, "
                              f"expected {math.prod(shape) * DTYPE_BYTES[dtype]}")
        end_max = max(end_max, end)
        out[name] = TensorInfo(dtype, shape)
    if end_max > data_len:
        raise HeaderError(f"tensors need {end_max} bytes of data but the file holds {data_len} (truncated file)")
    if end_max < data_len:
        raise HeaderError(f"{data_len - end_max} bytes after the last tensor (file not fully covered)")
    return out


def _load_values(path: Path, names: Iterable[str]) -> dict[str, Any]:
    """Scale tensors as float32 torch tensors (small: scales only, never weights)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in names:
            out[name] = f.get_tensor(name).float()
    return out


# --------------------------------------------------------------------------- shared per-module checks


def _module_of(name: str, suffixes: Iterable[str]) -> tuple[str, str] | None:
    for suffix in suffixes:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return None


def _excluded(module: str, patterns: list[str]) -> bool:
    # Exactly quantization/quantize.py quantize_layers: fnmatchcase per module. A parent's name does not
    # exclude its children (they are visited, and matched, on their own).
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def _scale_shape_ok(kind: str, shape: tuple[int, ...], out: int, inp: int, group: int | None) -> str | None:
    """None if fine, else the expected shape in words."""
    numel = math.prod(shape)
    if kind == SCALAR:
        return None if numel == 1 else "a scalar ([] or [1])"
    if kind == PER_OUT:
        return None if shape in ((out,), (out, 1)) else f"[{out}] (one per output channel)"
    if kind == PER_IN:
        return None if numel == inp and len(shape) <= 2 else f"[{inp}] (one per input channel)"
    if kind == ROW_OUT:
        return None if shape == (1, out) else f"[1, {out}] (one per output channel, as a row)"
    if kind == ROW_IN:
        return None if shape == (1, inp) else f"[1, {inp}] (one per input channel, as a row)"
    if kind == GROUP:
        if not group or inp % group:
            return None  # reported by the group-size rule
        return None if shape == (out, inp // group) else f"[{out}, {inp // group}] ([out, in/group_size={group}])"
    return None


def _guess_algo(dtypes: set[str]) -> str:
    guesses = {"F8_E4M3": "FP8 (method fp8)", "I8": "an int8 format (W8A8_SQ_PER_CHANNEL, W8A16) or a packed "
               "int4 one (W4A16_AWQ, W4A8_AWQ)", "U8": "packed 4-bit (NVFP4, or HF int4)"}
    if dtypes <= FLOAT_DTYPES:
        return "no quantization (quant_algo null)"
    return " / ".join(guesses.get(d, d) for d in sorted(dtypes - FLOAT_DTYPES))


class _Checker:
    """Collects violations for one checkpoint folder."""

    def __init__(self, label: str):
        self.label = label
        self.violations: list[Violation] = []

    def add(self, where: str, rule: str, message: str) -> None:
        self.violations.append(Violation(where, rule, message, self.label))

    def check_modules(self, tensors: dict[str, TensorInfo], file: Path, *, quant_algo: str | None,
                      rules: dict[str, AlgoRule], scale_suffixes: tuple[str, ...], group: int | None,
                      exclude: list[str], pre_quant_required: bool, float_dtype: str | None,
                      source: str) -> None:
        """Per-linear rules shared by both formats; `source` names the file the rule comes from."""
        scales_by_module: dict[str, dict[str, str]] = {}
        for name in tensors:
            hit = _module_of(name, scale_suffixes)
            if hit:
                scales_by_module.setdefault(hit[0], {})[hit[1]] = name
        weights = {n[: -len(".weight")]: n for n in tensors if n.endswith(".weight")}
        rule = rules.get(quant_algo) if quant_algo else None
        observed: dict[str, int] = {}
        to_load: dict[str, tuple[str, str]] = {}  # tensor -> (module, suffix) for the value checks
        n_checked, pre_missing = 0, []

        for module, wname in sorted(weights.items()):
            info = tensors[wname]
            scales = scales_by_module.get(module, {})
            is_linear = len(info.shape) == 2 and not _EMBEDDING.search(module)
            excluded = _excluded(module, exclude)
            if not is_linear or excluded or quant_algo is None:
                if info.dtype not in FLOAT_DTYPES:
                    if excluded:
                        self.add(wname, "exclude.quantized",
                                 f"module '{module}' matches exclude_modules but its weight is {info.dtype}; "
                                 f"TensorRT-LLM builds it as a plain {float_dtype or 'float'} layer "
                                 "(quantization/quantize.py quantize_layers)")
                    elif quant_algo is None:
                        self.add(wname, "quant_algo.matches_tensors",
                                 f"quant_algo is null but this weight is {info.dtype}")
                    else:
                        self.add(wname, "weight.dtype", f"{info.dtype} weight on a non-linear module")
                elif float_dtype and info.dtype != float_dtype:
                    self.add(wname, "dtype.matches_config",
                             f"{info.dtype} but the checkpoint dtype is {float_dtype} "
                             "(modeling_utils.PretrainedConfig.dtype)")
                for suffix, sname in sorted(scales.items()):
                    if suffix in KV_SUFFIXES:
                        continue  # KV cache scales hang off k_proj/v_proj whether or not the linear is quantized
                    if excluded:
                        self.add(sname, "exclude.quantized",
                                 f"module '{module}' matches exclude_modules but carries the {suffix}")
                    elif quant_algo is None:
                        self.add(sname, "quant_algo.matches_tensors", f"quant_algo is null but {suffix} is present")
                continue
            if is_linear:
                observed[info.dtype] = observed.get(info.dtype, 0) + 1
            if rule is None:
                continue  # unknown/unsupported algo: reported at config level
            if info.dtype not in rule.weight_dtypes:
                if info.dtype in FLOAT_DTYPES:
                    self.add(wname, "linear.unquantized",
                             f"linear '{module}' is {info.dtype} but not in exclude_modules; {quant_algo} needs "
                             f"{'/'.join(rule.weight_dtypes)} weights and the runtime will expect quantized tensors "
                             f"({source}). Add it to exclude_modules or quantize it")
                else:
                    self.add(wname, "weight.dtype",
                             f"{info.dtype} weight, {quant_algo} needs {'/'.join(rule.weight_dtypes)} ({source})")
                continue
            rows, cols = info.shape
            if rule.packed_int4:
                out, inp = rows * 2, cols
                gs = scales.get(next(iter(rule.required)))  # the group scale name
                if gs and len(tensors[gs].shape) == 2:
                    s_out, s_groups = tensors[gs].shape
                    if group and (rows, cols) == (s_groups * group, s_out // 2) and (rows, cols) != (s_out // 2,
                                                                                                    s_groups * group):
                        self.add(wname, "weight.shape",
                                 f"packed int4 weight is [{rows}, {cols}] = [in, out/2]; it must be [out/2, in] = "
                                 f"[{s_out // 2}, {s_groups * group}] with two int4 per byte along out "
                                 f"(modelopt quant_utils.pack_int4_in_uint8; TensorRT-LLM transposes it itself in "
                                 "modeling_utils.preprocess_perlayer_weights)")
                        continue
                if group and inp % group:
                    self.add(wname, "weight.shape",
                             f"in-features {inp} is not a multiple of group_size {group}")
            else:
                out, inp = rows, cols
            need = dict(rule.required)
            if any(module.endswith("." + r) for r in ROW_LINEARS):
                need.update(rule.row_required)
            src = rule.source or source
            pre = {k: v for k, v in rule.optional.items() if "pre" in k} if pre_quant_required else {}
            need.update(pre)
            n_checked += 1
            for suffix in need:
                sname = scales.get(suffix)
                if sname is None and suffix in pre:
                    pre_missing.append(f"{module}.{suffix}")
                elif sname is None:
                    self.add(f"{module}.{suffix}", "scale.missing",
                             f"{quant_algo} linear '{module}' has no {suffix}; TensorRT-LLM fails with "
                             f"'Required but not provided tensors' ({src})")
            for suffix, sname in scales.items():
                kind = need.get(suffix) or rule.optional.get(suffix)
                if kind is None:
                    continue
                sinfo = tensors[sname]
                if sinfo.dtype not in rule.scale_dtypes.get(suffix, SCALE_DTYPES):
                    allowed = "/".join(rule.scale_dtypes.get(suffix, ())) or "floating point"
                    self.add(sname, "scale.dtype", f"scale stored as {sinfo.dtype}; {quant_algo} reads {allowed} "
                             f"({src})")
                    continue
                expected = _scale_shape_ok(kind, sinfo.shape, out, inp, group)
                if expected:
                    self.add(sname, "scale.shape",
                             f"shape {list(sinfo.shape)} for weight [{rows}, {cols}]; expected {expected} ({source})")
                to_load[sname] = (module, suffix)

        if pre_missing:
            why = (f"config says pre_quant_scale: true, so TensorRT-LLM gives every {quant_algo} linear a "
                   "prequant_scaling_factor parameter (quantization/layers.py WeightOnlyGroupwiseQuantLinear) and "
                   "load() fails with 'Required but not provided tensors'")
            if len(pre_missing) == n_checked > 1:  # none exported at all: one finding, not one per linear
                self.add("quantization.pre_quant_scale", "scale.missing",
                         f"{why}, but none of the {n_checked} quantized linears has one (e.g. {pre_missing[0]}). "
                         "INT4 without AWQ (RTN) has no pre-quant scales: write pre_quant_scale: false")
            else:
                for name in pre_missing:
                    self.add(name, "scale.missing", f"missing; {why}")
        if rule is not None and observed:
            wrong = {d for d in observed if d not in rule.weight_dtypes and d not in FLOAT_DTYPES}
            if set(observed) <= FLOAT_DTYPES and sum(observed.values()) > 1 and not rule.float_weights:
                self.add("quantization.quant_algo", "quant_algo.matches_tensors",
                         f"config says {quant_algo} but no linear is quantized ({', '.join(sorted(observed))} "
                         "weights only): an unquantized checkpoint with a quantized label (quant_algo should be null)")
            elif wrong and sum(observed[d] for d in wrong) * 2 >= sum(observed.values()):
                self.add("quantization.quant_algo", "quant_algo.matches_tensors",
                         f"config says {quant_algo} ({'/'.join(rule.weight_dtypes)} weights, written by method "
                         f"'{rule.writer}') but the quantized linears hold {', '.join(sorted(wrong))} weights, "
                         f"which is {_guess_algo(wrong)}")
        self.check_values(file, to_load, quant_algo)

    def check_values(self, file: Path, names: dict[str, tuple[str, str]], quant_algo: str | None) -> None:
        if not names:
            return
        try:
            values = _load_values(file, names)
        except Exception as exc:  # a corrupt file raises whatever safetensors raises
            self.add(file.name, "safetensors.readable", f"could not read scale tensors: {exc}")
            return
        for name, value in values.items():
            _, suffix = names[name]
            finite = value.isfinite()
            if not bool(finite.all()):
                bad = int((~finite).sum())
                self.add(name, "scale.finite", f"{bad} of {value.numel()} values are NaN or Inf")
            elif (quant_algo, suffix) not in ZERO_ALLOWED and bool((value <= 0).any()):
                self.add(name, "scale.positive", f"{int((value <= 0).sum())} values are <= 0 (min {value.min():g})")
            elif bool((value < 0).any()):
                self.add(name, "scale.positive", f"negative values (min {value.min():g})")


def _layers_present(names: Iterable[str]) -> set[int]:
    return {int(m.group(1)) for n in names if (m := _LAYER.search(n))}


def _read_json(path: Path, chk: _Checker, rule: str) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        chk.add(path.name, rule, f"{path.name} is missing")
        return None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        chk.add(path.name, rule, f"{path.name} is not readable JSON ({exc})")
        return None
    if not isinstance(data, dict):
        chk.add(path.name, rule, f"{path.name} is not a JSON object")
        return None
    return data


# --------------------------------------------------------------------------- TensorRT-LLM checkpoint

# modeling_utils.PretrainedConfig.__init__: the keyword-only arguments without defaults.
TRTLLM_REQUIRED_FIELDS = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads")
SRC_TRT = "tensorrt_llm/models/modeling_utils.py, tensorrt_llm/quantization/layers.py"


def check_trtllm(folder: Path, label: str = "") -> list[Violation]:
    chk = _Checker(label or str(folder))
    config = _read_json(folder / "config.json", chk, "config.present")
    if config is None:
        return chk.violations
    for key in TRTLLM_REQUIRED_FIELDS:
        if key not in config:
            chk.add(key, "config.field", f"required field '{key}' is missing (modeling_utils.PretrainedConfig)")
    dtype = config.get("dtype")
    float_dtype = TORCH_DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dtype is not None and float_dtype is None:
        chk.add("dtype", "config.field", f"dtype '{dtype}' is not float16, bfloat16 or float32")

    q = config.get("quantization") or {}
    if not isinstance(q, dict):
        chk.add("quantization", "config.field", "quantization must be an object")
        q = {}
    algo, kv = q.get("quant_algo"), q.get("kv_cache_quant_algo")
    if algo is not None and algo not in QUANT_ALGOS:
        chk.add("quantization.quant_algo", "config.quant_algo",
                f"'{algo}' is not a TensorRT-LLM QuantAlgo (tensorrt_llm/quantization/mode.py)")
    elif algo is not None and algo not in TRTLLM_RULES and algo != MIXED:
        chk.add("quantization.quant_algo", "config.quant_algo",
                f"'{algo}' is valid for TensorRT-LLM but quantkit has no tensor rules for it; not checked")
    mixed = _mixed_layers(chk, folder / "quant_cfg.json") if algo == MIXED else None
    if kv is not None and kv not in KV_CACHE_ALGOS:
        chk.add("quantization.kv_cache_quant_algo", "config.kv_cache_quant_algo",
                f"'{kv}' is not one of {sorted(KV_CACHE_ALGOS)} (mode.py KV_CACHE_QUANT_ALGO_LIST)")
    group = q.get("group_size", 128)  # QuantConfig default
    rule = TRTLLM_RULES.get(algo) if algo else None
    if rule and rule.packed_int4 and (not isinstance(group, int) or group <= 0):
        chk.add("quantization.group_size", "config.group_size", f"group_size {group!r} must be a positive int")
        group = None
    exclude = q.get("exclude_modules") or []
    pre_quant = bool(q.get("pre_quant_scale", False))

    mapping = config.get("mapping") or {}
    tp, pp, cp = (int(mapping.get(k, 1) or 1) for k in ("tp_size", "pp_size", "cp_size"))
    world = mapping.get("world_size", tp * pp * cp)
    if "mapping" not in config:
        chk.add("mapping", "config.field", "mapping is missing; TensorRT-LLM then assumes one rank")
    if world != tp * pp * cp:
        chk.add("mapping.world_size", "mapping.world_size",
                f"world_size {world} != tp_size {tp} x pp_size {pp}" + (f" x cp_size {cp}" if cp > 1 else ""))
    # from_checkpoint reads rank{r}.safetensors; cp ranks share the tp*pp files.
    expected = {f"rank{r}.safetensors" for r in range(tp * pp)}
    present = {p.name for p in folder.glob("rank*.safetensors")}
    for name in sorted(expected - present, key=lambda s: int(re.sub(r"\D", "", s) or 0)):
        chk.add(name, "rank.missing", f"mapping tp_size={tp} x pp_size={pp} needs {name}; it is not in the folder "
                "(modeling_utils.PretrainedModel.from_checkpoint)")
    for name in sorted(present - expected):
        chk.add(name, "rank.extra", f"{name} is beyond world size {tp * pp}; a stale file from another mapping?")

    layers: set[int] = set()
    for name in sorted(expected & present):
        path = folder / name
        try:
            tensors = read_safetensors_header(path)
        except (HeaderError, OSError) as exc:
            chk.add(name, "safetensors.header", str(exc))
            continue
        layers |= _global_layers(_layers_present(tensors), config, int(re.sub(r"\D", "", name)) // tp, pp)
        if mixed is not None:
            _check_mixed(chk, tensors, path, mixed, rules=TRTLLM_RULES,
                         scale_suffixes=TRTLLM_SCALE_SUFFIXES + TRTLLM_KV_SUFFIXES, pre_quant_flag=True,
                         float_dtype=float_dtype, source=SRC_TRT)
        else:
            chk.check_modules(tensors, path, quant_algo=algo, rules=TRTLLM_RULES,
                              scale_suffixes=TRTLLM_SCALE_SUFFIXES + TRTLLM_KV_SUFFIXES, group=group,
                              exclude=exclude, pre_quant_required=pre_quant, float_dtype=float_dtype, source=SRC_TRT)
        _check_trtllm_kv(chk, tensors, path, kv)
        _check_trtllm_norms(chk, tensors, LAYOUTS.get(algo) if algo else None)
    n_layers = config.get("num_hidden_layers")
    if isinstance(n_layers, int) and layers and layers != set(range(n_layers)):
        missing = sorted(set(range(n_layers)) - layers)
        chk.add("num_hidden_layers", "layers.missing",
                f"config has {n_layers} layers; tensors of layers {missing[:10]} are missing"
                if missing else f"tensors of layers beyond num_hidden_layers={n_layers}: {sorted(layers)[-3:]}")
    return chk.violations


def _global_layers(local: set[int], config: dict, pp_rank: int, pp: int) -> set[int]:
    """Rank files number their layers from 0; map them to the model's (trtllm_layout.pp_layers)."""
    n_layers = config.get("num_hidden_layers")
    if pp == 1 or not isinstance(n_layers, int):
        return local
    from quantkit.trtllm_layout import pp_layers

    ids = pp_layers(n_layers, pp, pp_rank)
    return {ids[i] if i < len(ids) else n_layers + i for i in local}


def _check_trtllm_norms(chk: _Checker, tensors: dict[str, TensorInfo], lay: Layout | None) -> None:
    """Parameters the layout gives the decoder norms (SmoothQuantRmsNorm.scale_to_int for the plugin algos)."""
    if lay is None or not lay.norm_params:
        return
    from quantkit.trtllm_layout import DECODER_NORMS

    norms = sorted(n[: -len(".weight")] for n in tensors
                   if ".layers." in n and any(n.endswith(f".{d}.weight") for d in DECODER_NORMS))
    for norm in norms:
        for p in lay.norm_params:
            name = f"{norm}.{p.name}"
            if name not in tensors:
                chk.add(name, "scale.missing", f"{lay.norm_class} '{norm}' has no {p.name}; TensorRT-LLM fails with "
                        f"'Required but not provided tensors' ({p.source})")
            elif math.prod(tensors[name].shape) != 1:
                chk.add(name, "scale.shape", f"shape {list(tensors[name].shape)}; expected [1] ({p.source})")


MIXED = "MIXED_PRECISION"


def _mixed_layers(chk: _Checker, path: Path) -> dict[str, dict]:
    """`quantized_layers` of a MIXED_PRECISION checkpoint: TensorRT-LLM reads quant_cfg.json next to config.json
    (models/modeling_utils.py PretrainedConfig.from_json_file); the HF checkpoint lists them in hf_quant_config.json."""
    data = _read_json(path, chk, "mixed.quant_cfg") if path.is_file() else None
    if data is None:
        chk.add(path.name, "mixed.quant_cfg", f"quant_algo is {MIXED} but {path.name} (per-layer algos) is missing")
        return {}
    layers = (data.get("quantization", data)).get("quantized_layers")
    if not isinstance(layers, dict) or not layers:
        chk.add(f"{path.name}: quantized_layers", "mixed.quant_cfg", f"{MIXED} without a quantized_layers mapping")
        return {}
    return layers


def _check_mixed(chk: _Checker, tensors: dict[str, TensorInfo], path: Path, layers: dict[str, dict], *,
                 rules: dict[str, AlgoRule], scale_suffixes: tuple[str, ...], pre_quant_flag: bool,
                 float_dtype: str | None, source: str) -> None:
    """Each listed layer against the rules of its own quant_algo; every other linear must be unquantized."""
    per_layer: dict[str, dict[str, TensorInfo]] = {}
    rest: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        module = name.rsplit(".", 1)[0]
        (per_layer.setdefault(module, {}) if module in layers else rest)[name] = info
    for module, sub in sorted(per_layer.items()):
        lc = layers[module]
        algo = lc.get("quant_algo")
        if algo not in rules:
            chk.add(f"quantized_layers.{module}", "config.quant_algo", f"'{algo}' has no quantkit tensor rules")
            continue
        group = lc.get("group_size") if rules[algo].packed_int4 else None
        chk.check_modules(sub, path, quant_algo=algo, rules=rules, scale_suffixes=scale_suffixes, group=group,
                          exclude=[], pre_quant_required=pre_quant_flag and bool(lc.get("pre_quant_scale")),
                          float_dtype=float_dtype, source=source)
    chk.check_modules(rest, path, quant_algo=None, rules=rules, scale_suffixes=scale_suffixes, group=None, exclude=[],
                      pre_quant_required=False, float_dtype=float_dtype, source=source)


def _check_trtllm_kv(chk: _Checker, tensors: dict[str, TensorInfo], path: Path, kv: str | None) -> None:
    """KV-cache scales per attention (modeling_utils.preprocess_weights.process_kv_scaling_factor)."""
    if kv is None:
        return
    attentions = sorted({n[: -len(".qkv.weight")] for n in tensors if n.endswith(".attention.qkv.weight")})
    to_load = {}
    for att in attentions:
        names = {s: f"{att}.{s}" for s in TRTLLM_KV_SUFFIXES}
        has = {s for s, n in names.items() if n in tensors}
        if "k_cache_scaling_factor" in has and "v_cache_scaling_factor" not in has:
            chk.add(names["v_cache_scaling_factor"], "kv_scale.missing",
                    "k_cache_scaling_factor without v_cache_scaling_factor (process_kv_scaling_factor asserts)")
        if "kv_cache_scaling_factor" not in has and not {"k_cache_scaling_factor", "v_cache_scaling_factor"} <= has:
            chk.add(names["kv_cache_scaling_factor"], "kv_scale.missing",
                    f"kv_cache_quant_algo is {kv} but attention '{att}' has no kv_cache_scaling_factor "
                    "(nor k/v_cache_scaling_factor)")
        for s in has:
            info = tensors[names[s]]
            if math.prod(info.shape) != 1:
                chk.add(names[s], "scale.shape", f"shape {list(info.shape)}; a KV cache scale is a scalar [1]")
            else:
                to_load[names[s]] = (att, s)
    chk.check_values(path, to_load, None)


# --------------------------------------------------------------------------- HF unified checkpoint

SRC_HF = "modelopt/torch/export/unified_export_hf.py; loaded by TensorRT-LLM's PyTorch backend"


def check_hf(folder: Path, label: str = "") -> list[Violation]:
    chk = _Checker(label or str(folder))
    config = _read_json(folder / "config.json", chk, "config.present")
    if config is None:
        return chk.violations
    if not config.get("architectures"):
        chk.add("architectures", "config.field", "config.json has no 'architectures' (loaders pick the model by it)")
    qc = config.get("quantization_config")
    hqc_path = folder / "hf_quant_config.json"
    hqc = _read_json(hqc_path, chk, "hf_quant_config.present") if hqc_path.exists() else None
    algo = kv = None
    exclude: list[str] = []
    group: int | None = None
    if hqc is not None:
        hq = hqc.get("quantization") or {}
        algo, kv = hq.get("quant_algo"), hq.get("kv_cache_quant_algo")
        exclude = list(hq.get("exclude_modules") or [])
        group = hq.get("group_size")
        if not isinstance(qc, dict):
            chk.add("quantization_config", "hf.quantization_config",
                    "hf_quant_config.json exists but config.json has no quantization_config")
        else:
            _check_hf_consistency(chk, qc, algo, kv, exclude)
    elif isinstance(qc, dict) and qc.get("quant_method") == "modelopt":
        chk.add("hf_quant_config.json", "hf_quant_config.present",
                "config.json says quant_method modelopt but hf_quant_config.json is missing (ModelOpt writes both)")
        algo, exclude = qc.get("quant_algo"), list(qc.get("ignore") or [])
    elif isinstance(qc, dict):
        chk.add("quantization_config.quant_method", "hf.quant_method",
                f"quant_method is '{qc.get('quant_method')}', not modelopt; quantkit checks ModelOpt checkpoints only")
        return chk.violations
    if algo is not None and algo not in QUANT_ALGOS:
        chk.add("quantization.quant_algo", "config.quant_algo", f"'{algo}' is not a TensorRT-LLM QuantAlgo")
    elif algo is not None and algo not in HF_RULES and algo != MIXED:
        chk.add("quantization.quant_algo", "config.quant_algo",
                f"'{algo}' has no quantkit tensor rules; not checked")
    mixed = _mixed_layers(chk, hqc_path) if algo == MIXED else None
    rule = HF_RULES.get(algo) if algo else None
    if rule and rule.packed_int4 and (not isinstance(group, int) or group <= 0):
        chk.add("quantization.group_size", "config.group_size",
                f"{algo} needs a positive group_size in hf_quant_config.json, found {group!r}")
        group = None
    if kv is not None and kv not in KV_CACHE_ALGOS:
        chk.add("quantization.kv_cache_quant_algo", "config.kv_cache_quant_algo", f"'{kv}' is not a KV cache algo")

    files = _hf_weight_files(folder, chk)
    all_names: set[str] = set()
    for path in files:
        try:
            tensors = read_safetensors_header(path)
        except (HeaderError, OSError) as exc:
            chk.add(path.name, "safetensors.header", str(exc))
            continue
        all_names |= set(tensors)
        if mixed is not None:
            _check_mixed(chk, tensors, path, mixed, rules=HF_RULES, scale_suffixes=HF_SCALE_SUFFIXES,
                         pre_quant_flag=False, float_dtype=None, source=SRC_HF)
        else:
            chk.check_modules(tensors, path, quant_algo=algo, rules=HF_RULES, scale_suffixes=HF_SCALE_SUFFIXES,
                              group=group, exclude=exclude, pre_quant_required=False, float_dtype=None,
                              source=SRC_HF)
        _check_hf_kv(chk, tensors, path, kv)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = (_read_json(index, chk, "hf.index") or {}).get("weight_map") or {}
        for tensor in sorted(set(weight_map) - all_names):
            if (folder / weight_map[tensor]).exists():
                chk.add(tensor, "hf.index", f"listed in the index under {weight_map[tensor]} but not in that file")
    n_layers = config.get("num_hidden_layers")
    layers = _layers_present(all_names)
    if isinstance(n_layers, int) and layers and not set(range(n_layers)) <= layers:
        chk.add("num_hidden_layers", "layers.missing",
                f"config has {n_layers} layers; tensors of layers {sorted(set(range(n_layers)) - layers)[:10]} "
                "are missing")
    return chk.violations


def _check_hf_consistency(chk: _Checker, qc: dict, algo: str | None, kv: str | None, exclude: list[str]) -> None:
    if qc.get("quant_method") != "modelopt":
        chk.add("quantization_config.quant_method", "hf.quant_method",
                f"quant_method is {qc.get('quant_method')!r}; a ModelOpt checkpoint says 'modelopt'")
    if "quant_algo" in qc and qc.get("quant_algo") != algo:
        chk.add("quantization_config.quant_algo", "hf.quant_config_consistent",
                f"config.json says {qc.get('quant_algo')!r}, hf_quant_config.json says {algo!r}")
    cfg_kv = qc.get("kv_cache_quant_algo", "absent")
    if cfg_kv == "absent" and "kv_cache_scheme" in qc:
        cfg_kv = "FP8" if (qc["kv_cache_scheme"] or {}).get("type") == "float" else "INT8"
    elif cfg_kv == "absent":
        cfg_kv = None
    if (cfg_kv is None) != (kv is None) or (cfg_kv and kv and cfg_kv != kv):
        chk.add("quantization_config.kv_cache_scheme", "hf.quant_config_consistent",
                f"config.json KV cache quantization is {cfg_kv!r}, hf_quant_config.json says {kv!r}")
    ignore = qc.get("ignore")
    if ignore is not None and set(ignore) != set(exclude):
        chk.add("quantization_config.ignore", "hf.quant_config_consistent",
                f"config.json ignore {sorted(ignore)} != hf_quant_config.json exclude_modules {sorted(exclude)}")


def _hf_weight_files(folder: Path, chk: _Checker) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = _read_json(index, chk, "hf.index") or {}
        names = sorted(set((data.get("weight_map") or {}).values()))
        for n in names:
            if not (folder / n).exists():
                chk.add(n, "hf.index", "shard listed in model.safetensors.index.json is missing")
        return [folder / n for n in names if (folder / n).exists()]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        chk.add("model.safetensors", "hf.weights", "no *.safetensors weight file in the folder")
    return files


def _check_hf_kv(chk: _Checker, tensors: dict[str, TensorInfo], path: Path, kv: str | None) -> None:
    if kv is None:
        return
    attentions = sorted({n.rsplit(".", 2)[0] for n in tensors
                         if re.search(r"\.(k_proj|qkv_proj|Wqkv)\.weight$", n)})
    to_load = {}
    for att in attentions:
        for s, proj in (("k_scale", "k_proj"), ("v_scale", "v_proj")):
            # ModelOpt 0.47 puts them on k_proj/v_proj; other versions on the attention module.
            found = [n for n in (f"{att}.{proj}.{s}", f"{att}.{s}", f"{att}.qkv_proj.{s}") if n in tensors]
            if not found:
                chk.add(f"{att}.{proj}.{s}", "kv_scale.missing",
                        f"kv_cache_quant_algo is {kv} but attention '{att}' has no {s}")
            for n in found:
                if math.prod(tensors[n].shape) != 1:
                    chk.add(n, "scale.shape", f"shape {list(tensors[n].shape)}; a KV cache scale is a scalar")
                else:
                    to_load[n] = (att, s)
    chk.check_values(path, to_load, None)


# --------------------------------------------------------------------------- entry points


def detect_format(path: Path) -> str | None:
    """'trtllm', 'hf' or None, from config.json and the weight files present."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    if any(path.glob("rank*.safetensors")) or ("architecture" in data and "mapping" in data):
        return "trtllm"
    if "architectures" in data or "model_type" in data or any(path.glob("*.safetensors")):
        return "hf"
    return "trtllm" if "architecture" in data else None


def find_checkpoints(path: Path) -> list[tuple[str, Path]]:
    """The checkpoints under PATH: itself, or those of a run folder (export/) or bundle (checkpoints/)."""
    path = Path(path)
    if not path.exists():
        raise QuantkitError(f"'{path}' does not exist", where="check", fix="pass a checkpoint, run or bundle folder")
    if path.is_file():
        raise QuantkitError(f"'{path}' is a file", where="check",
                            fix="pass the checkpoint folder (the one holding config.json)")
    kind = detect_format(path)
    if kind:
        return [(kind, path)]
    found = []
    for parent in ("export", "checkpoints"):
        for sub in ("trtllm", "hf"):
            d = path / parent / sub
            if d.is_dir():
                found.append((detect_format(d) or sub, d))
    if not found:
        raise QuantkitError(
            f"'{path}' is neither a checkpoint (config.json + safetensors) nor a run folder (export/trtllm, "
            "export/hf) nor a package bundle (checkpoints/trtllm, checkpoints/hf)", where="check",
            fix="point at one of those")
    return found


def check_checkpoint(path: Path) -> list[Violation]:
    """Validate a TensorRT-LLM or HF unified checkpoint (auto-detected), or every one in a run/bundle folder."""
    path = Path(path)
    violations: list[Violation] = []
    for kind, folder in find_checkpoints(path):
        label = str(folder.relative_to(path)) if folder != path else str(folder)
        violations += check_trtllm(folder, label) if kind == "trtllm" else check_hf(folder, label)
    return violations


# --------------------------------------------------------------------------- CLI

MAX_PRINTED = 60


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("check", help="validate TensorRT-LLM / HF unified checkpoints against the format rules",
                              description="Validate a checkpoint, a run folder or a package bundle. Exit 0 clean, "
                              "1 violations, 2 unusable input.")
    p.add_argument("path", type=Path, help="checkpoint folder, run folder or package bundle")
    p.set_defaults(func=run_check_cli)


def run_check_cli(args) -> int:
    try:
        checkpoints = find_checkpoints(args.path)
        violations = check_checkpoint(args.path)
    except QuantkitError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    for v in violations[:MAX_PRINTED]:
        print(v)
    if len(violations) > MAX_PRINTED:
        print(f"... and {len(violations) - MAX_PRINTED} more")
    names = ", ".join(f"{k} ({f})" for k, f in checkpoints)
    if violations:
        rules = sorted({v.rule for v in violations})
        print(f"FAILED: {len(violations)} violation(s) of {', '.join(rules)} in {names}")
        return 1
    print(f"OK: {names} pass{'es' if len(checkpoints) == 1 else ''} every rule")
    return 0
