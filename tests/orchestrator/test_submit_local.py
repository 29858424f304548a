"""The local (process pool) and debug (in-process) executors, end to end through the CLI."""
from __future__ import annotations

import json
from datetime import datetime

import yaml

from orchestrator.cli import main
from orchestrator.db.store import Store
from orchestrator.submit import refresh_states
from selftest_reference import reference_checksum


def make_sweep(tmp_path, marker, steps=7, executor="local"):
    doc = {
        "name": "loc",
        "base": {"data": {"image_size": 32}, "train": {"steps": steps, "ckpt_every": 3}},
        "axes": {"model.patch_size": [8, 4]},
        "seeds": [0, 1],
        "stages": {
            "selftest": {"needs": [], "params": {"fail_when": {"model.patch_size": 8, "train.seed": 1},
                                                 "fail_marker": str(marker)}},
            "echo": {"needs": ["selftest"]},
        },
        "executor": executor,
        "max_parallel": 2,
        "runs_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "loc.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def result_files(tmp_path):
    return sorted((tmp_path / "runs" / "loc").glob("*/results/*.json"))


def stage_rows(store):
    return {(r.run_hash, st.stage): st for r in store.runs(sweep="loc") for st in r.stages}


def test_local_executor_failure_resubmit_and_retry(tmp_path, capsys):
    marker = tmp_path / "fail"
    marker.touch()
    path = make_sweep(tmp_path, marker)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(path), "--db", url]) == 1  # one run failed on purpose
    store = Store(url)
    runs = {r.run_hash: r for r in store.runs(sweep="loc")}
    assert sorted(r.status for r in runs.values()) == ["failed", "finished", "finished", "finished"]
    rows = stage_rows(store)
    (bad,) = [h for h, r in runs.items() if r.status == "failed"]
    assert rows[(bad, "selftest")].status == "failed"
    assert "selftest failure requested" in rows[(bad, "selftest")].error_tail
    assert "failing on purpose" in rows[(bad, "selftest")].error_tail  # from the job's log
    assert rows[(bad, "echo")].status == "cancelled"  # its parent failed: never ran

    payloads = [json.loads(p.read_text()) for p in result_files(tmp_path)]
    for p in payloads:
        if p["stage"] == "selftest" and p["status"] == "finished":
            seed = p["config"]["train"]["seed"]
            checksum = {m["name"]: m["value"] for m in p["metrics"]}["checksum"]
            assert checksum == reference_checksum(7, seed)
        if p["stage"] == "echo":  # ran after its parent: the parent's result file existed
            assert "selftest.attempt1.json" in p["info"]["parents"]
    # never more than max_parallel=2 stage processes at once
    spans = [(datetime.fromisoformat(p["started_at"]), datetime.fromisoformat(p["ended_at"])) for p in payloads]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= 2

    # re-submitting the same sweep submits nothing (the failed run is left to retry)
    n_files = len(result_files(tmp_path))
    capsys.readouterr()
    assert main(["submit", str(path), "--db", url]) == 0
    assert "0 runs to submit" in capsys.readouterr().out
    assert len(result_files(tmp_path)) == n_files

    # retry reruns only the failed run (its failed stage and the dependant)
    marker.unlink()
    assert main(["retry", "loc", "--db", url]) == 0
    assert len(result_files(tmp_path)) == n_files + 2  # selftest attempt 2 + echo attempt 1
    rows = stage_rows(store)
    assert rows[(bad, "selftest")].status == "finished" and rows[(bad, "selftest")].attempt == 2
    assert rows[(bad, "echo")].status == "finished"
    assert {r.status for r in store.runs(sweep="loc")} == {"finished"}
    assert refresh_states(store, "loc") == {"finished": 8}
    capsys.readouterr()
    assert main(["status", "loc", "--db", url]) == 0  # the status command refreshes through us
    assert "4 run(s): finished 4" in capsys.readouterr().out


def test_debug_executor_matches_reference_and_config_change_is_a_new_run(tmp_path):
    marker = tmp_path / "absent"  # never created: no failure
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(make_sweep(tmp_path, marker, executor="debug")), "--db", url]) == 0
    store = Store(url)
    assert len(store.finished_run_hashes("loc")) == 4
    p = next(json.loads(f.read_text()) for f in result_files(tmp_path) if f.name == "selftest.attempt1.json")
    assert p["executor"] == "debug"
    assert {m["name"]: m["value"] for m in p["metrics"]}["checksum"] == reference_checksum(7, p["config"]["train"]["seed"])
    # more steps: a different resolved config, hence 4 new runs
    assert main(["submit", str(make_sweep(tmp_path, marker, steps=9, executor="debug")), "--db", url]) == 0
    assert len(store.finished_run_hashes("loc")) == 8


def test_multi_gpu_tokenizer_stage_gets_one_task_per_gpu(tmp_path):
    from orchestrator.executors.slurm import sbatch_params as _sbatch_params
    from orchestrator.sweep import load_sweep

    doc = yaml.safe_load(make_sweep(tmp_path, tmp_path / "m").read_text())
    doc["stages"] = {"tokenizer": {"needs": [], "resources": {"gpus": 8, "cpus": 16}},  # cpus: per job
                     "evaluate": {"needs": ["tokenizer"], "resources": {"gpus": 8}}}
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(doc))
    sweep = load_sweep(path)
    tok = _sbatch_params(sweep, "tokenizer", sweep.spec.stages["tokenizer"].resources, None)
    ev = _sbatch_params(sweep, "evaluate", sweep.spec.stages["evaluate"].resources, "afterok:1")
    assert tok["gpus_per_node"] == 8 and tok["ntasks_per_node"] == 8  # DDP: one rank per GPU
    assert tok["cpus_per_task"] == 2  # the job's 16 CPUs split over its 8 ranks
    assert ev["gpus_per_node"] == 8 and "ntasks_per_node" not in ev  # single-process stage


def test_only_rank_zero_writes_the_result_file(tmp_path, monkeypatch):
    from orchestrator.stages import run_stage

    path = make_sweep(tmp_path, tmp_path / "absent", steps=3)
    assert main(["submit", str(path), "--dry-run", "--db", f"sqlite:///{tmp_path / 'r.db'}"]) == 0
    assert main(["submit", str(path), "--executor", "debug", "--db", f"sqlite:///{tmp_path / 'r.db'}"]) == 0
    run_root = result_files(tmp_path)[0].parents[1]
    before = sorted(p.name for p in (run_root / "results").iterdir())
    monkeypatch.setenv("RANK", "1")
    assert run_stage("selftest", run_root) == ""
    assert sorted(p.name for p in (run_root / "results").iterdir()) == before
    monkeypatch.setenv("RANK", "0")
    written = run_stage("selftest", run_root)
    assert written.endswith("selftest.attempt2.json")
