"""Crash-safe file writes shared by jobs (result files, checkpoints) and reading them back."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable


def replace_atomic(write: Callable[[str], None], path: str | Path) -> Path:
    """Run ``write(tmp_path)``, fsync the file, rename it onto ``path``, fsync the directory.

    Readers see either the old file or the whole new one; the directory fsync makes the
    rename itself survive a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`replace_atomic`)."""
    return replace_atomic(lambda tmp: Path(tmp).write_bytes(data), path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_complete_result(path: str | Path, stage: str, metrics: Iterable[str]) -> dict | None:
    """A stage's ``result.json`` if it exists, parses, is for ``stage`` and holds every metric
    name in ``metrics``; else None (missing, half-written by an older version, or partial)."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    names = {m.get("name") for m in result.get("metrics", [])}
    return result if result.get("stage") == stage and names >= set(metrics) else None
