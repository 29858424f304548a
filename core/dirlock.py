"""One process per directory: an exclusive ``flock`` on ``DIR/.lock`` that names its holder.

The orchestrator's stage lock (``orchestrator.stages.acquire_stage_lock`` on ``{run}/{stage}``)
and core's run-directory lock (``core.trainer.launch.lock_run_dir``, taken by rank 0 of a
launch) are this lock on the same directory, so each refuses while the other holds it.  The
lock lives as long as its file descriptor (the process): a killed holder releases it, nothing
is left to clean up.  The file holds one line, ``pid P on HOST since T [(slurm job J)]``.

Stdlib only: the orchestrator imports it without torch.
"""
from __future__ import annotations

import fcntl
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"


class DirLocked(RuntimeError):
    """Another process holds the directory; ``holder`` is its line (empty when the error is
    re-raised from its message alone, e.g. on the ranks that rank 0 told)."""

    def __init__(self, message: str, holder: str = ""):
        super().__init__(message)
        self.holder = holder


def holder_line() -> str:
    """This process, as a lock file names it."""
    me = f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
    job = os.environ.get("SLURM_JOB_ID")
    return me + (f" (slurm job {job})" if job else "")


def held_by_me(holder: str | None) -> bool:
    return bool(holder) and holder.startswith(f"pid {os.getpid()} on {socket.gethostname()} ")


def acquire(directory: str | Path) -> int:
    """Take ``directory/.lock`` exclusively without waiting; returns the fd that holds it.

    Raises :class:`DirLocked` naming the holder when another open file description holds it
    (another process, or this process through another fd: see :func:`held_by_me`)."""
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DirLocked(f"{directory} is locked by {holder}: not starting a second process on it", holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder_line() + "\n").encode(), 0)
    return fd


def holder(directory: str | Path) -> str | None:
    """Who holds ``directory``'s lock now (None: nobody; probed by taking and dropping it shared)."""
    path = Path(directory) / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)
