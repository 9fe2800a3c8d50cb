"""Recipes: a validated, fully explicit description of one quantization run.

A recipe is YAML with mandatory sections (nothing silently falls back to a default section):
metadata, model, quantize, calibration, export, build, evaluate. Unknown keys are errors.
`$import: other.yaml` inside any mapping merges a reusable unit (local keys win), and
`--set a.b=c` overrides apply after imports. Errors name the file, field path and line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from quantkit.errors import RecipeError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Metadata(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="run name; also the run folder name")
    description: str = ""


class ModelSection(_Section):
    source: str = Field(description="builtin:<name>, a local HF folder, or a Hub id")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    trust_remote_code: bool = False
    device_map: Literal["auto", "cuda", "cpu"] | dict[str, int | str] | None = Field(
        default=None, description="where the weights are loaded: unset = the run's device (one GPU, else cpu); "
        "auto = accelerate's placement (shards over GPUs, offloads to CPU and disk what does not fit); "
        "or a module -> device mapping")
    max_memory: dict[str, int | str] | None = Field(
        default=None, description="per-device memory cap for accelerate's placement, e.g. {0: 8GiB, cpu: 100GiB}; "
        "implies device_map auto when that is unset")

    @field_validator("max_memory", mode="before")
    @classmethod
    def _device_keys(cls, v: Any) -> Any:
        # YAML reads `0: 8GiB` as an int key; accelerate takes ints for GPUs and "cpu"/"disk" as strings.
        return {str(k): val for k, val in v.items()} if isinstance(v, dict) else v


class QuantizeSection(_Section):
    method: str = Field(description="a name from the method registry (quantkit methods)")
    block_size: int | None = Field(default=None, gt=0, description="group size for block-wise int4")
    awq_algorithm: Literal["awq_lite", "awq_clip", "awq_full"] | None = None
    smoothquant_alpha: float | Literal["auto"] | None = Field(
        default=None, description="SmoothQuant migration strength in [0, 1], or 'auto': searched per layer")
    activations: Literal["per_tensor", "per_token"] | None = Field(
        default=None, description="INT8 SmoothQuant activation scaling: static per-tensor or dynamic per-token"
    )
    gptq_damping: float | None = Field(default=None, gt=0.0, le=1.0,
                                       description="GPTQ damping: fraction of the mean Hessian diagonal added to it")
    gptq_block: int | None = Field(default=None, gt=0,
                                   description="GPTQ columns updated per step (a multiple of block_size)")
    gptq_layerwise: bool | None = Field(
        default=None, description="GPTQ Hessians from the already-quantized earlier layers (sequential), or at once")
    gptq_scales: Literal["max", "local_hessian"] | None = Field(
        default=None, description="GPTQ block scales: max calibration (ModelOpt's) or searched by local_hessian first")
    gptq_act_order: bool | None = Field(
        default=None, description="GPTQ columns in descending Hessian-diagonal order, each on its stored group's scale")
    effective_bits: float | None = Field(
        default=None, gt=0.0, le=16.0, description="method auto: average weight bits over the quantized layers")
    candidates: list[str] | None = Field(default=None, description="method auto: formats searched per layer")
    kv_cache: Literal["fp8"] | None = None
    exclude: list[str] = Field(default_factory=lambda: ["lm_head"], description="module name patterns kept unquantized")

    @model_validator(mode="after")
    def _knobs_apply(self) -> QuantizeSection:
        from quantkit.methods import check_method_settings

        check_method_settings(self)  # raises ValueError("field '<knob>': ...") with the fix
        if self.method == "auto":
            from quantkit.methods import check_auto_candidates, resolved_settings

            if self.effective_bits is None:
                raise ValueError("field 'effective_bits': method 'auto' needs a budget, e.g. effective_bits: 5.0")
            check_auto_candidates(resolved_settings(self)["candidates"])
        return self

    @field_validator("smoothquant_alpha")
    @classmethod
    def _alpha_range(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0.0 <= v <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1] or 'auto', got {v}")
        return v

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int | None) -> int | None:
        if v is not None and v & (v - 1):
            raise ValueError(f"block_size must be a power of two (32, 64, 128), got {v}")
        return v


class CalibrationSection(_Section):
    dataset: str = Field(description="builtin:wiki, builtin:news, a local .txt/.jsonl/.parquet file, or a Hub name")
    n_samples: int = Field(default=128, gt=0)
    seq_len: int = Field(default=512, gt=0)
    batch_size: int | Literal["auto"] = Field(
        default=8, description="calibration batch; auto = the largest that fits on the GPU (ModelOpt's "
        "get_max_batch_size, as its hf_ptq example with --batch_size 0), capped at n_samples; on CPU 8")
    seed: int = 1234
    text_field: str = "text"

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"batch_size must be > 0 or 'auto', got {v}")
        return v


class TrtllmExport(_Section):
    tp_size: int = Field(default=1, gt=0)
    pp_size: int = Field(default=1, gt=0)
    dtype: Literal["float16", "bfloat16"] = "float16"


class ExportSection(_Section):
    trtllm: TrtllmExport | None = None
    hf: bool = True


class BuildSection(_Section):
    enabled: bool = Field(default=True, description="write the engine build plan (and build where TensorRT-LLM exists)")
    max_batch_size: int = Field(default=8, gt=0)
    max_input_len: int = Field(default=1024, gt=0)
    max_seq_len: int = Field(default=1152, gt=0)
    overrides: dict[str, Any] = Field(default_factory=dict, description="trtllm-build options that win over the plan")

    @model_validator(mode="after")
    def _lengths(self) -> BuildSection:
        if self.max_seq_len < self.max_input_len:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must be >= max_input_len ({self.max_input_len})")
        return self


class TaskSettings(_Section):
    """lm-eval's per-run options for one task, as `lm_eval.simple_evaluate` takes them."""

    num_fewshot: int | None = Field(default=None, ge=0, description="null = the task's own default")
    apply_chat_template: bool | str = Field(default=False, description="true, or the name of a chat template")
    fewshot_as_multiturn: bool | None = Field(default=None, description="null = same as apply_chat_template")
    gen_kwargs: dict[str, Any] = Field(default_factory=dict,
                                       description="generation settings of generate_until tasks: until, "
                                       "max_gen_toks, do_sample, temperature, ...")


