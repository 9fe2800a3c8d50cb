"""User-facing errors: one paragraph that says what is wrong, where, and how to fix it.

The CLI prints these without a stack trace and exits with code 2; anything else is a bug.
"""

from __future__ import annotations


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
