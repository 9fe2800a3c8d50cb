"""Per-architecture data files (`<model_type>.yaml`)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from quantkit.errors import QuantkitError

_DIR = Path(__file__).parent


@cache
def arch_info(model_type: str) -> dict:
    path = _DIR / f"{model_type}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in _DIR.glob("*.yaml"))
        raise QuantkitError(
            f"architecture '{model_type}' has no quantkit architecture file",
            where="model.source",
            fix=f"use a model of a supported type ({', '.join(known)}) or add quantkit/archs/{model_type}.yaml",
        )
    return yaml.safe_load(path.read_text())
