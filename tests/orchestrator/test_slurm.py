"""Submission to the REAL local Slurm: arrays, dependencies, failures, retry, requeue."""
from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import datetime

import pytest
import submitit
import yaml

from orchestrator import slurm
from orchestrator.cli import main
from orchestrator.db.store import Store
from orchestrator.submit import open_store, submit_sweep, wait_for_sweep
from orchestrator.sweep import load_sweep
from selftest_reference import reference_checksum
from slurm_fixture import slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slurm
RES = {"cpus": 1, "mem_gb": 0.25, "time_min": 60}  # 60 min: submitit reads USR2 as preemption, not timeout


def write_sweep(tmp_path, name, partition, axes, selftest_params, steps, ckpt_every=5, echo=True):
    stages = {"selftest": {"needs": [], "params": selftest_params, "resources": {**RES, "partition": partition}}}
    if echo:
        stages["echo"] = {"needs": ["selftest"], "resources": {**RES, "partition": partition}}
    doc = {"name": name, "base": {"data": {"image_size": 32}, "train": {"steps": steps, "ckpt_every": ckpt_every}},
           "axes": axes, "stages": stages, "executor": "slurm", "array_parallelism": 8,
           "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def cli_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sacct_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def settled_states(ids: list[str], timed: list[str], timeout: float = 120) -> dict[str, dict]:
    """``slurm.job_states`` once accounting has caught up: every job in a final state, and the
    ``timed`` ones with start and end times (slurmdbd may lag the controller by seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        states = slurm.job_states(ids)
        try:
            if all(states[j]["state"] in slurm.FINAL_STATES for j in ids):
                for j in timed:
                    sacct_time(states[j]["start"]), sacct_time(states[j]["end"])
                return states
        except (KeyError, ValueError):
            pass
        assert time.monotonic() < deadline, f"accounting never settled: {states}"
        time.sleep(0.5)


def test_max_array_size_is_read_from_scontrol(slurm_cluster):
    text = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    assert slurm.max_array_size() == int(re.search(r"MaxArraySize\s*=\s*(\d+)", text).group(1))


def test_arrays_dependencies_failure_retry_and_resubmit(slurm_cluster, tmp_path, capsys):
    marker = tmp_path / "fail"
    marker.touch()
    path = write_sweep(tmp_path, "sl", slurm_cluster, {"model.patch_size": [8, 4, 2]},
                       {"step_s": 0.3, "fail_when": {"model.patch_size": 2}, "fail_marker": str(marker)}, steps=6)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    out = cli_json(capsys, "submit", str(path), "--db", url, "--wait")

    # one sbatch call (one array) per stage
    assert out["sbatch_calls"] == 2
    arrays = {}
    for j in out["job_ids"]:
        arrays.setdefault(j["stage"], set()).add(j["job_id"].split("_")[0])
    assert {s: len(ids) for s, ids in arrays.items()} == {"selftest": 1, "echo": 1}
    ids = {(j["run_hash"], j["stage"]): j["job_id"] for j in out["job_ids"]}

    store = Store(url)
    runs = {r.run_hash: r for r in store.runs(sweep="sl", with_config=True)}
    bad = next(h for h, r in runs.items() if r.config["model"]["patch_size"] == 2)
    rows = {(r.run_hash, st.stage): st for r in runs.values() for st in r.stages}
    assert rows[(bad, "selftest")].status == "failed"
    assert "selftest failure requested" in rows[(bad, "selftest")].error_tail
    assert "failing on purpose" in rows[(bad, "selftest")].error_tail  # tail of submitit's stderr file
    assert rows[(bad, "echo")].status == "cancelled"  # aftercorr: only the failed run's child
    good = [h for h in runs if h != bad]
    assert all(rows[(h, s)].status == "finished" for h in good for s in ("selftest", "echo"))

    # each child element started only after its own parent element ended: the stage wrappers' own
    # times (sacct may report Start=None for a 1-second array element long after it ended: seen in CI)
    states = settled_states(list(ids.values()), [])
    for h in good:
        res = {s: json.loads((tmp_path / "runs" / "sl" / h / "results" / f"{s}.attempt1.json").read_text())
               for s in ("selftest", "echo")}
        assert datetime.fromisoformat(res["echo"]["started_at"]) >= datetime.fromisoformat(res["selftest"]["ended_at"])
    assert states[ids[(bad, "selftest")]]["state"] == "FAILED"
    assert states[ids[(bad, "echo")]]["state"] == "CANCELLED"

    # re-submitting submits nothing
    again = cli_json(capsys, "submit", str(path), "--db", url)
    assert again["sbatch_calls"] == 0 and again["job_ids"] == []

    # retry reruns only the failed element (and its dependant)
    marker.unlink()
    retry = cli_json(capsys, "retry", "sl", "--db", url, "--wait")
    assert {(j["run_hash"], j["stage"]) for j in retry["job_ids"]} == {(bad, "selftest"), (bad, "echo")}
    rows = {(r.run_hash, st.stage): st for r in store.runs(sweep="sl") for st in r.stages}
    assert rows[(bad, "selftest")].status == "finished" and rows[(bad, "selftest")].attempt == 2
    assert rows[(bad, "echo")].status == "finished"
    assert store.finished_run_hashes("sl") == set(runs)


def test_a_result_landing_during_a_refresh_is_not_undone_by_slurms_older_state(slurm_cluster, tmp_path,
                                                                               monkeypatch):
    """The interleaving that hung CI in `submit --wait`: one refresh reads Slurm (good job
    RUNNING; the bad run's child CANCELLED, an end without a result file); the good job then
    ends and writes its result, which the refresh's second ingest (made for the cancelled job)
    records as finished.  Slurm's older RUNNING must not overwrite that (before: the stage went
    back to running, its result file counted as ingested, its job COMPLETED, and the sweep
    never settled)."""
    from orchestrator import reconcile

    steps = 40
    path = write_sweep(tmp_path, "race", slurm_cluster, {"model.patch_size": [8, 2]},
                       {"step_s": 0.25, "fail_when": {"model.patch_size": 2}}, steps=steps)
    sweep = load_sweep(path)
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    ids = submit_sweep(store, sweep).job_ids
    good, bad = (next(r.run_hash for r in sweep.runs if r.config.model.patch_size == p) for p in (8, 2))
    job = {"good": ids[(good, "selftest")], "bad": ids[(bad, "selftest")], "child": ids[(bad, "echo")]}
    want = {"good": "RUNNING", "bad": "FAILED", "child": "CANCELLED"}
    progress = sweep.runs_root / good / "selftest" / "progress.txt"
    deadline = time.monotonic() + 120
    while True:  # the real cluster: the bad run over, the good one running and far from done
        states = slurm.job_states(list(job.values()))
        step = int(progress.read_text() or 0) if progress.exists() else 0
        if all(states.get(job[k], {}).get("state") == v for k, v in want.items()):
            assert step < steps // 2, "the good job ran too far before the bad one was seen failed"
            break
        assert time.monotonic() < deadline, f"jobs never reached {want}: {states}"
        time.sleep(0.2)

    real, seen = slurm.job_states, []
    result = sweep.runs_root / good / "results" / "selftest.attempt1.json"

    def read_then_let_the_job_finish(job_ids):
        answer = real(job_ids)
        seen.append(answer[job["good"]]["state"])
        end = time.monotonic() + 120
        while not result.exists():  # the good job ends after Slurm was read
            assert time.monotonic() < end, "the good job never wrote its result"
            time.sleep(0.1)
        return answer

    monkeypatch.setattr(slurm, "job_states", read_then_let_the_job_finish)
    counts = reconcile.refresh_states(store, "race")
    assert seen == ["RUNNING"]  # the refresh really acted on a state older than the result file
    assert counts == {"finished": 1, "failed": 1, "queued": 1, "cancelled": 1}  # the good run's child waits
    monkeypatch.setattr(slurm, "job_states", real)
    assert wait_for_sweep(store, "race", poll_s=0.5, timeout_s=120) == {"finished": 2, "failed": 1, "cancelled": 1}


def test_a_completed_job_without_a_result_file_fails_instead_of_waiting_forever(slurm_cluster, tmp_path,
                                                                                monkeypatch):
    from orchestrator import reconcile

    path = write_sweep(tmp_path, "nores", slurm_cluster, {"train.seed": [1]}, {}, steps=2, echo=False)
    sweep = load_sweep(path)
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    (job_id,) = submit_sweep(store, sweep).job_ids.values()
    settled_states([job_id], [job_id])
    (sweep.runs_root / sweep.runs[0].run_hash / "results" / "selftest.attempt1.json").unlink()  # lost on the way
    assert reconcile.refresh_states(store, "nores") == {"queued": 1}  # within the grace: still waiting
    monkeypatch.setattr(reconcile, "LOST_GRACE_S", 0.0)
    assert reconcile.refresh_states(store, "nores") == {"failed": 1}
    (row,) = [st for r in store.runs(sweep="nores") for st in r.stages]
    assert f"slurm job {job_id} COMPLETED" in row.error_tail and "no result file" in row.error_tail


def test_interrupted_checkpointable_stage_resumes_from_its_checkpoint(slurm_cluster, tmp_path):
    steps = 40
    path = write_sweep(tmp_path, "rq", slurm_cluster, {"train.seed": [3]}, {"step_s": 0.25}, steps=steps,
                       echo=False)
    sweep = load_sweep(path)
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    res = submit_sweep(store, sweep)
    (job_id,) = res.job_ids.values()
    run_root = sweep.runs_root / sweep.runs[0].run_hash
    progress = run_root / "selftest" / "progress.txt"
    t0 = time.time()
    while not (progress.exists() and int(progress.read_text() or 0) >= 12):
        assert time.time() - t0 < 90, "the job did not make progress"
        time.sleep(0.2)
    # a preemption, as Slurm sends it: SIGTERM then USR2 -> checkpoint() -> scontrol requeue
    submitit.SlurmJob(folder=sweep.runs_root / ".submitit" / "%j", job_id=job_id)._interrupt()
    wait_for_sweep(store, "rq", poll_s=1, timeout_s=150)

    first = json.loads((run_root / "results" / "selftest.attempt1.json").read_text())
    second = json.loads((run_root / "results" / "selftest.attempt2.json").read_text())
    assert first["status"] == "preempted" and second["status"] == "finished"
    assert second["info"]["slurm_restart_count"] == 1
    start0, resumed = second["info"]["starts"]
    assert start0 == 0 and resumed >= 10 and resumed % 5 == 0  # from the latest checkpoint, not from 0
    metrics = {m["name"]: m["value"] for m in second["metrics"]}
    assert metrics["checksum"] == reference_checksum(steps, 3)  # = the uninterrupted result
    (row,) = [st for r in store.runs(sweep="rq") for st in r.stages]
    assert row.status == "finished" and row.attempt == 2


def test_cancel_scancels_queued_jobs_and_marks_them(slurm_cluster, tmp_path, capsys):
    path = write_sweep(tmp_path, "cx", slurm_cluster, {"model.patch_size": [8, 4]}, {}, steps=2)
    doc = yaml.safe_load(path.read_text())
    for st in doc["stages"].values():
        st["resources"]["extra"] = {"hold": True}  # stays PENDING: nothing runs before the cancel
    path.write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    out = cli_json(capsys, "submit", str(path), "--db", url)
    ids = [j["job_id"] for j in out["job_ids"]]
    assert len(ids) == 4
    assert main(["cancel", "cx", "--db", url]) == 0
    store = Store(url)
    assert {st.status for r in store.runs(sweep="cx") for st in r.stages} == {"cancelled"}
    t0 = time.time()
    while {v["state"] for v in slurm.job_states(ids).values()} != {"CANCELLED"}:
        assert time.time() - t0 < 30, slurm.job_states(ids)
        time.sleep(0.5)
    # cancelled runs are for `retry`, not for a plain re-submit
    assert cli_json(capsys, "submit", str(path), "--db", url)["job_ids"] == []


def _checkpointed_step(run_dir) -> int:
    """The newest complete checkpoint's step (``step_{N:08d}.pt`` appear whole, by rename)."""
    return max((int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt")), default=0)


@pytest.mark.slow
def test_real_tokenizer_training_preempted_and_resumed_matches_uninterrupted(slurm_cluster, tmp_path):
    """core.train as the tokenizer stage: preempt mid-run, resume from its checkpoint, same loss."""
    base = {"data": {"image_size": 32, "train_size": 128, "val_size": 32, "batch_size": 8},
            "model": {"patch_size": 8}, "loss": {"perceptual": 0.0},
            "train": {"steps": 40, "ckpt_every": 5, "log_every": 5, "device": "cpu"}}
    results = {}
    stores, sweeps = {}, {}
    for name in ("ref", "pre"):  # separate databases: both sweeps hold the same run hash
        doc = {"name": name, "base": base, "executor": "slurm", "runs_dir": str(tmp_path / "runs"),
               "stages": {"tokenizer": {"needs": [], "resources": {**RES, "mem_gb": 2, "partition": slurm_cluster}}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        sweeps[name] = load_sweep(path)
        stores[name] = open_store(f"sqlite:///{tmp_path / name}.db")
        results[name] = submit_sweep(stores[name], sweeps[name])
    sweep = sweeps["pre"]
    run_root = sweep.runs_root / sweep.runs[0].run_hash
    t0 = time.time()
    # the checkpoint, not the log line: step 15 is logged before its checkpoint is written, and an
    # interruption between the two resumes from step 10 (seen under load)
    while _checkpointed_step(run_root / "tokenizer") < 15:
        assert time.time() - t0 < 240, "training did not checkpoint step 15"
        time.sleep(0.5)
    (job_id,) = results["pre"].job_ids.values()
    submitit.SlurmJob(folder=sweep.runs_root / ".submitit" / "%j", job_id=job_id)._interrupt()
    for name in ("ref", "pre"):
        wait_for_sweep(stores[name], name, poll_s=2, timeout_s=400)

    def final(name):
        root = sweeps[name].runs_root / sweeps[name].runs[0].run_hash
        files = sorted((root / "results").glob("tokenizer.attempt*.json"))
        return [json.loads(f.read_text()) for f in files]

    (ref,) = final("ref")
    pre = final("pre")
    assert [p["status"] for p in pre] == ["preempted", "finished"]
    loss = lambda p: {m["name"]: m["value"] for m in p["metrics"]}["train_loss"]  # noqa: E731
    assert ref["status"] == "finished"
    assert loss(pre[-1]) == pytest.approx(loss(ref), rel=1e-5, abs=1e-6)
    # it resumed from the checkpoint written before the interruption (step >= 15), not from 0
    assert ref["info"]["resumed_from"] is None
    assert int(pre[-1]["info"]["resumed_from"].split("_")[1].split(".")[0]) >= 15
    assert pre[-1]["info"]["slurm_restart_count"] == 1
    log_steps = [json.loads(x)["step"] for x in (run_root / "tokenizer" / "log.jsonl").read_text().splitlines()
                 if x.strip()]
    assert log_steps == list(range(5, 41, 5))  # each step logged once: no re-training from scratch


def _node_cpus() -> int:
    return int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True)
               .stdout.split()[0])


def test_a_distributed_stage_splits_its_cpus_over_its_ranks(slurm_cluster, tmp_path, capsys):
    """``resources.cpus`` is per job: a 2-GPU tokenizer job is 2 tasks of cpus/2 each; the real
    Slurm accepts a job of the node's CPUs and refuses one beyond them (test-only sbatch of the
    script submitit writes, minus the GPU request: this node has none)."""
    from orchestrator.executors.slurm import sbatch_params

    node = _node_cpus()
    assert node % 2 == 0, f"this test needs an even CPU count per node, the node has {node}"

    def verdict(cpus: int) -> tuple[int, str]:
        doc = {"name": f"cpus{cpus}", "stages": {"tokenizer": {"resources": {"gpus": 2, "cpus": cpus, "mem_gb": 0.1,
                                                                              "partition": slurm_cluster}}},
               "executor": "slurm", "runs_dir": str(tmp_path / "runs")}
        path = tmp_path / f"cpus{cpus}.yaml"
        path.write_text(yaml.safe_dump(doc))
        sweep = load_sweep(path)
        params = sbatch_params(sweep, "tokenizer", sweep.spec.stages["tokenizer"].resources, None)
        ex = submitit.SlurmExecutor(folder=tmp_path / "sub")
        ex.update_parameters(**params)
        text = ex._make_submission_file_text("true", "uid")
        assert f"--cpus-per-task={cpus // 2}" in text and "--ntasks-per-node=2" in text, text
        script = tmp_path / f"cpus{cpus}.sh"
        script.write_text("\n".join(ln for ln in text.splitlines() if "--gpus-per-node" not in ln) + "\n")
        out = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True)
        return out.returncode, out.stderr

    rc, err = verdict(node)  # the whole node, 2 ranks of node/2
    assert rc == 0, err
    rc, err = verdict(2 * node)  # twice the node: refused by Slurm itself
    assert rc != 0 and "node configuration is not available" in err, err

    # a count that does not split over the ranks: exit 2 naming the file and the key, nothing submitted
    doc = {"name": "odd", "stages": {"tokenizer": {"resources": {"gpus": 2, "cpus": 3}}}, "executor": "slurm",
           "runs_dir": str(tmp_path / "runs")}
    (tmp_path / "odd.yaml").write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{tmp_path / 'never.db'}"
    capsys.readouterr()
    assert main(["submit", str(tmp_path / "odd.yaml"), "--db", url]) == 2
    err = capsys.readouterr().err
    assert "stages.tokenizer.resources.cpus" in err and str(tmp_path / "odd.yaml") in err and "cpus=3" in err
    assert not (tmp_path / "never.db").exists() and not (tmp_path / "runs").exists()
