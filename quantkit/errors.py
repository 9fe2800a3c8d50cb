"""User-facing errors: one paragraph that says what is wrong, where, and how to fix it.

The CLI prints these without a stack trace and exits with code 2; anything else is a bug.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class QuantkitError(Exception):
    """An error caused by the user's input (recipe, paths, data), not by quantkit."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}:")
        parts.append(self.message.rstrip("."))
        text = " ".join(parts) + "."
        if self.fix:
            text += f" Fix: {self.fix.rstrip('.')}."
        return text


class RecipeError(QuantkitError):
    """A recipe that does not parse or does not validate."""


class ModelSourceError(QuantkitError):
    """A model that cannot be found or loaded."""


class CalibrationDataError(QuantkitError):
    """Calibration data that cannot be found, read, or is too small."""


class MissingDependencyError(QuantkitError):
    """An optional runtime (TensorRT-LLM, a GPU) that this machine does not have."""


class ResourceError(QuantkitError):
    """Out of disk space or memory: the stage, what it needed, and the fix."""


# How a full disk surfaces: OSError(ENOSPC/EDQUOT) from Python, RuntimeErrors from torch's C++ writers
# (torch.save: "basic_ios::clear: iostream error", "PytorchStreamWriter failed writing file"), and safetensors'
# SafetensorError ("No space left on device (os error 28)").
_DISK_FULL_TEXT = ("no space left", "iostream error", "failed writing file", "file write failed", "disk quota")
_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def is_disk_full(exc: BaseException) -> bool:
    import errno

    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):  # safetensors' SafetensorError is neither class
            return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    return any(isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(t in str(e).lower()
               for t in _OOM_TEXT)) for e in _chain(exc))  # torch.cuda.OutOfMemoryError is a RuntimeError


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def disk_full(stage: str, where: str, need_bytes: int | None = None, free_bytes: int | None = None) -> ResourceError:
    """A full disk: found before writing (free_bytes known) or while writing."""
    if free_bytes is not None:
        msg = (f"'{where}' has {_gib(free_bytes)} free but the {stage} stage will write about {_gib(need_bytes or 0)}"
               "; nothing was written")
    else:
        need = f" (it writes about {_gib(need_bytes)})" if need_bytes else ""
        msg = f"the {stage} stage ran out of disk space writing to '{where}'{need}; its partial files were removed"
    return ResourceError(msg, where=stage, fix="free space there, or set output_dir to a file system with more room")


def out_of_memory(stage: str, what: str, exc: BaseException, fix: str) -> ResourceError:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return ResourceError(f"the {stage} stage ran out of memory {what} ({first})", where=stage, fix=fix)


OOM_FIX = {
    "load": "set model.device_map: auto with model.max_memory below the free memory, so accelerate offloads the rest "
            "to the CPU and disk",
    "quantize": "lower calibration.batch_size (or set it to auto), or set model.device_map: auto with model.max_memory "
                "below the GPU's size so accelerate offloads part of the model",
    "export": "set model.device_map: auto with a lower model.max_memory so fewer weights stay on the GPU, or export "
              "one format at a time (export.trtllm: null, then export.hf: false)",
    "evaluate": "lower evaluate.batch_size",
}


@contextlib.contextmanager
def resource_errors(stage: str, where: Path | str, need_bytes: int | None = None) -> Iterator[None]:
    """Turn a full disk or an out-of-memory inside `stage` into one ResourceError paragraph (exit 2). Callers write
    through atomic writes and staging folders, so what was half-written is already gone when this raises."""
    try:
        yield
    except ResourceError:
        raise  # already one paragraph (quantize names its batch)
    except Exception as exc:  # re-raised below unless it is a full disk or an out-of-memory
        # QuantkitErrors that wrap one (the TensorRT-LLM export wraps every exception) are judged by their cause.
        cause = exc.__cause__ if isinstance(exc, QuantkitError) else exc
        if cause is not None and is_disk_full(cause):
            raise disk_full(stage, str(where), need_bytes) from cause
        if cause is not None and is_out_of_memory(cause):
            what = {"evaluate": "evaluating", "load": "loading the model"}.get(stage, f"writing '{where}'")
            raise out_of_memory(stage, what, cause, OOM_FIX.get(stage, "free memory on the device")) from cause
        raise
