"""Executors: how a plan runs (Slurm arrays, local processes, in-process debug).

``get(name)`` returns a fresh executor; :mod:`orchestrator.executors.base` documents the
interface a new backend implements.
"""
from __future__ import annotations

from orchestrator.executors.base import Executor, SubmissionRefused  # noqa: F401


def get(name: str) -> Executor:
    """The executor called ``name`` (``slurm``, ``local`` or ``debug``)."""
    if name == "slurm":
        from orchestrator.executors.slurm import SlurmExecutor
        return SlurmExecutor()
    if name == "local":
        from orchestrator.executors.local import LocalExecutor
        return LocalExecutor()
    if name == "debug":
        from orchestrator.executors.debug import DebugExecutor
        return DebugExecutor()
    raise ValueError(f"unknown executor {name!r} (slurm, local, debug)")