class EvaluateSection(_Section):
    tasks: list[str] = Field(default_factory=list, description="lm-eval task/group names or quantkit's offline tasks")
    include_path: list[str] = Field(default_factory=list, description="folders of your own lm-eval task YAMLs")
    limit: int | None = Field(default=None, gt=0, description="examples per task; null = whole task")
    limits: dict[str, int] = Field(default_factory=dict, description="per-task limit, wins over `limit`")
    task_settings: dict[str, TaskSettings] = Field(default_factory=dict,
                                                   description="per task: num_fewshot, apply_chat_template, ...")
    batch_size: int = Field(default=8, gt=0)

    @model_validator(mode="after")
    def _settings_name_tasks(self) -> EvaluateSection:
        stray = [t for t in self.task_settings if t not in self.tasks]
        if stray:  # a setting for a task that does not run is a typo, not a no-op
            raise ValueError(f"field 'task_settings': {stray} not in evaluate.tasks {self.tasks}")
        return self

    def lm_eval_settings(self, task: str) -> dict[str, Any]:
        """The task's settings as keyword arguments of lm_eval.simple_evaluate (unset ones left out)."""
        ts = self.task_settings.get(task)
        if ts is None:
            return {}
        out = ts.model_dump(exclude_none=True)
        if not out["gen_kwargs"]:
            del out["gen_kwargs"]
        return out


CompileScope = Literal["layers", "regions", "none"]


class BenchSection(_Section):
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    input_len: int = Field(default=128, gt=0)
    output_len: int = Field(default=32, gt=0)
    warmup: int = Field(default=1, ge=0)
    repeats: int = Field(default=3, gt=0)
    compile: CompileScope = Field(
        default="layers", description="what torch.compile covers in the CUDA decode step (quantkit.bench): layers = "
        "each decoder layer whole (attention, cache write, norms, residuals), one compiled graph shared by all "
        "layers; regions = norms, MLPs, projections and RoPE separately; none = eager. CPU runs stay eager")


