"""Progress of a sweep: snapshots of its stages and how to show them (used by
:mod:`orchestrator.watch` — ``status --watch``, ``submit --wait`` — and by the HTML report).

A :class:`Watcher` takes snapshots — per-stage counts (queued / running / finished /
failed / cancelled), the stages in flight with their current step, an ETA — and renders
them with rich (:class:`rich.live.Live`) on a terminal, or as plain lines (one per change)
when stdout is not a terminal (logs, CI, pipes).

A snapshot reads the database (stage states) and, for the stages the database still has
active, the run directories: a result file not ingested yet decides the state (the
local executor ingests only at the end), the tail of ``{stage}/log.jsonl`` (or the
selftest's ``progress.txt``) gives the step, and ``config.yaml`` the total steps.  It
never writes: refreshing (ingest, sacct) is the caller's job, so a watcher thread can run
beside ``submit --wait``.

ETA: a running stage's remaining steps at its observed rate (the log's own train time
when it has one, else the rate seen between snapshots); a queued stage costs the mean
duration of the sweep's finished stages of that kind; the remaining work is spread over
the stages running now.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

ACTIVE = ("queued", "running", "preempted")
SHOWN = ("queued", "running", "finished", "failed", "cancelled")
TOTAL_STEPS = {"tokenizer": ("train", "steps"), "selftest": ("train", "steps"), "generator": ("generator", "steps"),
               "finetune": ("finetune", "steps")}


@dataclass
class InFlight:
    run_hash: str
    stage: str
    status: str
    attempt: int | None
    step: int | None = None
    total: int | None = None
    remaining_s: float | None = None


@dataclass
class Snapshot:
    sweep: str
    counts: dict[str, dict[str, int]]  # stage -> status -> n
    in_flight: list[InFlight]
    eta_s: float | None
    finished_durations: int  # finished stages the ETA is based on
    eta_lower_bound: bool = False  # some active stage had nothing to estimate it by
    taken_at: float = field(default_factory=time.time)

    @property
    def active(self) -> int:
        return sum(n for c in self.counts.values() for s, n in c.items() if s in ACTIVE)


def _utc(t: datetime | None) -> datetime | None:
    return t if t is None or t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite: naive UTC


def tail_step(path: Path) -> tuple[int | None, float | None]:
    """(step, train seconds) of the last complete line of a ``log.jsonl`` (None, None if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None, None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # torn last line (being written)
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            t = rec.get("time", rec.get("train_time_s"))
            return rec["step"], float(t) if isinstance(t, (int, float)) else None
    return None, None


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Watcher:
    """Snapshots of one sweep; keeps what it learnt between snapshots (totals, rates)."""

    def __init__(self, store, sweep: str, runs_root: str | Path | None = None):
        self.store, self.sweep = store, sweep
        self.runs_root = Path(runs_root) if runs_root else self._runs_root()
        self._totals: dict[tuple[str, str], int | None] = {}
        self._first: dict[tuple[str, str, int | None], tuple[float, int]] = {}  # first (time, step) seen

    def _runs_root(self) -> Path | None:
        from orchestrator.submit import stored_sweep

        spec = stored_sweep(self.store, self.sweep)
        return Path(spec.runs_dir) / self.sweep if spec is not None else None

    def _total(self, h: str, stage: str) -> int | None:
        if (h, stage) not in self._totals:
            total = None
            try:
                tree = yaml.safe_load((self.runs_root / h / "config.yaml").read_text())
                section, key = TOTAL_STEPS[stage]
                total = tree[section][key] or (tree["train"]["steps"] if stage == "finetune" else None)
            except (OSError, KeyError, TypeError, AttributeError, yaml.YAMLError):
                pass
            self._totals[(h, stage)] = total
        return self._totals[(h, stage)]

    def _on_disk(self, h: str, stage: str, attempt: int | None) -> dict | None:
        """The newest result file of (run, stage) at or after ``attempt``, not ingested yet."""
        best = None
        for p in (self.runs_root / h / "results").glob(f"{stage}.attempt*.json"):
            try:
                n = int(p.name.rsplit("attempt", 1)[1].split(".")[0])
            except ValueError:
                continue
            if (attempt is None or n >= attempt) and (best is None or n > best[0]):
                best = (n, p)
        if best is None:
            return None
        try:
            return json.loads(best[1].read_text())
        except (OSError, ValueError):
            return None  # being written: next snapshot

    def snapshot(self) -> Snapshot:
        now = time.time()
        counts: dict[str, dict[str, int]] = {}
        durations: dict[str, list[float]] = {}
        flying: list[InFlight] = []
        for run in self.store.runs(sweep=self.sweep):
            for st in sorted(run.stages, key=lambda x: x.id):
                if st.source_id is not None:
                    continue  # a stage reused from another run: counted once, where it runs
                status, started, ended = st.status, _utc(st.started_at), _utc(st.ended_at)
                if status in ACTIVE and self.runs_root is not None:
                    res = self._on_disk(run.run_hash, st.stage, st.attempt)
                    if res is not None and res.get("status") in ("finished", "failed"):
                        status = res["status"]
                        started, ended = (datetime.fromisoformat(res[k]) for k in ("started_at", "ended_at"))
                    elif status == "queued" and self._started(run.run_hash, st.stage, st.attempt):
                        status = "running"
                counts.setdefault(st.stage, {}).setdefault(status, 0)
                counts[st.stage][status] += 1
                if status == "finished" and started and ended:
                    durations.setdefault(st.stage, []).append((_utc(ended) - _utc(started)).total_seconds())
                if status in ACTIVE:
                    flying.append(self._progress(InFlight(run.run_hash, st.stage, status, st.attempt), now))
        mean = {s: sum(d) / len(d) for s, d in durations.items()}
        eta, lower = self._eta(flying, mean)
        return Snapshot(self.sweep, counts, flying, eta, sum(len(d) for d in durations.values()), lower, now)

    def _started(self, h: str, stage: str, attempt: int | None) -> bool:
        """A queued stage whose process has begun: the local executor's attempt log, or output
        in the stage directory of a first attempt."""
        root = self.runs_root / h
        if (root / "logs" / f"{stage}.attempt{attempt or 1}.log").exists():
            return True
        return (attempt or 1) == 1 and any((root / stage / f).exists() for f in ("log.jsonl", "progress.txt"))

    def _progress(self, f: InFlight, now: float) -> InFlight:
        if f.status != "running" or self.runs_root is None:
            return f
        out = self.runs_root / f.run_hash / f.stage
        step, train_s = tail_step(out / "log.jsonl")
        if step is None:
            try:
                step = int((out / "progress.txt").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                step = None
        f.step, f.total = step, self._total(f.run_hash, f.stage)
        if step is None or not f.total:
            return f
        key = (f.run_hash, f.stage, f.attempt)
        t0, s0 = self._first.setdefault(key, (now, step))
        if train_s and step > 0:
            rate = step / train_s  # the log's own clock: right from the first line
        elif step > s0 and now > t0:
            rate = (step - s0) / (now - t0)
        else:
            return f
        f.remaining_s = max(f.total - step, 0) / rate
        return f

    @staticmethod
    def _eta(flying: list[InFlight], mean: dict[str, float]) -> tuple[float | None, bool]:
        """(seconds, lower_bound): lower_bound when some stage has nothing to go by yet
        (no finished stage of its kind, no observed rate) and counts as 0."""
        if not flying:
            return 0.0, False
        full = dict(mean)  # a kind with no finished stage: a running one's projected duration
        for f in flying:
            if f.remaining_s is not None and f.step and f.total and f.stage not in mean:
                full[f.stage] = max(full.get(f.stage, 0.0), f.remaining_s * f.total / max(f.total - f.step, 1))
        running = [f for f in flying if f.status == "running"]
        work, longest, unknown = 0.0, 0.0, False
        for f in flying:
            rem = f.remaining_s if f.remaining_s is not None else full.get(f.stage)
            if rem is None:
                unknown = True
                continue
            if f.status == "running":
                longest = max(longest, rem)
            work += rem
        if unknown and work == 0:
            return None, True
        return max(longest, work / max(1, len(running))), unknown


# ----------------------------------------------------------------------------- rendering


def eta_text(snap: Snapshot) -> str:
    if snap.eta_s is None:
        return "unknown (no stage finished or progressed yet)"
    return (">= " if snap.eta_lower_bound else "") + fmt_duration(snap.eta_s)


def summary_line(snap: Snapshot) -> str:
    parts = []
    for stage, c in snap.counts.items():
        parts.append(f"{stage}: " + " ".join(f"{s} {c.get(s, 0)}" for s in SHOWN if c.get(s) or s != "cancelled"))
    eta = "done" if not snap.active else f"ETA {eta_text(snap)}"
    return f"sweep {snap.sweep} | " + " | ".join(parts) + f" | {eta}"


def plain_lines(snap: Snapshot, limit: int = 20) -> list[str]:
    lines = [summary_line(snap)]
    for f in [f for f in snap.in_flight if f.status == "running"][:limit]:
        step = f"step {f.step}/{f.total or '?'}" if f.step is not None else "starting"
        lines.append(f"  {f.run_hash} {f.stage} attempt {f.attempt or 1}: {step}")
    return lines


def render(snap: Snapshot, limit: int = 20):
    """A rich renderable: counts table, in-flight table, ETA line."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    counts = Table(title=f"sweep {snap.sweep}", title_justify="left")
    counts.add_column("stage")
    colours = {"queued": "cyan", "running": "yellow", "finished": "green", "failed": "red", "cancelled": "magenta"}
    for s in SHOWN:
        counts.add_column(s, justify="right", style=colours[s])
    for stage, c in snap.counts.items():
        counts.add_row(stage, *(str(c.get(s, 0)) for s in SHOWN))
    flying = Table(title="in flight", title_justify="left")
    for col in ("run", "stage", "status", "step", "remaining"):
        flying.add_column(col)
    for f in snap.in_flight[:limit]:
        step = f"{f.step}/{f.total or '?'}" if f.step is not None else ""
        flying.add_row(f.run_hash, f.stage, f.status, step, fmt_duration(f.remaining_s) if f.remaining_s else "")
    more = len(snap.in_flight) - limit
    eta = ("all stages over" if not snap.active else
           f"ETA {eta_text(snap)} (from {snap.finished_durations} finished stage(s) and the running steps)")
    parts = [counts] + ([flying] if snap.in_flight else []) + ([Text(f"... {more} more in flight")] if more > 0 else [])
    return Group(*parts, Text(eta, style="bold"))


class View:
    """Shows snapshots: rich Live on a terminal, changed lines otherwise."""

    def __init__(self, console=None, live: bool | None = None, steps_every_s: float = 30.0):
        from rich.console import Console

        self.console = console or Console()
        self.live_mode = self.console.is_terminal if live is None else live
        self._live = None
        self._last: list[str] = []
        self._printed, self.steps_every_s, self._counts = 0.0, steps_every_s, None
        self.lock = threading.Lock()

    def show(self, snap: Snapshot) -> None:
        with self.lock:
            if self.live_mode:
                from rich.live import Live

                if self._live is None:
                    self._live = Live(render(snap), console=self.console, auto_refresh=False, transient=False)
                    self._live.start()
                self._live.update(render(snap), refresh=True)
                return
            # a log gets a line when a count changes; step-only changes at most every steps_every_s
            lines, now = plain_lines(snap), time.monotonic()
            shape = (snap.counts, [(f.run_hash, f.stage, f.step is None) for f in snap.in_flight])
            if lines != self._last and (shape != self._counts or now - self._printed >= self.steps_every_s):
                stamp = time.strftime("%H:%M:%S")
                for line in lines:
                    print(f"{stamp} {line}" if not line.startswith(" ") else line, file=self.console.file, flush=True)
                self._last, self._printed, self._counts = lines, now, shape

    def stop(self) -> None:
        with self.lock:
            if self._live is not None:
                self._live.stop()
                self._live = None
