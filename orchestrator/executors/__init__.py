"""Executors: how a plan runs (Slurm arrays, local processes, in-process debug).

A backend is one module in this package (a subclass of
:class:`orchestrator.executors.base.Executor`, whose docstring says what to implement) and
one line in :data:`EXECUTORS`.  The registry names classes as strings: sweep validation reads
the names without importing any backend (submitit, the stage code).
"""
from __future__ import annotations

import importlib

EXECUTORS: dict[str, str] = {  # name (sweep key `executor`, --executor) -> "module:class"
    "slurm": "orchestrator.executors.slurm:SlurmExecutor",
    "local": "orchestrator.executors.local:LocalExecutor",
    "debug": "orchestrator.executors.debug:DebugExecutor",
}


class SubmissionRefused(RuntimeError):
    """The backend refused an array (bad partition, gres, account, QOS, time limit ...).

    ``stage`` and ``option`` name what the user must change in the sweep file; the message
    is one line.  Arrays handed over before it stay queued.  ``option`` None: the scheduler
    was only busy (``transient``); the same submission can simply be repeated.
    """

    def __init__(self, stage: str, option: str | None, detail: str):
        self.stage, self.option, self.detail = stage, option, detail
        self.transient = option is None
        super().__init__(f"stage '{stage}': the scheduler is temporarily unable to accept jobs: {detail}"
                         if self.transient else
                         f"stage '{stage}': the scheduler refused resources option '{option}': {detail}")


def get(name: str):
    """A fresh instance of the executor registered as ``name`` (an ``Executor``)."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r} ({', '.join(EXECUTORS)})")
    module, cls = EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
