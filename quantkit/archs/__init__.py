"""Per-family knowledge as data: one `quantkit/archs/<family>.yaml` per decoder family, looked up by the HF
`config.model_type`.

What needs no family knowledge (the baseline, quantize, the HF unified export, evaluate, compare) works for any
causal LM transformers loads: a model type without a file gets `GENERIC`. A family file only adds what does need
it: the TensorRT-LLM decoder type (ModelOpt's `export_tensorrt_llm_checkpoint(decoder_type=...)`), layers kept in
high precision by default (MoE routers), the layer groups the runtime fuses, the MoE router to count expert tokens
at, and whether quantkit's runtime can load the family's HF checkpoint.

Every field is read by code (see `Family`), and every file is validated on load with an error naming the file
and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import QuantkitError

_DIR = Path(__file__).parent


@dataclass(frozen=True)
class FusedGroup:
    """Linears under one parent module that read the same input and run as one GEMM in the runtime
    (TensorRT-LLM fuses the same groups: `qkv`, `gate`+`fc`). `down`/`act` make it a gated MLP:
    down(act(gate(x)) * up(x))."""

    parent: str                 # module name suffix, e.g. "self_attn" or "mlp"
    parts: tuple[str, ...]      # attributes of the parent, in output order
    fused: str                  # attribute name the fused linear gets
    down: str | None = None
    act: str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    trtllm_decoder_type: str | None   # None: no TensorRT-LLM export, `trtllm_unsupported` says why
    trtllm_unsupported: str | None
    default_exclude: tuple[str, ...]  # patterns merged into quantize.exclude (quantkit.quantize)
    fused_groups: tuple[FusedGroup, ...] = ()
    moe_router: str | None = None     # module name suffix of the MoE router (quantkit.moe counts its picks)
    runtime_unsupported: str | None = None  # why quantkit.runtime cannot load this family's HF checkpoint
    unsupported_methods: tuple[str, ...] = ()  # quantize.method values that cannot run or export (preflight)
    methods_unsupported_reason: str | None = None
    source: str = ""                  # the file it came from, for messages

    @property
    def is_generic(self) -> bool:
        return not self.model_types


GENERIC = Family(
    name="generic", model_types=(), trtllm_decoder_type=None,
    trtllm_unsupported="quantkit has no family file for it, so it does not know ModelOpt's TensorRT-LLM decoder "
                       "type (add quantkit/archs/<family>.yaml)",
    default_exclude=("lm_head",),
    runtime_unsupported="quantkit's runtime needs a family file for it (quantkit/archs/<family>.yaml) naming the "
                        "layers it fuses",
    source="(built in)",
)

_FIELDS = {"model_types", "trtllm_decoder_type", "trtllm_unsupported", "default_exclude", "fused_groups",
           "moe_router", "runtime_unsupported", "unsupported_methods", "methods_unsupported_reason"}
_GROUP_FIELDS = {"parent", "parts", "fused", "down", "act"}


def _bad(path: Path, fld: str, what: str) -> QuantkitError:
    return QuantkitError(f"family file {path.name}: field '{fld}' {what}", where=f"quantkit/archs/{path.name}",
                         fix="fix the file (the schema is quantkit.archs.Family)")


def _str_list(path: Path, fld: str, value: Any, *, empty_ok: bool = True) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or (not value and not empty_ok):
        raise _bad(path, fld, f"must be a {'non-empty ' if not empty_ok else ''}list of names, got {value!r}")
    return tuple(value)


def _opt_str(path: Path, fld: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise _bad(path, fld, f"must be a non-empty string or null, got {value!r}")
    return value


def load_family_file(path: Path) -> Family:
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise _bad(path, "(top level)", "must be a mapping")
    unknown = set(data) - _FIELDS
    if unknown:
        raise _bad(path, sorted(unknown)[0], f"is unknown (fields: {', '.join(sorted(_FIELDS))})")
    for required in ("model_types", "trtllm_decoder_type", "default_exclude"):
        if required not in data:
            raise _bad(path, required, "is missing")
    decoder = _opt_str(path, "trtllm_decoder_type", data["trtllm_decoder_type"])
    reason = _opt_str(path, "trtllm_unsupported", data.get("trtllm_unsupported"))
    if (decoder is None) == (reason is None):
        raise _bad(path, "trtllm_unsupported", "must give the reason exactly when trtllm_decoder_type is null")
    groups = []
    for i, g in enumerate(data.get("fused_groups") or []):
        fld = f"fused_groups[{i}]"
        if not isinstance(g, dict) or set(g) - _GROUP_FIELDS or not {"parent", "parts", "fused"} <= set(g):
            raise _bad(path, fld, f"needs parent, parts, fused (and optionally down, act), got {g!r}")
        parts = _str_list(path, f"{fld}.parts", g["parts"], empty_ok=False)
        if len(parts) < 2:
            raise _bad(path, f"{fld}.parts", "needs at least two layers to fuse")
        down, act = _opt_str(path, f"{fld}.down", g.get("down")), _opt_str(path, f"{fld}.act", g.get("act"))
        if (down is None) != (act is None) or (down is not None and len(parts) != 2):
            raise _bad(path, fld, "a gated MLP group has exactly two parts (gate, up) and both down and act")
        groups.append(FusedGroup(_opt_str(path, f"{fld}.parent", g["parent"]) or "", parts,
                                 _opt_str(path, f"{fld}.fused", g["fused"]) or "", down, act))
    methods = _str_list(path, "unsupported_methods", data.get("unsupported_methods") or [])
    why = _opt_str(path, "methods_unsupported_reason", data.get("methods_unsupported_reason"))
    if bool(methods) != (why is not None):
        raise _bad(path, "methods_unsupported_reason", "must give the reason exactly when unsupported_methods is set")
    from quantkit.methods import METHODS

    if set(methods) - set(METHODS):
        raise _bad(path, "unsupported_methods", f"names unknown methods {sorted(set(methods) - set(METHODS))}")
    return Family(
        name=path.stem,
        model_types=_str_list(path, "model_types", data["model_types"], empty_ok=False),
        trtllm_decoder_type=decoder, trtllm_unsupported=reason,
        default_exclude=_str_list(path, "default_exclude", data["default_exclude"]),
        fused_groups=tuple(groups),
        moe_router=_opt_str(path, "moe_router", data.get("moe_router")),
        runtime_unsupported=_opt_str(path, "runtime_unsupported", data.get("runtime_unsupported")),
        unsupported_methods=methods,
        methods_unsupported_reason=why,
        source=f"quantkit/archs/{path.name}",
    )


@cache
def families() -> dict[str, Family]:
    """model_type -> Family, over every file in quantkit/archs/."""
    out: dict[str, Family] = {}
    for path in sorted(_DIR.glob("*.yaml")):
        fam = load_family_file(path)
        for mt in fam.model_types:
            if mt in out:
                raise _bad(path, "model_types", f"lists '{mt}', which {out[mt].source} covers already")
            out[mt] = fam
    return out


def family(model_type: str) -> Family:
    """The family file covering `model_type`, or GENERIC (what works without family knowledge)."""
    return families().get(model_type, GENERIC)


def default_exclude(model_type: str, exclude: list[str]) -> list[str]:
    """A recipe's exclusions plus the family's defaults (the recipe's come first; no duplicates)."""
    return list(exclude) + [p for p in family(model_type).default_exclude if p not in exclude]


def trtllm_decoder_type(model_type: str) -> str:
    """ModelOpt's TensorRT-LLM decoder type for the model type, or the error preflight gives before a run."""
    fam = family(model_type)
    if fam.trtllm_decoder_type is None:
        raise QuantkitError(
            f"model type '{model_type}' has no TensorRT-LLM checkpoint export: {fam.trtllm_unsupported}",
            where="export.trtllm",
            fix="set export.trtllm: null; quantize, the HF unified export (export.hf: true, which TensorRT-LLM's "
                "PyTorch backend and vLLM load), evaluate and compare still work")
    return fam.trtllm_decoder_type


def check_method(model_type: str, method: str) -> None:
    """Preflight: a method the family file says cannot run or export for this family fails before any work."""
    fam = family(model_type)
    if method in fam.unsupported_methods:
        from quantkit.methods import METHODS

        ok = ", ".join(m for m in METHODS if m not in fam.unsupported_methods)
        raise QuantkitError(f"method '{method}' does not work for model type '{model_type}' "
                            f"({fam.methods_unsupported_reason})", where="quantize.method",
                            fix=f"use one of: {ok}")