class Recipe(_Section):
    metadata: Metadata
    model: ModelSection
    quantize: QuantizeSection
    calibration: CalibrationSection
    export: ExportSection
    build: BuildSection
    evaluate: EvaluateSection
    bench: BenchSection | None = None
    output_dir: str = Field(default="runs", description="parent folder of the run folder")
    _source: tuple[str, dict] | None = PrivateAttr(default=None)  # (file, {field path: line})

    def locate(self, dotted: str) -> str:
        """'calibration.dataset' -> 'recipes/x.yaml:7: calibration.dataset' (as precise as the file allows)."""
        if self._source is None:
            return dotted
        path, lines = self._source
        keys = tuple(dotted.split("."))
        for n in range(len(keys), 0, -1):
            if keys[:n] in lines:
                return f"{path}:{lines[keys[:n]]}: {dotted}"
        return f"{path}: {dotted}"

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.metadata.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- loading with line numbers


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records the line of every mapping key, keyed by its field path."""


def _compose_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[path + (key,)] = key_node.start_mark.line + 1
            _compose_lines(value_node, path + (key,), lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _compose_lines(item, path + (i,), lines)


def _read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file '{path}' does not exist", fix="check the path") from None
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where) from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _compose_lines(node, (), lines)
    return data, lines


def _resolve_imports(data: Any, base: Path, seen: tuple[Path, ...]) -> Any:
    """Expand `$import: file.yaml` (or a list of files) inside mappings; local keys win."""
    if isinstance(data, list):
        return [_resolve_imports(v, base, seen) for v in data]
    if not isinstance(data, dict):
        return data
    merged: dict = {}
    imports = data.get("$import")
    for ref in [imports] if isinstance(imports, str) else (imports or []):
        target = (base / ref).resolve()
        if target in seen:
            raise RecipeError(f"$import cycle through '{ref}'", where=str(seen[-1]))
        unit, _ = _read_yaml(target)
        if not isinstance(unit, dict):
            raise RecipeError(f"imported unit '{ref}' must be a mapping", where=str(target))
        merged = _deep_merge(merged, _resolve_imports(unit, target.parent, seen + (target,)))
    local = {k: _resolve_imports(v, base, seen) for k, v in data.items() if k != "$import"}
    return _deep_merge(merged, local)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """`a.b=c` → (['a','b'], yaml-parsed c)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not of the form section.field=value", where="--set")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parsed.append((dotted.strip().split("."), value))
    return parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for keys, value in parse_overrides(overrides):
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return data


def _format_errors(exc: ValidationError, path: Path, lines: dict[tuple, int], overridden: set[tuple]) -> str:
    msgs = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        named = re.match(r"field '(\w+)': (.*)", msg, re.S)
        if named:  # a section-level validator that names the field it is about
            loc, msg = (*loc, named.group(1)), named.group(2)
        line = None
        for n in range(len(loc), 0, -1):  # nearest enclosing key that the file gives
            if loc[:n] in lines:
                line = lines[loc[:n]]
                break
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        where = f"{path}:{line}" if line else str(path)
        if loc in overridden:
            where += " (from --set)"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'" + _suggest(loc)
        elif err["type"] == "missing":
            msg = "required field is missing (sections are mandatory so nothing silently falls back)"
        msgs.append(f"{where}: field '{dotted}': {msg}")
    return "\n".join(msgs)


def _suggest(loc: tuple) -> str:
    import difflib

    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return ""
        model = inner[0]
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(model.model_fields)}"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    data, lines = _read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a YAML mapping with sections metadata, model, quantize, ...",
                          where=str(path))
    data = _resolve_imports(data, path.parent, (path.resolve(),))
    overrides = overrides or []
    data = apply_overrides(data, overrides)
    overridden = {tuple(keys) for keys, _ in parse_overrides(overrides)}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, path, lines, overridden)) from None
    recipe._source = (str(path), lines)
    return recipe
