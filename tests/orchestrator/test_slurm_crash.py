"""Crash-safe submission on the REAL local Slurm: a SIGKILL between two sbatch calls, or an
sbatch refused on the second stage, then a re-submission queues exactly what is missing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from orchestrator.db.store import Store
from slurm_fixture import pause_at_sbatch, slurm_cluster, wait_paused  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slurm
HELD = {"cpus": 1, "mem_gb": 0.25, "time_min": 10, "extra": {"hold": True}}  # never occupy the machine


def held_sweep(tmp_path, partition, echo_partition=None):
    name = f"crash{uuid.uuid4().hex[:8]}"
    doc = {"name": name, "base": {"data": {"image_size": 32}, "train": {"steps": 2}},
           "axes": {"model.patch_size": [8, 4]}, "executor": "slurm", "runs_dir": str(tmp_path / "runs"),
           "stages": {"selftest": {"needs": [], "resources": {**HELD, "partition": partition}},
                      "echo": {"needs": ["selftest"], "resources": {**HELD, "partition": echo_partition or partition}}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return name, path


def orchestrate(*argv, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def slurm_jobs(sweep: str) -> dict[str, list[str]]:
    """stage -> job ids (one per array element) of this sweep's jobs that Slurm knows."""
    out = subprocess.run(["squeue", "-h", "-r", "-a", "-o", "%i|%j"], capture_output=True, text=True).stdout
    jobs: dict[str, list[str]] = {}
    for line in out.splitlines():
        jid, _, name = line.partition("|")
        if name.startswith(sweep + "."):
            jobs.setdefault(name.split(".")[1], []).append(jid)
    return jobs


@pytest.fixture
def cleanup():
    names = []
    yield names
    for sweep in names:
        ids = [j for js in slurm_jobs(sweep).values() for j in js]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)


def db_jobs(url, sweep):
    return {(r.run_hash, st.stage): (st.status, st.slurm_job_id) for r in Store(url).runs(sweep=sweep)
            for st in r.stages}


