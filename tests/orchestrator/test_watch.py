"""Live progress (orchestrator.progress, orchestrator.watch): plain lines without a terminal,
rich tables on one, steps and ETA from the run directories, Ctrl-C leaves Slurm jobs alone and
cancels local stages after asking."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from orchestrator import progress
from orchestrator.cli import main
from orchestrator.db.store import Store
from slurm_fixture import slurm_cluster  # noqa: F401  (session fixture)

ORCHESTRATE = [sys.executable, "-m", "orchestrator.cli"]
ROOT = Path(__file__).resolve().parents[2]


def write_sweep(tmp_path, executor="local", steps=6, step_s=0.4, partition=None, time_min=10):
    res = {"cpus": 1, "mem_gb": 0.25, "time_min": time_min, **({"partition": partition} if partition else {})}
    doc = {"name": "w", "base": {"data": {"image_size": 32}, "train": {"steps": steps, "ckpt_every": 2}},
           "axes": {"model.patch_size": [8, 4]},
           "stages": {"selftest": {"params": {"step_s": step_s}, "resources": res},
                      "echo": {"needs": ["selftest"], "resources": res}},
           "executor": executor, "max_parallel": 2, "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # its own process group, like a terminal's foreground job: Ctrl-C = SIGINT to the whole group.
    # SIGINT back to its default: a suite started in the background of a non-interactive shell
    # (`.ci/run &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    return subprocess.Popen([*ORCHESTRATE, *args, "--db", f"sqlite:///{tmp_path / 'r.db'}"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def ctrl_c(proc) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # the orchestrator and every stage process it forked


def read_upto(proc, needle: str) -> str:
    """Read the output character by character up to ``needle`` (a prompt ends no line)."""
    text = ""
    while needle not in text:
        ch = proc.stdout.read(1)
        assert ch, f"output ended before {needle!r}: {text[-2000:]}"
        text += ch
    return text


def wait_for(cond, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def read_until(proc, needle: str, timeout: float = 90) -> list[str]:
    lines, t0 = [], time.time()
    for line in proc.stdout:
        lines.append(line)
        if needle in line or time.time() - t0 > timeout:
            break
    return lines


def test_submit_wait_without_tty_prints_plain_progress_lines(tmp_path):
    proc = start(tmp_path, "submit", str(write_sweep(tmp_path)), "--wait")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "\x1b[" not in out  # no terminal: no escape codes, no redraws
    progress = [line for line in out.splitlines() if line[:2].isdigit() and " sweep w | " in line]
    assert any("selftest: queued 0 running 2" in line for line in progress)
    assert "selftest attempt 1: step " in out and "/6" in out  # the current step of each run in flight
    assert progress[-1].endswith("| done") and "echo: queued 0 running 0 finished 2 failed 0" in progress[-1]
    # a block (summary + runs in flight) only when something changed: the summary may repeat when
    # a run in flight goes from "starting" to its first step
    blocks, cur = [], None
    for line in out.splitlines():
        if line[:2].isdigit() and " sweep w | " in line:
            cur = [line[9:]]
            blocks.append(cur)
        elif line.startswith("  ") and cur is not None:
            cur.append(line)
    assert len(blocks) == len(progress)
    assert all(a != b for a, b in zip(blocks, blocks[1:]))
    assert len(out.splitlines()) < 40  # a log is not flooded with redraws


def fake_running_run(store, runs_root: Path, h: str, step: int, total: int, train_s: float) -> None:
    """A run whose tokenizer stage is running, as a Slurm job would leave it on disk."""
    store.upsert_run(h, "w", {"train": {"steps": total}}, {"model.patch_size": 8}, executor="slurm",
                     stages=["tokenizer", "evaluate"])
    store.set_stage_state(h, "tokenizer", "running", attempt=1, slurm_job_id="7_0")
    store.set_stage_state(h, "evaluate", "queued", attempt=1, slurm_job_id="8_0")
    (runs_root / h / "tokenizer").mkdir(parents=True)
    (runs_root / h / "config.yaml").write_text(yaml.safe_dump({"train": {"steps": total}}))
    lines = [{"step": s, "loss": 1.0 / s, "lr": 1e-3, "time": train_s * s / step} for s in range(10, step + 1, 10)]
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 99'  # torn last line: being written
    (runs_root / h / "tokenizer" / "log.jsonl").write_text(text)


def test_snapshot_steps_and_eta_from_logs_and_rich_render(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    store.upgrade()
    runs_root = tmp_path / "runs" / "w"
    fake_running_run(store, runs_root, "a" * 16, step=50, total=200, train_s=10.0)
    snap = progress.Watcher(store, "w", runs_root).snapshot()
    assert snap.counts == {"tokenizer": {"running": 1}, "evaluate": {"queued": 1}}
    running = next(f for f in snap.in_flight if f.stage == "tokenizer")
    assert (running.step, running.total) == (50, 200)
    assert running.remaining_s == pytest.approx(30.0)  # 150 steps at 5 steps/s of the log's train time
    # the queued evaluate has no finished evaluate to go by: the ETA is a lower bound
    assert snap.eta_s == pytest.approx(30.0) and snap.eta_lower_bound

    buf = io.StringIO()
    view = progress.View(Console(file=buf, force_terminal=True, width=120))
    assert view.live_mode
    view.show(snap)
    view.stop()
    out = buf.getvalue()
    assert "\x1b[" in out  # rich styling on a terminal
    for text in ("sweep w", "queued", "running", "finished", "failed", "in flight", "50/200", "ETA >= 30s"):
        assert text in out
    store.dispose()


def test_result_file_not_ingested_yet_counts_as_finished(tmp_path, write_result):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = Store(url)
    store.upgrade()
    h = "b" * 16
    store.upsert_run(h, "s1", {"model": {"patch_size": 4}}, {}, executor="local", stages=["tokenizer"])
    store.set_stage_state(h, "tokenizer", "queued", attempt=1)
    write_result(h, "tokenizer", 1)  # on disk, not in the database
    snap = progress.Watcher(store, "s1", tmp_path / "runs" / "s1").snapshot()
    assert snap.counts == {"tokenizer": {"finished": 1}} and not snap.active and snap.finished_durations == 1
    store.dispose()


def test_status_watch_on_an_ended_sweep_prints_once_and_exits(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(write_sweep(tmp_path, executor="debug", step_s=0.0)), "--db", url]) == 0
    capsys.readouterr()
    assert main(["status", "w", "--watch", "--interval", "0.1", "--db", url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].endswith("selftest: queued 0 running 0 finished 2 failed 0 | "
                                             "echo: queued 0 running 0 finished 2 failed 0 | done")


@pytest.mark.parametrize("answer", ["y", "n"])
def test_ctrl_c_on_local_submission_asks_then_cancels_or_continues(tmp_path, answer):
    proc = start(tmp_path, "submit", str(write_sweep(tmp_path, steps=12, step_s=0.5)), "--wait")
    lines = read_until(proc, "selftest attempt 1: step")
    files = lambda: list((tmp_path / "runs" / "w").glob("*/selftest/progress.txt"))  # noqa: E731
    steps = lambda: [int(p.read_text() or 0) for p in files()]  # noqa: E731
    wait_for(lambda: len(steps()) == 2 and min(steps()) >= 1, "both stage processes stepping")
    ctrl_c(proc)  # the stage processes ignore it: the orchestrator asks, its stages go on meanwhile
    prompt = read_upto(proc, "[y/N] ")
    proc.stdin.write(answer + "\n")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=90)
    out = "".join(lines) + prompt + out
    assert "Cancel the running local stages of this sweep? [y/N]" in out
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    states = {(r.run_hash, st.stage): st.status for r in store.runs(sweep="w") for st in r.stages}
    progress = sorted((tmp_path / "runs" / "w").glob("*/selftest/progress.txt"))
    if answer == "y":
        assert proc.returncode == 130, out
        assert "cancelled 4 local stage(s) of sweep w" in out
        assert set(states.values()) == {"cancelled"}
        wait_for(lambda: group_gone(proc.pid), "the stage processes are gone")  # nothing writes progress any more
        assert all(int(p.read_text()) < 12 for p in progress)
    else:
        assert proc.returncode == 0, out
        assert "continuing" in out and set(states.values()) == {"finished"}
        assert [p.read_text().strip() for p in progress] == ["12", "12"]
    store.dispose()


@pytest.mark.slurm
def test_ctrl_c_on_slurm_wait_leaves_the_jobs_alone(slurm_cluster, tmp_path):  # noqa: F811
    proc = start(tmp_path, "submit", str(write_sweep(tmp_path, "slurm", steps=10, step_s=0.5,
                                                     partition=slurm_cluster)), "--wait")
    lines = read_until(proc, "running 2")
    ctrl_c(proc)
    out, _ = proc.communicate(timeout=60)
    out = "".join(lines) + out
    assert proc.returncode == 130, out
    assert "stopped watching; the Slurm jobs of sweep w keep running" in out and "[y/N]" not in out
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["status", "w", "--watch", "--interval", "1", "--db", url]) == 0  # the jobs finish on their own
    store = Store(url)
    assert {st.status for r in store.runs(sweep="w") for st in r.stages} == {"finished"}
    store.dispose()
