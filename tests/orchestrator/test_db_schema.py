"""Schema round trips and the Store API, on SQLite and a real PostgreSQL server."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from datetime import datetime, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from orchestrator.db import SchemaError, Store
from orchestrator.db.models import (Artifact, IngestedFile, Metric, Param, Run, RunStage, Sweep,
                                    param_columns)
from orchestrator.db.engine import _fs_type, is_network_fs
from orchestrator.db.store import head_revision, run_status


def test_round_trip_every_table(store, real_config):
    h, cfg = real_config(8)
    t0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with store.session() as s:
        sw = Sweep(name="patch", spec_yaml="axes:\n  model.patch_size: [4, 8]\n", git_commit="abc", created_at=t0)
        run = Run(run_hash=h, sweep=sw, config=cfg, status="running", stage="tokenizer", executor="slurm",
                  slurm_job_id="17_3", slurm_array_id="17", attempts=2, created_at=t0, started_at=t0, ended_at=t0,
                  host="node01", git_commit="abc", error_tail="Traceback ...\nValueError: x")
        run.stages.append(RunStage(stage="tokenizer", status="running", attempt=2, result_attempt=1,
                                   slurm_job_id="17_3", host="node01", started_at=t0, error_tail="tail"))
        run.params += [Param(key=k, **param_columns(v)) for k, v in
                       {"model.patch_size": 8, "loss.ssl": 0.25, "ssl.method": "ibot", "model.class_token": True,
                        "model.split_depth": None}.items()]
        run.metrics.append(Metric(stage="evaluate", name="rfid", value=12.5, step=200, backbone="embedded-featnet-v1",
                                  num_samples=512, attempt=1, source_file="/r/evaluate.attempt1.json"))
        run.artifacts.append(Artifact(stage="tokenizer", kind="checkpoint", path="/r/ckpt.pt", attempt=1))
        s.add(run)
        s.add(IngestedFile(path="/r/evaluate.attempt1.json", sha256="f" * 64, size=123, run_hash=h,
                           stage="evaluate", attempt=1, ingested_at=t0))

    with store.session() as s:
        run = s.scalars(select(Run).where(Run.run_hash == h)).one()
        assert run.config == cfg  # JSON round trip of a real resolved RunConfig
        assert (run.sweep.name, run.sweep.spec_yaml, run.sweep.git_commit) == (
            "patch", "axes:\n  model.patch_size: [4, 8]\n", "abc")
        assert (run.status, run.stage, run.executor, run.slurm_job_id, run.slurm_array_id, run.attempts,
                run.host, run.error_tail) == ("running", "tokenizer", "slurm", "17_3", "17", 2, "node01",
                                              "Traceback ...\nValueError: x")
        assert run.started_at.replace(tzinfo=timezone.utc) == t0
        (st,) = run.stages
        assert (st.stage, st.status, st.attempt, st.result_attempt, st.slurm_job_id, st.host, st.error_tail) == (
            "tokenizer", "running", 2, 1, "17_3", "node01", "tail")
        params = {p.key: (p.kind, p.value) for p in run.params}
        assert params == {"model.patch_size": ("int", 8), "loss.ssl": ("float", 0.25), "ssl.method": ("str", "ibot"),
                          "model.class_token": ("bool", True), "model.split_depth": ("null", None)}
        # typed params are queryable by value
        assert s.scalars(select(Param.run_id).where(Param.key == "loss.ssl", Param.value_float > 0.2)).all() == [run.id]
        (m,) = run.metrics
        assert (m.stage, m.name, m.value, m.step, m.backbone, m.num_samples, m.attempt, m.source_file) == (
            "evaluate", "rfid", 12.5, 200, "embedded-featnet-v1", 512, 1, "/r/evaluate.attempt1.json")
        (a,) = run.artifacts
        assert (a.stage, a.kind, a.path, a.attempt) == ("tokenizer", "checkpoint", "/r/ckpt.pt", 1)
        f = s.scalars(select(IngestedFile)).one()
        assert (f.path, f.sha256, f.size, f.run_hash, f.stage, f.attempt) == (
            "/r/evaluate.attempt1.json", "f" * 64, 123, h, "evaluate", 1)


def test_unique_constraints_and_foreign_keys(store):
    store.upsert_run("a" * 16, "s", {"x": 1})
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(Run(run_hash="a" * 16, sweep_id=1, config={}, status="pending", attempts=0))
    with pytest.raises(IntegrityError):  # foreign keys are enforced (PRAGMA foreign_keys=ON on SQLite)
        with store.session() as s:
            s.add(Metric(run_id=999, stage="x", name="y", value=1.0, attempt=1))
            s.flush()


def test_store_api_stage_states_and_run_status(store):
    rid = store.upsert_run("b" * 16, "sw", {"a": 1}, {"loss.ssl": 0.1}, executor="local",
                           stages=["tokenizer", "evaluate"])
    assert store.upsert_run("b" * 16, "sw", {"a": 1}, stages=["tokenizer", "evaluate"]) == rid  # no duplicate
    (run,) = store.runs(sweep="sw")
    assert run.status == "pending" and sorted(st.stage for st in run.stages) == ["evaluate", "tokenizer"]
    store.set_stage_state("b" * 16, "tokenizer", "queued", attempt=1, slurm_job_id="5_0", slurm_array_id="5")
    assert store.runs()[0].status == "queued"
    store.set_stage_state("b" * 16, "tokenizer", "finished")
    assert store.runs()[0].status == "pending"  # evaluate still pending: run not finished
    assert store.finished_run_hashes() == set()
    store.set_stage_state("b" * 16, "evaluate", "failed", error_tail="boom")
    (run,) = store.runs(status="failed")
    assert run.error_tail == "boom" and run.slurm_job_id == "5_0" and run.slurm_array_id == "5"
    store.set_stage_state("b" * 16, "evaluate", "finished", attempt=2)
    assert store.finished_run_hashes(sweep="sw") == {"b" * 16}
    assert store.finished_run_hashes(sweep="other") == set()
    assert store.runs()[0].attempts == 2
    with pytest.raises(ValueError, match="not in"):
        store.set_stage_state("b" * 16, "evaluate", "done")
    with pytest.raises(KeyError, match="c{16}"):
        store.set_stage_state("c" * 16, "evaluate", "queued")
    assert store.get_or_create_sweep("sw", spec_yaml="x: 1") == store.get_or_create_sweep("sw")
    assert store.sweep_names() == ["sw"]


def test_conditional_state_writes_skip_stages_that_moved_on(store):
    """``only_if`` (used by every Slurm refresh): a stage that has ended is never changed back
    by a state read before it ended; on PostgreSQL the rows are locked (FOR UPDATE) between
    the status check and the write."""
    store.upsert_run("d" * 16, "sw", {"a": 1}, executor="slurm", stages=["tokenizer", "evaluate"])
    store.set_states({("d" * 16, "tokenizer"): {"status": "finished"}, ("d" * 16, "evaluate"): {"status": "queued"}})
    stale = {("d" * 16, st): {"status": "running"} for st in ("tokenizer", "evaluate")}
    assert store.set_states(stale, only_if=("queued", "running", "preempted", "pending")) == [("d" * 16, "evaluate")]
    (run,) = store.runs()
    assert {st.stage: st.status for st in run.stages} == {"tokenizer": "finished", "evaluate": "running"}


def test_run_status_rules():
    assert run_status([]) == "pending"
    assert run_status(["finished", "finished"]) == "finished"
    assert run_status(["finished", "running", "pending"]) == "running"
    assert run_status(["failed", "running"]) == "failed"
    assert run_status(["finished", "preempted"]) == "preempted"


def test_outdated_or_missing_schema_is_a_clear_error(db_url):
    store = Store(db_url)
    with pytest.raises(SchemaError, match="orchestrate db upgrade"):
        store.runs()
    store.upgrade("0001")
    with pytest.raises(SchemaError, match="revision 0001.*orchestrate db upgrade"):
        store.check_schema()
    store.upgrade()
    assert store.current_revision() == store.head_revision() == head_revision()
    store.check_schema()
    store.dispose()


def test_head_revision_matches_alembic():
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from orchestrator.db.store import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert head_revision() == ScriptDirectory.from_config(cfg).get_current_head()


def test_sqlite_pragmas_wal_on_local_disk(sqlite_url, tmp_path):
    store = Store(sqlite_url)
    store.upgrade()
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        expected = "delete" if is_network_fs(tmp_path) else "wal"
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == expected
    store.dispose()
    raw = sqlite3.connect(tmp_path / "results.db")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == expected  # persisted in the file
    raw.close()


def test_filesystem_detection(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\n"
                      "sshfs#x /mnt/fuse fuse.sshfs rw 0 0\n")
    assert _fs_type(tmp_path / "x", mounts) == "ext4"
    assert _fs_type(Path("/home/u/proj"), mounts) == "nfs4"
    assert is_network_fs(Path("/home/u"), mounts)
    assert is_network_fs(Path("/mnt/fuse/d"), mounts)
    assert not is_network_fs(Path("/homework"), mounts)  # prefix is not a parent
