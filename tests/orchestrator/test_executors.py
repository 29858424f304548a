"""Executors on failure paths, for real: two starts of one stage, a SIGKILLed local
orchestrator, a run shared by two sweeps, lost Slurm jobs, scancel failing, --wait --timeout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from core.config import config_dict
from orchestrator.db.store import Store
from orchestrator.executors.base import Executor
from orchestrator.submit import open_store
from orchestrator.sweep import load_sweep
from selftest_reference import reference_checksum
from slurm_fixture import slurm_cluster  # noqa: F401  (session fixture)


def selftest_sweep(tmp_path, name="ex", executor="local", steps=30, step_s=0.2, **extra):
    doc = {"name": name, "base": {"data": {"image_size": 32}, "train": {"steps": steps, "ckpt_every": 3}},
           "stages": {"selftest": {"needs": [], "params": {"step_s": step_s}}}, "executor": executor,
           "runs_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli(*argv, **kw):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout, what):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, what
        time.sleep(0.1)


def progress(root) -> int:
    try:
        return int((root / "selftest" / "progress.txt").read_text() or 0)
    except (OSError, ValueError):
        return 0


class InlineExecutor(Executor):  # a new backend in full: this class and one registry line
    """Runs every task in this process, in stage order (what a backend must implement: submit)."""

    name, blocking = "inline", True

    def submit(self, sweep, plan, on_queued, external=None, submission=""):
        from orchestrator.stages import run_stage

        for arr in plan.arrays:
            on_queued(arr, {})
        states = {}
        for stage in sweep.stage_order:
            for h in plan.runs:
                if stage in plan.todo[h]:
                    run_stage(stage, sweep.runs_root / h)
                    states[(h, stage)] = "finished"
        return states


def test_a_new_backend_is_one_class_and_one_registry_line(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main
    from orchestrator.executors import EXECUTORS

    monkeypatch.setitem(EXECUTORS, "inline", f"{__name__}:InlineExecutor")
    path = selftest_sweep(tmp_path, name="inl", executor="inline", steps=3, step_s=0.0)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(path), "--db", url]) == 0
    store = Store(url)
    assert {(r.executor, st.status) for r in store.runs(sweep="inl") for st in r.stages} == {("inline", "finished")}
    store.dispose()
    # a name not in the registry: the sweep file is refused naming the key and the choices
    path.write_text(path.read_text().replace("executor: inline", "executor: nope"))
    capsys.readouterr()
    assert main(["submit", str(path), "--db", url]) == 2
    err = capsys.readouterr().err
    assert "key 'executor'" in err and "unknown executor 'nope'" in err and "inline" in err


def test_two_concurrent_starts_of_one_stage_one_runs_one_refuses(tmp_path):
    sweep = load_sweep(selftest_sweep(tmp_path, steps=10, step_s=0.2))
    run = sweep.runs[0]
    root = sweep.runs_root / run.run_hash  # what a submission writes: all a stage reads
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(json.dumps(config_dict(run.config)))
    (root / "run.json").write_text(json.dumps({"run_hash": run.run_hash, "sweep": "ex", "params": {}, "label": "",
                                               "stages": {"selftest": {"step_s": 0.2}}}))
    first = subprocess.Popen([sys.executable, "-m", "orchestrator.stages", "selftest", str(root)],
                             stderr=subprocess.PIPE, text=True)
    wait_for(lambda: progress(root) >= 1, 60, "first start made no progress")
    second = subprocess.run([sys.executable, "-m", "orchestrator.stages", "selftest", str(root)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"is locked by pid {first.pid} on " in second.stderr
    assert first.wait(timeout=60) == 0
    files = sorted((root / "results").glob("*.json"))
    assert [f.name for f in files] == ["selftest.attempt1.json"]
    res = json.loads(files[0].read_text())
    assert res["status"] == "finished" and res["info"]["starts"] == [0]  # trained once, from 0


def test_sigkilled_local_orchestrator_takes_its_stage_processes_and_next_submit_recovers(tmp_path):
    path = selftest_sweep(tmp_path, steps=30, step_s=0.2)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    orch = cli("submit", path, "--db", url, "--executor", "local")
    sweep = load_sweep(path)
    root = sweep.runs_root / sweep.runs[0].run_hash
    wait_for(lambda: progress(root) >= 4, 90, "the local stage made no progress")
    (child,) = [int(p) for p in open(f"/proc/{orch.pid}/task/{orch.pid}/children").read().split()]
    assert alive(child)
    orch.send_signal(signal.SIGKILL)
    orch.wait(timeout=10)
    wait_for(lambda: not alive(child), 10, f"stage process {child} outlived its orchestrator")
    stopped_at = progress(root)

    status = cli("status", "ex", "--db", url)
    status.communicate(timeout=60)
    (st,) = [s for r in Store(url).runs(sweep="ex") for s in r.stages]
    assert st.status == "pending" and "died" in st.error_tail  # recovered, not queued forever

    again = cli("submit", path, "--db", url, "--executor", "local")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    res = json.loads((root / "results" / "selftest.attempt1.json").read_text())
    assert res["status"] == "finished"
    assert {m["name"]: m["value"] for m in res["metrics"]}["checksum"] == reference_checksum(30, 0)
    assert res["info"]["starts"][0] == 0 and 3 <= res["info"]["starts"][1] <= stopped_at  # resumed


def test_run_shared_by_two_sweeps_uses_the_first_sweeps_tokenizer(tmp_path):
    base = {"data": {"image_size": 32, "train_size": 32, "val_size": 16, "batch_size": 8},
            "model": {"patch_size": 8, "latent_channels": 8}, "loss": {"perceptual": 0.0},
            "train": {"steps": 2, "ckpt_every": 2, "device": "cpu"},
            "eval": {"num_samples": 16, "probe_train": 16, "probe_val": 16, "batch_size": 16}}
    url = f"sqlite:///{tmp_path / 'r.db'}"
    paths = {}
    for name, stages in (("a", {"tokenizer": {"needs": []}}),
                         ("b", {"tokenizer": {"needs": []}, "evaluate": {"needs": ["tokenizer"]}})):
        doc = {"name": name, "base": base, "stages": stages, "executor": "debug", "runs_dir": str(tmp_path / "runs")}
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(doc))
    from orchestrator.cli import main

    assert main(["submit", str(paths["a"]), "--db", url]) == 0
    assert main(["submit", str(paths["b"]), "--db", url]) == 0
    (run,) = Store(url).runs()
    assert {s.stage: s.status for s in run.stages} == {"tokenizer": "finished", "evaluate": "finished"}
    a_tok = (tmp_path / "runs" / "a" / run.run_hash / "tokenizer").resolve()
    ev = json.loads((tmp_path / "runs" / "b" / run.run_hash / "evaluate" / "result.json").read_text())
    assert {"kind": "tokenizer", "path": str(a_tok)} in ev["artifacts"]
    assert not (tmp_path / "runs" / "b" / run.run_hash / "tokenizer").exists()  # not trained twice


# ----------------------------------------------------------------------------- real Slurm

@pytest.mark.slurm
def test_job_slurm_no_longer_knows_is_failed_as_lost_after_the_grace(slurm_cluster, tmp_path, monkeypatch):
    from orchestrator import reconcile

    sweep = load_sweep(selftest_sweep(tmp_path, name="lost", executor="slurm"))
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    h = sweep.runs[0].run_hash
    store.get_or_create_sweep("lost", spec_yaml=yaml.safe_dump({"runs_dir": str(tmp_path / "runs")}))
    store.upsert_run(h, "lost", {"train": {"seed": 0}}, stages=["selftest"])
    store.set_stage_state(h, "selftest", "queued", slurm_job_id="987654321")  # an id Slurm never issued
    # the grace is measured from the first refresh that missed the job: within it (however slow
    # this machine), still queued; past it, failed as lost
    monkeypatch.setattr(reconcile, "LOST_GRACE_S", 3600.0)
    assert reconcile.refresh_states(store, "lost") == {"queued": 1}  # within the grace: sacct may lag
    monkeypatch.setattr(reconcile, "LOST_GRACE_S", 0.0)
    assert reconcile.refresh_states(store, "lost") == {"failed": 1}
    (st,) = [s for r in store.runs(sweep="lost") for s in r.stages]
    assert "987654321 lost" in st.error_tail


@pytest.mark.slurm
def test_cancel_reports_a_failing_scancel_and_marks_nothing(slurm_cluster, tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    store.upsert_run("h1", "cx", {"train": {"seed": 0}}, stages=["selftest"])
    store.set_stage_state("h1", "selftest", "queued", slurm_job_id="x12")  # scancel: Invalid job id x12
    out = cli("cancel", "cx", "--db", store.url)
    _, err = out.communicate(timeout=60)
    assert out.returncode == 1 and "scancel failed" in err and "x12" in err
    assert [s.status for r in store.runs(sweep="cx") for s in r.stages] == ["queued"]


@pytest.mark.slurm
def test_wait_timeout_returns_while_jobs_stay_queued(slurm_cluster, tmp_path):
    res = {"cpus": 1, "mem_gb": 0.25, "time_min": 10, "partition": slurm_cluster, "extra": {"hold": True}}
    path = selftest_sweep(tmp_path, name="wt", executor="slurm")
    doc = yaml.safe_load(path.read_text())
    doc["stages"]["selftest"]["resources"] = res
    path.write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    t0 = time.time()
    out = cli("submit", path, "--db", url, "--wait", "--timeout", "3")
    _, err = out.communicate(timeout=120)
    try:
        assert out.returncode == 1 and "still has active stages after 3s" in err, err
        assert time.time() - t0 < 60
    finally:
        ids = [s.slurm_job_id for r in Store(url).runs(sweep="wt") for s in r.stages if s.slurm_job_id]
        subprocess.run(["scancel", *ids], capture_output=True)


@pytest.mark.slurm
def test_job_requeued_held_after_a_special_exit_is_final(slurm_cluster, tmp_path):
    from orchestrator.submit import refresh_states, submit_sweep

    path = selftest_sweep(tmp_path, name="sx", executor="slurm", steps=300, step_s=0.2)
    doc = yaml.safe_load(path.read_text())
    doc["stages"]["selftest"]["resources"] = {"cpus": 1, "mem_gb": 0.25, "time_min": 60, "partition": slurm_cluster}
    path.write_text(yaml.safe_dump(doc))
    sweep = load_sweep(path)
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    (jid,) = submit_sweep(store, sweep).job_ids.values()
    try:
        wait_for(lambda: progress(sweep.runs_root / sweep.runs[0].run_hash) >= 1, 90, "the job did not start")
        subprocess.run(["scontrol", "requeuehold", "State=SpecialExit", jid], check=True, capture_output=True)
        wait_for(lambda: refresh_states(store, "sx").get("failed") == 1, 30, "SPECIAL_EXIT stayed active")
        (st,) = [s for r in store.runs(sweep="sx") for s in r.stages]
        assert "SPECIAL_EXIT" in st.error_tail
    finally:
        subprocess.run(["scancel", jid], capture_output=True)


def _without_thread_env(code: str) -> list[str]:
    """stdout lines of ``code`` run by a fresh interpreter with no OMP/MKL thread settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_forked_local_tasks_inherit_the_preloaded_core_and_still_get_their_thread_limit():
    """The local executor imports the tasks' core entry points once, then forks: a task finds
    torch and its entry point already imported (no per-task import: ~4 CPU s × 72 tasks in the
    quickstart) and its thread limit still reaches torch."""
    code = ("import multiprocessing as mp, os, sys\n"
            "from orchestrator.executors.local import limit_threads\n"
            "from orchestrator.stages import preload\n"
            "preload(['evaluate', 'echo'])\n"
            "def child(q):\n"
            "    had = 'core.evaluate' in sys.modules and 'torch' in sys.modules\n"
            "    limit_threads(1)\n"
            "    q.put((had, sys.modules['torch'].get_num_threads()))\n"
            "q = mp.get_context('fork').Queue()\n"
            "p = mp.get_context('fork').Process(target=child, args=(q,)); p.start(); print(q.get()); p.join()\n")
    assert _without_thread_env(code)[-1] == "(True, 1)"


def test_local_task_thread_limit_reaches_torch_imported_after_fork():
    """A spawned task (or a fork whose parent imported nothing) imports torch itself: the
    task's thread limit must still reach torch, or max_parallel tasks oversubscribe the cores."""
    code = ("import os, sys\n"
            "os.environ.pop('OMP_NUM_THREADS', None)\n"
            "from orchestrator.executors.local import limit_threads\n"
            "assert 'torch' not in sys.modules\n"
            "limit_threads(1)\n"
            "import torch\n"
            "print(torch.get_num_threads())\n")
    assert _without_thread_env(code)[-1] == "1"
