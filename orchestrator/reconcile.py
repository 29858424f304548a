"""What the database says vs. what really happened: journals, refresh, cancel, wait.

A submission first writes a journal ``{runs_root}/.submissions/sub-{id}.json`` (executor, owner
pid/host/start time, every array it is about to hand over with its job name and runs; one
fsync), then marks each array queued right after the executor accepted it, and deletes the
journal when done.  :func:`reconcile` (run by every ``submit`` and ``status``) settles the
journals of submissions whose process is gone:

* Slurm: the journal's arrays are looked up by job name (one ``squeue`` + one ``sacct``);
  found -> stages still ``pending`` are marked queued with the real job ids (the crash came
  between sbatch and the database write); not found -> never submitted, the stages stay
  ``pending`` and the next ``submit`` queues exactly them;
* local/debug: the orchestrator's stage processes died with it (``PR_SET_PDEATHSIG``); its
  stages still queued/running whose stage lock nobody holds go back to ``pending``.

:func:`refresh_states` then ingests result files and reads Slurm's states with one ``sacct``
call; every final Slurm state has a meaning (:data:`orchestrator.slurm.FINAL_STATES`), a
job that ``sacct`` does not know for :data:`LOST_GRACE_S` is failed as lost, and so is one
COMPLETED that long ago without a result file: no state waits forever.  Slurm's states only
change stages that are still active (a result file ingested meanwhile is never overwritten).
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select

from core.io import write_json_atomic
from orchestrator import slurm
from orchestrator.db.models import Run, RunStage, Sweep as SweepRow
from orchestrator.db.store import Store
from orchestrator.stages import lock_holder, log_tail, queued_states

ACTIVE = ("queued", "running", "preempted")  # submitted and not over: never submit twice
JOURNALS = ".submissions"
LOST_GRACE_S = 300.0  # a job unknown to Slurm this long is lost (sacct may lag sbatch briefly)
PREEMPT_GRACE_S = 120.0  # PREEMPTED this long after its end and not requeued: final
FOREIGN_GRACE_S = 3600.0  # a journal from another host: its owner is presumed dead after this


def _proc_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot, /proc/PID/stat field 22), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Journal:
    """The intent of one submission, written before its first hand-over (see module docstring)."""

    def __init__(self, runs_root: Path, executor: str):
        self.id = uuid.uuid4().hex[:10]
        self.path = runs_root / JOURNALS / f"sub-{self.id}.json"
        self.data = {"id": self.id, "executor": executor, "host": socket.gethostname(), "pid": os.getpid(),
                     "pid_start": _proc_start(os.getpid()), "created": time.time(), "arrays": []}

    def write(self, arrays: list[dict]) -> None:
        """Record the arrays about to be handed over: ``{index, stage, name, runs}`` each."""
        self.data["arrays"] = arrays
        write_json_atomic(self.path, self.data)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def owner_alive(data: dict) -> bool:
    if data.get("host") != socket.gethostname():
        return time.time() - data.get("created", 0) < FOREIGN_GRACE_S
    return data.get("pid_start") is not None and _proc_start(int(data["pid"])) == data["pid_start"]


def reconcile(store: Store, runs_root: Path) -> list[str]:
    """Settle the journals of dead submissions under ``runs_root``; returns what was done."""
    done: list[str] = []
    for path in sorted((runs_root / JOURNALS).glob("sub-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written right now (atomic rename) or unreadable: next time
        if owner_alive(data):
            continue
        todo = data["arrays"]  # marking is idempotent: stages already queued are left alone
        if data["executor"] == "slurm" and not slurm.available():
            continue  # cannot ask Slurm from here: keep the journal for a machine that can
        if data["executor"] == "slurm":
            found = slurm.jobs_named([a["name"] for a in todo]) if todo else {}
            items = []
            for a in todo:
                if a["name"] in found:
                    from orchestrator.executors.slurm import element_ids

                    ids = element_ids(found[a["name"]], len(a["runs"]))
                    items += [(h, a["stage"], j) for h, j in zip(a["runs"], ids)]
            n = len(store.set_states(queued_states(runs_root, items), only_if=("pending",)))
            done.append(f"submission {data['id']}: {len(found)} array(s) found in Slurm by name "
                        f"({n} stages newly marked queued), {len(todo) - len(found)} never submitted")
        else:
            lost = {}
            with store.session() as s:
                q = (select(Run.run_hash, RunStage.stage, RunStage.status).join(RunStage, RunStage.run_id == Run.id)
                     .where(Run.run_hash.in_(sorted({h for a in data["arrays"] for h in a["runs"]}))))
                pairs = {(a["stage"], h) for a in data["arrays"] for h in a["runs"]}
                for h, st, status in s.execute(q):
                    if (st, h) in pairs and status in ACTIVE and lock_holder(runs_root / h, st) is None:
                        lost[(h, st)] = ("pending", f"{data['executor']} orchestrator (pid {data['pid']}) died; "
                                                    f"requeue with `orchestrate submit`")
                store.set_states({k: {"status": st, "error_tail": err} for k, (st, err) in lost.items()},
                                 only_if=ACTIVE, session=s)
            done.append(f"submission {data['id']}: orchestrator pid {data['pid']} is gone, "
                        f"{len(lost)} stage(s) back to pending")
        path.unlink(missing_ok=True)
    return done


def stored_spec(store: Store, sweep: str) -> dict | None:
    """The sweep spec stored at submission, as a plain dict (``runs_dir`` absolute)."""
    import yaml

    with store.session() as s:
        text = s.scalars(select(SweepRow.spec_yaml).where(SweepRow.name == sweep)).one_or_none()
    return yaml.safe_load(text) if text else None


def runs_root_of(store: Store, sweep: str) -> Path | None:
    """``{runs_dir}/{sweep}`` from the spec stored at submission (None: unknown sweep)."""
    spec = stored_spec(store, sweep)
    return Path(spec["runs_dir"]) / sweep if spec else None


def ingest_dir(store: Store, runs_root: Path):
    from orchestrator.ingest import ingest

    return ingest(store, [runs_root]) if runs_root.exists() else None


def _active(store: Store, sweep: str) -> list[tuple[str, str, str, str | None]]:
    """Stages of ``sweep`` with a job that is not over: its own, and the rows of other runs
    whose results its runs reuse (their state is mirrored into this sweep's rows)."""
    mine = (select(RunStage.id, RunStage.source_id).join(Run, Run.id == RunStage.run_id)
            .join(SweepRow, SweepRow.id == Run.sweep_id).where(SweepRow.name == sweep)).subquery()
    q = (select(Run.run_hash, RunStage.stage, RunStage.status, RunStage.slurm_job_id)
         .join(RunStage, RunStage.run_id == Run.id)
         .where(RunStage.status.in_(ACTIVE + ("pending",)), RunStage.slurm_job_id.is_not(None),
                RunStage.source_id.is_(None),
                RunStage.id.in_(select(mine.c.id).where(mine.c.source_id.is_(None)).union(
                    select(mine.c.source_id).where(mine.c.source_id.is_not(None))))))
    with store.session() as s:
        return [tuple(r) for r in s.execute(q)]


def _source_roots(store: Store, sweep: str, runs_root: Path | None) -> list[Path]:
    """Run directories outside ``runs_root`` holding results this sweep reuses, not final yet."""
    src = RunStage.__table__.alias("src")
    q = (select(src.c.dir).join(RunStage, RunStage.source_id == src.c.id).join(Run, Run.id == RunStage.run_id)
         .join(SweepRow, SweepRow.id == Run.sweep_id)
         .where(SweepRow.name == sweep, src.c.status.in_(ACTIVE + ("pending",)), src.c.dir.is_not(None)).distinct())
    with store.session() as s:
        roots = {Path(d).parent for d in s.scalars(q)}
    return sorted(r for r in roots if runs_root is None or runs_root not in r.parents)


def _missing_since(runs_root: Path, missing: set[str]) -> dict[str, float]:
    """First time each job id was seen unknown to Slurm (kept in the journal folder)."""
    path = runs_root / JOURNALS / "missing.json"
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = {}
    now = time.time()
    new = {j: seen.get(j, now) for j in missing}
    if new != seen:
        write_json_atomic(path, new)
    return new


def _ended_before(end: str, seconds: float) -> bool:
    try:
        return (datetime.now() - datetime.fromisoformat(end)).total_seconds() > seconds
    except ValueError:  # "Unknown" / empty: not ended
        return False


SLURM_TO_STATUS = {"PENDING": "queued", "RUNNING": "running", "COMPLETING": "running", "CONFIGURING": "running",
                   "REQUEUED": "preempted", "REQUEUE_HOLD": "preempted", "REQUEUE_FED": "preempted",
                   "SUSPENDED": "preempted", "RESIZING": "running", "SIGNALING": "running",
                   "STAGE_OUT": "running", "STOPPED": "preempted", "RESV_DEL_HOLD": "queued"}


def refresh_states(store: Store, sweep: str, runs_root: Path | None = None) -> dict[str, int]:
    """Settle journals, ingest new result files, then update active stages from one ``sacct``.

    PREEMPTED/REQUEUED count as not done (PREEMPTED becomes final when not requeued within
    :data:`PREEMPT_GRACE_S`); a job that ended without a result file (killed, cancelled, or
    never started because a parent failed) takes Slurm's final state.  Returns per-status
    stage counts of the sweep.
    """
    runs_root = runs_root or runs_root_of(store, sweep)
    if runs_root is not None:
        reconcile(store, runs_root)
        ingest_dir(store, runs_root)
    for root in _source_roots(store, sweep, runs_root):  # reused results another sweep's jobs write
        ingest_dir(store, root)
    active = _active(store, sweep)
    queried = bool(active) and slurm.available()
    states = slurm.job_states([j for *_, j in active]) if queried else {}
    changes, finals = {}, []
    for h, stage, status, jid in active:
        info = states.get(jid)
        if info is None:
            continue
        state = info["state"]
        if state in SLURM_TO_STATUS:
            # attempts come only from result files (a requeue writes a 'preempted' one)
            if SLURM_TO_STATUS[state] != status:
                changes[(h, stage)] = (SLURM_TO_STATUS[state], None)
        elif state == "PREEMPTED" and not _ended_before(info["end"], PREEMPT_GRACE_S):
            if status != "preempted":
                changes[(h, stage)] = ("preempted", None)
        elif state in slurm.FINAL_STATES and state != "COMPLETED":
            finals.append((h, stage, jid, state))
        elif state == "COMPLETED" and _ended_before(info["end"], LOST_GRACE_S):
            finals.append((h, stage, jid, "NO_RESULT"))  # exit 0, yet no result file ingested
    if queried and runs_root is not None:
        lost = {j for *_, j in active if j not in states}
        for j, t in _missing_since(runs_root, lost).items():
            if time.time() - t >= LOST_GRACE_S:
                finals += [(h, st, j, "LOST") for h, st, _, jj in active if jj == j]
    if finals and runs_root is not None:
        ingest_dir(store, runs_root)  # results written between the first ingest and sacct
        still = {(h, st) for h, st, *_ in _active(store, sweep)}
        finals = [f for f in finals if (f[0], f[1]) in still]
    for h, stage, jid, state in finals:
        if state == "LOST":
            changes[(h, stage)] = ("failed", f"slurm job {jid} lost: sacct has not known it "
                                             f"(for {LOST_GRACE_S:.0f}s)")
            continue
        if state == "NO_RESULT":
            where = runs_root / h / "results" if runs_root is not None else "its run's results/"
            changes[(h, stage)] = ("failed", f"slurm job {jid} COMPLETED {LOST_GRACE_S:.0f}s ago but no result "
                                             f"file of this attempt was ingested from {where}")
            continue
        # no result file was ingested for this attempt: the job died outside our wrapper
        tail = (log_tail(runs_root / ".submitit" / jid / f"{jid}_0_log.err", 20) if runs_root is not None else None)
        why = "preempted and not requeued" if state == "PREEMPTED" else f"slurm state {state}"
        changes[(h, stage)] = (slurm.FINAL_STATES[state], why + (f"\n{tail}" if tail else ""))
    if changes:
        # Slurm's view is older than the result files ingested since it was read (the second
        # ingest above, or another process): it may move a stage between active states or
        # end it, never overwrite an ingested end (a stale RUNNING once un-finished a stage
        # whose result had just landed, and `--wait` then waited forever on a COMPLETED job).
        store.set_states({k: {"status": st, "error_tail": err} for k, (st, err) in changes.items()},
                         only_if=ACTIVE + ("pending",))
    return stage_counts(store, sweep)


def stage_counts(store: Store, sweep: str) -> dict[str, int]:
    q = (select(RunStage.status, func.count()).join(Run, Run.id == RunStage.run_id)
         .join(SweepRow, SweepRow.id == Run.sweep_id).where(SweepRow.name == sweep).group_by(RunStage.status))
    with store.session() as s:
        return dict(s.execute(q).all())


def wait_for_sweep(store: Store, sweep: str, poll_s: float = 2.0, timeout_s: float | None = None,
                   runs_root: Path | None = None) -> dict[str, int]:
    """Refresh until no stage of ``sweep`` is queued/running/preempted; raise TimeoutError after
    ``timeout_s``.  Returns the final counts."""
    t0 = time.time()
    while True:
        counts = refresh_states(store, sweep, runs_root)
        if not any(counts.get(s) for s in ACTIVE):
            return counts
        if timeout_s is not None and time.time() - t0 > timeout_s:
            raise TimeoutError(f"sweep {sweep} still has active stages after {timeout_s:g}s: {counts}")
        time.sleep(poll_s)


def cancel_sweep(store: Store, sweep: str) -> list[str]:
    """``scancel`` every queued/running stage of ``sweep`` and mark it cancelled; returns the
    cancelled stages' job ids.  Arrays are cancelled whole (their finished elements are not
    affected).  When scancel fails (:class:`orchestrator.slurm.SlurmError`) nothing is marked.
    """
    q = (select(Run.run_hash, RunStage.stage, RunStage.slurm_job_id).join(RunStage, RunStage.run_id == Run.id)
         .join(SweepRow, SweepRow.id == Run.sweep_id).where(SweepRow.name == sweep, RunStage.status.in_(ACTIVE)))
    with store.session() as s:
        active = s.execute(q).all()
    job_ids = [j for *_, j in active if j]
    # whole arrays by their base id: scancel of single elements of a pending array splits it
    # into one controller record per element (2,000 records for a 1,000-run sweep)
    slurm.cancel(sorted({j.split("_")[0] for j in job_ids}))
    # a stage that ended between the read and scancel keeps its end
    store.set_states({(h, st): {"status": "cancelled", "error_tail": None} for h, st, _ in active}, only_if=ACTIVE)
    return job_ids
