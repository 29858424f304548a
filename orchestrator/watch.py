"""Watching a sweep live: ``orchestrate status --watch`` and ``submit --wait``.

The snapshots and their rendering are :mod:`orchestrator.progress`; here are the loops that
show them and the Ctrl-C policy: watching stops, Slurm jobs are left alone; a blocking
(local/debug) submission asks first, then stops its stage processes and records their stages
as cancelled.  ``submit --wait`` runs the view in a reader thread (:class:`Background`)
beside the submission, which refreshes states itself.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from orchestrator.progress import ACTIVE, View, Watcher


class Background:
    """A read-only watcher thread beside a blocking call (``submit --wait``): ``with
    Background(url, sweep): submit_sweep(...)``.  Its own Store (connection)."""

    def __init__(self, url: str, sweep: str, runs_root: str | Path | None = None, interval: float = 2.0,
                 view: View | None = None):
        self.url, self.sweep, self.runs_root, self.interval = url, sweep, runs_root, interval
        self.view = view or View()
        self.stop_event, self.paused = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="orchestrate-watch", daemon=True)

    def _run(self) -> None:
        from orchestrator.db.store import Store

        store = Store(self.url)  # reads only; not readonly=True: a PostgreSQL reader role may not exist
        try:
            watcher = Watcher(store, self.sweep, self.runs_root)
            while True:
                done = self.stop_event.is_set()  # one last snapshot after the stop
                try:
                    snap = watcher.snapshot()
                    if snap.counts and not self.paused.is_set():  # nothing before the sweep is recorded
                        self.view.show(snap)
                except Exception as e:  # a snapshot is best effort; the submission goes on
                    print(f"orchestrate: progress view: {e!r}", file=sys.stderr)
                if done:
                    break
                self.stop_event.wait(self.interval)
        finally:
            store.dispose()

    def __enter__(self) -> "Background":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        self.view.stop()


# ----------------------------------------------------------------------------- Ctrl-C, local executor


def ask_on_interrupt(background: Background | None, ask: Callable[[str], str] = input):
    """SIGINT handler for a blocking (local) submission: ask before cancelling.

    Installed in the orchestrator before it forks its stage processes, which inherit it and
    ignore the terminal's Ctrl-C (only the orchestrator decides); the orchestrator pauses the
    view and asks; "y" (or no answer: stdin closed) raises KeyboardInterrupt — the caller
    then runs :func:`cancel_local` — anything else carries on.
    """
    main_pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != main_pid:
            return  # a forked stage process
        if background is not None:
            background.paused.set()
            background.view.stop()
        try:
            answer = ask("\nCancel the running local stages of this sweep? [y/N] ")
        except (EOFError, OSError, RuntimeError):
            answer = "y"  # nobody can answer: Ctrl-C means stop
        if answer.strip().lower() in ("y", "yes"):
            raise KeyboardInterrupt
        print("continuing", flush=True)
        if background is not None:
            background.paused.clear()

    return handler


def cancel_local(store, sweep: str, runs_root: Path) -> list[tuple[str, str]]:
    """Stop this process's stage processes (SIGTERM, then SIGKILL), ingest the results they
    finished, and record every stage still active as cancelled.  Returns the cancelled
    (run, stage) pairs."""
    import multiprocessing as mp

    from orchestrator.submit import cancel_sweep, ingest_dir

    procs = mp.active_children()
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(5)
    ingest_dir(store, Path(runs_root))
    active = [(r.run_hash, st.stage) for r in store.runs(sweep=sweep) for st in r.stages if st.status in ACTIVE]
    cancel_sweep(store, sweep)
    return active


@contextmanager
def submit_progress(url: str, sweep, executor: str, wait: bool, enabled: bool = True):
    """Around a submission: a live view while it blocks (``--wait``, or the local/debug
    executors, which always do), and the Ctrl-C policy — Slurm jobs are left alone (only
    the watching stops); local stages are cancelled after asking, and recorded."""
    from orchestrator import executors

    blocking = executors.get(executor).blocking
    if not enabled or not (wait or blocking):
        yield
        return
    bg = Background(url, sweep.name, sweep.runs_root)
    previous = signal.getsignal(signal.SIGINT)
    in_main = threading.current_thread() is threading.main_thread()
    if blocking and in_main:
        signal.signal(signal.SIGINT, ask_on_interrupt(bg))
    try:
        with bg:
            yield
        _record_cost(url, sweep.name)
    except KeyboardInterrupt:
        if blocking:
            from orchestrator.db.store import Store

            store = Store(url)
            try:
                cancelled = cancel_local(store, sweep.name, sweep.runs_root)
            finally:
                store.dispose()
            print(f"orchestrate: cancelled {len(cancelled)} local stage(s) of sweep {sweep.name} "
                  f"(recorded as cancelled; `orchestrate retry` reruns them)", file=sys.stderr)
        else:
            print(f"orchestrate: stopped watching; the Slurm jobs of sweep {sweep.name} keep running "
                  f"(`orchestrate status {sweep.name} --watch`, `orchestrate cancel {sweep.name}`)", file=sys.stderr)
        raise
    finally:
        if blocking and in_main:
            signal.signal(signal.SIGINT, previous)


def _record_cost(url: str, sweep: str) -> None:
    from orchestrator.cost import record_actual
    from orchestrator.db.store import Store

    store = Store(url)
    try:
        record_actual(store, sweep)
    except Exception as e:  # measured cost is a bonus; never fail a finished submission on it
        print(f"orchestrate: recording measured cost failed: {e!r}", file=sys.stderr)
    finally:
        store.dispose()


def watch_status(store, sweep: str | None, names: list[str], refresh: Callable | None, interval: float,
                 console=None) -> int:
    """``orchestrate status --watch``: refresh + live view until nothing is active.  Ctrl-C
    stops watching and leaves every job alone.  Exit 1 when a stage failed."""
    from orchestrator.errors import UsageError
    from orchestrator.cost import record_actual

    if sweep is None:
        if len(names) != 1:
            raise UsageError(f"--watch needs a SWEEP when the database holds {len(names)} sweeps (known: {names})")
        sweep = names[0]

    view, watcher = View(console), Watcher(store, sweep)
    try:
        while True:
            if refresh is not None:
                refresh(store, sweep)
                record_actual(store, sweep)
            snap = watcher.snapshot()
            view.show(snap)
            if not snap.active:
                if refresh is not None:  # results seen on disk since the last refresh: into the database
                    refresh(store, sweep)
                    record_actual(store, sweep)
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        print(f"stopped watching sweep {sweep}; its jobs keep running", file=sys.stderr)
        return 130
    finally:
        view.stop()
        store.dispose()
    return 1 if any(c.get("failed") for c in snap.counts.values()) else 0
