"""The interface every executor implements, and where a new backend goes.

An executor receives a :class:`~orchestrator.plan.Plan` — job arrays of (run, stage) tasks
with dependencies between arrays — and runs it somewhere.  The submitter
(:mod:`orchestrator.submit`) decides *what* to run and records it in the database; the
executor only knows *how*:

* :meth:`Executor.submit` hands every array over, calling ``on_queued(array, ids)`` right
  after each array is accepted (so a crash between two arrays loses nothing: what is marked
  queued was really handed over, what is not will be submitted again), and raises
  :class:`~orchestrator.executors.SubmissionRefused` when the backend refuses one;
* ``blocking`` executors (``local``, ``debug``) run the whole plan inside :meth:`submit`
  and return every task's final state;
* :meth:`Executor.max_array_size` bounds the arrays the plan is chunked into.

To add a backend (another scheduler, a cloud batch service): one module here with a subclass
of :class:`Executor` implementing ``submit``, and one line in
:data:`orchestrator.executors.EXECUTORS`.  A queueing backend's job states and cancellation
are read by :mod:`orchestrator.reconcile` through :mod:`orchestrator.slurm` today: a second
queueing backend adds its lookups there (docs/ARCHITECTURE.md, "Executors").
"""
from __future__ import annotations

from typing import Callable

from orchestrator.plan import ArrayPlan, Plan
from orchestrator.sweep import Sweep

# (run_hash, stage) -> job id of a stage queued by an earlier submission that this plan's
# arrays must wait for (a crash or a refused sbatch left the children unsubmitted)
External = dict[tuple[str, str], str]
OnQueued = Callable[[ArrayPlan, dict[str, str]], None]  # (array, run_hash -> job id)


class Executor:
    """One way of running a plan; see the module docstring."""

    name = "base"
    blocking = False  # True: submit() runs everything and returns final states

    def max_array_size(self) -> int:
        """Most tasks one array may hold (plans are chunked to it)."""
        return 10**9

    def submit(self, sweep: Sweep, plan: Plan, on_queued: OnQueued, external: External | None = None,
               submission: str = "") -> dict[tuple[str, str], str]:
        """Run or queue every array of ``plan``.

        Parameters
        ----------
        on_queued : called once per array, right after the backend accepted it.
        external : parents queued by earlier submissions (job ids to depend on).
        submission : id of this submission; queueing backends put it in every job's name so
            that :func:`orchestrator.reconcile.reconcile` can find jobs whose acceptance was
            never recorded.

        Returns
        -------
        ``(run_hash, stage) -> job id`` (queueing) or final state (blocking executors).
        """
        raise NotImplementedError