@pytest.mark.parametrize("where", ["before_sbatch:1", "after_sbatch:0"])
def test_sigkill_between_sbatch_calls_then_resubmit_queues_each_stage_once(slurm_cluster, tmp_path, cleanup, where):
    name, path = held_sweep(tmp_path, slurm_cluster)
    cleanup.append(name)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    env, paused = pause_at_sbatch(tmp_path, where)  # that sbatch call stops until its caller dies
    proc = orchestrate("submit", path, "--db", url, env=env)
    wait_paused(paused, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # killed after sbatch of array 0 returned: its array exists, the database may not know it yet
    assert list(slurm_jobs(name)) == ["selftest"] and len(slurm_jobs(name)["selftest"]) == 2
    status = orchestrate("status", name, "--db", url)
    assert status.wait(timeout=120) == 0, status.communicate()
    # status settled the dead submission: the array found by its job name is recorded queued
    rows = db_jobs(url, name)
    assert sorted(j for (_, s), (st, j) in rows.items() if s == "selftest" and st == "queued") == \
        sorted(slurm_jobs(name)["selftest"])
    assert {st for (_, s), (st, _) in rows.items() if s == "echo"} == {"pending"}

    again = orchestrate("submit", path, "--db", url)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    jobs = slurm_jobs(name)
    assert {s: len(ids) for s, ids in jobs.items()} == {"selftest": 2, "echo": 2}  # one job per run stage
    rows = db_jobs(url, name)
    assert len(rows) == 4 and {st for st, _ in rows.values()} == {"queued"}
    assert sorted(j for _, j in rows.values()) == sorted(j for ids in jobs.values() for j in ids)
    # echo element k waits for selftest element k of the array queued before the crash
    (sel,) = {j.split("_")[0] for j in jobs["selftest"]}
    dep = subprocess.run(["scontrol", "show", "job", jobs["echo"][0]], capture_output=True, text=True).stdout
    assert f"aftercorr:{sel}" in dep
    # and a third submit changes nothing
    third = orchestrate("submit", path, "--db", url)
    assert third.wait(timeout=120) == 0
    assert {s: len(ids) for s, ids in slurm_jobs(name).items()} == {"selftest": 2, "echo": 2}


def test_sbatch_refused_on_second_stage_is_one_line_and_fix_queues_only_it(slurm_cluster, tmp_path, cleanup):
    name, path = held_sweep(tmp_path, slurm_cluster, echo_partition="no_such_partition")
    cleanup.append(name)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    proc = orchestrate("submit", path, "--db", url)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "'echo'" in lines[0] and "'partition'" in lines[0] and str(path) in lines[0]
    assert list(slurm_jobs(name)) == ["selftest"]
    assert {st for (h, s), (st, _) in db_jobs(url, name).items() if s == "echo"} == {"pending"}

    doc = yaml.safe_load(path.read_text())
    doc["stages"]["echo"]["resources"]["partition"] = slurm_cluster
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    fixed = orchestrate("submit", path, "--db", url, "--json")
    out, err = fixed.communicate(timeout=120)
    assert fixed.returncode == 0, err
    assert {s: len(ids) for s, ids in slurm_jobs(name).items()} == {"selftest": 2, "echo": 2}
    assert {j["stage"] for j in yaml.safe_load(out)["job_ids"]} == {"echo"}


def test_second_slurm_job_on_a_running_stage_refuses_and_changes_nothing(slurm_cluster, tmp_path):
    import submitit

    from orchestrator.stages import StageTask
    from orchestrator.submit import open_store, submit_sweep, wait_for_sweep
    from orchestrator.sweep import load_sweep

    name = f"lock{uuid.uuid4().hex[:8]}"
    doc = {"name": name, "base": {"data": {"image_size": 32}, "train": {"steps": 40, "ckpt_every": 5}},
           "executor": "slurm", "runs_dir": str(tmp_path / "runs"),
           "stages": {"selftest": {"needs": [], "params": {"step_s": 0.2},
                                   "resources": {"cpus": 1, "mem_gb": 0.25, "time_min": 60,
                                                 "partition": slurm_cluster}}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    sweep = load_sweep(path)
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    submit_sweep(store, sweep)
    root = sweep.runs_root / sweep.runs[0].run_hash
    progress = root / "selftest" / "progress.txt"
    t0 = time.time()
    while not (progress.exists() and int(progress.read_text() or 0) >= 2):
        assert time.time() - t0 < 120, "the first job did not start"
        time.sleep(0.2)
    # someone submits the same stage of the same run directory again, by hand
    ex = submitit.SlurmExecutor(folder=tmp_path / "dup" / "%j")
    ex.update_parameters(time=10, cpus_per_task=1, mem="256MB", partition=slurm_cluster)
    dup = ex.submit(StageTask("selftest", str(root)))
    with pytest.raises(submitit.core.utils.FailedJobError, match="is locked by pid"):
        dup.result()
    wait_for_sweep(store, name, poll_s=1, timeout_s=150)
    assert [f.name for f in sorted((root / "results").glob("*.json"))] == ["selftest.attempt1.json"]
    res = json.loads((root / "results" / "selftest.attempt1.json").read_text())
    assert res["status"] == "finished" and res["info"]["starts"] == [0]
    (st,) = [s for r in store.runs(sweep=name) for s in r.stages]
    assert st.status == "finished"


# what this single-node cluster refuses at sbatch time (it enforces no accounts/QOS, and holds
# an oversized job pending rather than refusing it); the partition case is the test above
@pytest.mark.parametrize("resources, option", [({"gpus": 1}, "gpus")])
def test_any_sbatch_refusal_is_one_line_naming_stage_and_option(slurm_cluster, tmp_path, cleanup, resources, option):
    name, path = held_sweep(tmp_path, slurm_cluster)
    cleanup.append(name)
    doc = yaml.safe_load(path.read_text())
    del doc["stages"]["echo"]
    doc["stages"]["selftest"]["resources"].update(resources)
    path.write_text(yaml.safe_dump(doc))
    proc = orchestrate("submit", path, "--db", f"sqlite:///{tmp_path / 'r.db'}")
    out, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "'selftest'" in lines[0] and option in lines[0], lines[0]
    assert slurm_jobs(name) == {}
