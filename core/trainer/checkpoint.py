"""Crash-safe training checkpoints and the RNG state they carry.

Layout: ``run_dir/checkpoints/step_{N:08d}.pt`` plus ``latest.pt`` (a hard link to the
newest one, or a copy where links are unsupported).  Every file is written to a temp file,
fsynced and renamed, so a reader — or a resumed job after SIGKILL — sees either the old or
the new checkpoint, never half of one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.io import replace_atomic

LATEST = "latest.pt"
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


def _link_or_copy(src: Path, dst: str) -> None:
    os.unlink(dst)  # mkstemp created it
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``state`` as ``step_{step:08d}.pt``, point ``latest.pt`` at it, keep the newest ``keep_last``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    replace_atomic(lambda tmp: torch.save(state, tmp), path)
    replace_atomic(lambda tmp: _link_or_copy(path, tmp), ckpt_dir / LATEST)
    steps = sorted(p for p in ckpt_dir.iterdir() if _STEP_FILE.match(p.name))
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        old.unlink(missing_ok=True)
    return path


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest ``step_*.pt`` (complete by construction), else ``latest.pt``, else None.

    The step file is trusted over ``latest.pt`` because a kill between writing the two
    leaves ``latest.pt`` one checkpoint behind.
    """
    ckpt_dir = Path(ckpt_dir)
    steps = sorted(ckpt_dir.glob("step_*.pt")) if ckpt_dir.is_dir() else []
    steps = [p for p in steps if _STEP_FILE.match(p.name)]
    if steps:
        return steps[-1]
    path = ckpt_dir / LATEST
    return path if path.is_file() else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file; a clear error names the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only=False: checkpoints hold python/numpy RNG states (trusted, our own files).
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 — re-raised with the file name
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (when present) CUDA generator states of this process.

    ``cuda`` holds one state per visible device and ``cuda_device`` the index of the device
    this process computes on (what :func:`set_rng_state` needs when the device count changes).
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_device"] = torch.cuda.current_device()
    return state


def cuda_states_to_restore(state: dict[str, Any], visible: int, current: int) -> dict[int, torch.Tensor]:
    """``{device index: saved state}`` to restore with ``visible`` devices, computing on ``current``.

    A checkpoint written under torchrun (8 GPUs visible, rank r on ``cuda:r``) must resume under
    Slurm's binding (one GPU visible, every rank on ``cuda:0``) and back.  Rule: the state of the
    device the writer computed on (``cuda_device``) goes to the device this process computes on,
    so each rank's own generator continues exactly; every other visible index gets the saved
    state of the same index where there is one; saved states beyond ``visible`` are dropped and
    devices without a saved state keep their seeded state.  (A checkpoint without
    ``cuda_device``, from before it was recorded, is restored by index only.)
    """
    saved = list(state.get("cuda") or [])
    out = {i: saved[i] for i in range(min(len(saved), visible))}
    own = state.get("cuda_device")
    if own is not None and 0 <= own < len(saved) and 0 <= current < visible:
        out[current] = saved[own]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states (CUDA ones per :func:`cuda_states_to_restore`; no CUDA call without CUDA)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        for index, cuda_state in cuda_states_to_restore(state, torch.cuda.device_count(),
                                                        torch.cuda.current_device()).items():
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
