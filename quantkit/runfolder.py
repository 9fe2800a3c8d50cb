"""The run folder: the contract between stages.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a
half-written file. `manifest.json` records one entry per finished stage: its fingerprint (a hash
of the inputs that determine its outputs), wall time, peak memory and tool versions; a stage
whose fingerprint is unchanged is skipped on rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary sibling and rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # mkstemp makes 0600; run folders and reports are handed to other people
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode(), mode)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tool_versions() -> dict[str, str]:
    out = {}
    for dist in ("quantkit", "torch", "transformers", "nvidia-modelopt", "lm_eval", "tensorrt_llm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path` (0 if it is not a folder): checkpoint and run-folder sizes."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete what a killed process left half-written; return what went. Every temporary name quantkit uses
    in a run folder starts with '.' (atomic writes, staging folders) and no finished file does."""
    import shutil

    if not run_dir.is_dir():
        return []
    leftovers = sorted(run_dir.rglob(".*"), key=lambda p: len(p.parts), reverse=True)
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return leftovers


def read_recipe(run_dir: Path) -> dict:
    """The resolved recipe a run folder was made with (plain data: a later quantkit may have changed the schema)."""
    import yaml

    from quantkit.errors import QuantkitError

    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise QuantkitError(f"'{run_dir}' has no recipe.yaml, so it is not a run folder", where=str(run_dir),
                            fix="give the folder that `quantkit run` created")
    return yaml.safe_load(path.read_text())


@dataclass
class RunFolder:
    path: Path
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        manifest = path / MANIFEST
        entries = read_json(manifest)["stages"] if manifest.is_file() else {}
        return cls(path, entries)

    def done(self, stage: str, fp: str) -> bool:
        entry = self.entries.get(stage)
        return bool(entry and entry.get("fingerprint") == fp and entry.get("status") == "done")

    def record(self, stage: str, fp: str, wall_s: float, **extra: Any) -> None:
        self.entries[stage] = {
            "status": "done", "fingerprint": fp, "wall_s": round(wall_s, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": tool_versions(), **extra,
        }
        atomic_write_json(self.path / MANIFEST, {"run": self.path.name, "stages": self.entries})

    def invalidate(self, stage: str) -> None:
        if self.entries.pop(stage, None) is not None:
            atomic_write_json(self.path / MANIFEST, {"run": self.path.name, "stages": self.entries})

    @contextmanager
    def stage(self, name: str, fp: str, log, **extra: Any):
        """Time a stage, log one line with its wall time, and record it when it succeeds."""
        start = time.perf_counter()
        log.info("[%s] started", name)
        info: dict[str, Any] = dict(extra)
        yield info
        wall = time.perf_counter() - start
        self.record(name, fp, wall, **info)
        log.info("[%s] done in %.1f s", name, wall)


def check_free_space(path: Path, need_bytes: int, stage: str) -> None:
    """Fail before writing when the file system holding `path` has less room than the stage will write."""
    import shutil

    from quantkit.errors import disk_full

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the folder may not exist yet: ask the file system it will be on
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise disk_full(stage, str(path), need_bytes, free)
