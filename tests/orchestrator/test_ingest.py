"""Result files and their ingestion: idempotent, superseding, bad files skipped and reported,
concurrent writers and ingesters (SQLite and a real PostgreSQL server)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator.db import Store
from orchestrator.db.models import Artifact, IngestedFile, Metric, Param, Run, RunStage, Sweep
from orchestrator.ingest import ingest
from orchestrator.results import (ResultFileError, make_payload, read_result_file, result_path,
                                  write_result_file)

REPO = Path(__file__).resolve().parents[2]


def count(store, model, *where) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


# ----------------------------------------------------------------------------- result files


def test_result_file_round_trip_and_immutability(tmp_path, payload):
    p = payload("a" * 16, "evaluate", 2, error={"type": "ValueError", "message": "x", "log_tail": "l"},
                       artifacts=[{"kind": "checkpoint", "path": "/c.pt"}], slurm_job_id="9_1", host="n1")
    path = write_result_file(tmp_path / "run", "evaluate", 2, p)
    assert path == tmp_path / "run/results/evaluate.attempt2.json" == result_path(tmp_path / "run", "evaluate", 2)
    assert read_result_file(path) == p
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]  # temp file renamed away
    with pytest.raises(ResultFileError, match="immutable"):
        write_result_file(tmp_path / "run", "evaluate", 2, p)
    with pytest.raises(ResultFileError, match="do not match"):
        write_result_file(tmp_path / "run", "evaluate", 3, p)


@pytest.mark.parametrize("mutate, key", [
    (lambda p: p.pop("run_hash"), "run_hash"),
    (lambda p: p.update(status="done"), "status"),
    (lambda p: p.update(attempt=0), "attempt"),
    (lambda p: p.update(schema_version=99), "schema_version"),
    (lambda p: p.update(started_at="yesterday"), "started_at"),
    (lambda p: p["metrics"].append({"name": "psnr", "value": "high"}), "metrics[1].value"),
    (lambda p: p["params"].update(bad=[1, 2]), "params.bad"),
])
def test_invalid_payload_names_file_and_key(tmp_path, mutate, key, payload):
    p = payload("a" * 16)
    mutate(p)
    path = tmp_path / "tokenizer.attempt1.json"
    path.write_text(json.dumps(p))
    with pytest.raises(ResultFileError) as e:
        read_result_file(path)
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value)


# ----------------------------------------------------------------------------- ingestion


def test_ingest_is_idempotent(store, write_result, tmp_path):
    for i in range(3):
        write_result(f"{i:016x}", metrics=[{"name": "psnr", "value": float(i), "step": 5},
                                           {"name": "ssim", "value": 0.5, "step": 5, "backbone": None}],
                     params={"model.patch_size": 4 + i, "loss.ssl": 0.1, "ssl.method": "ibot"},
                     artifacts=[{"kind": "checkpoint", "path": f"/ck{i}.pt"}])
    r = ingest(store, [tmp_path / "runs"])
    assert (r.loaded, r.skipped_duplicate, r.superseded, r.errors) == (3, 0, 0, [])
    snapshot = [count(store, m) for m in (Sweep, Run, RunStage, Param, Metric, Artifact, IngestedFile)]
    assert snapshot == [1, 3, 3, 9, 6, 3, 3]
    r = ingest(store, [tmp_path / "runs"])
    assert (r.loaded, r.skipped_duplicate, r.superseded, r.errors) == (0, 3, 0, [])
    assert [count(store, m) for m in (Sweep, Run, RunStage, Param, Metric, Artifact, IngestedFile)] == snapshot
    # a copy of a loaded file elsewhere is the same attempt: a duplicate, not a second load
    copy = tmp_path / "copy" / "results" / "tokenizer.attempt1.json"
    copy.parent.mkdir(parents=True)
    copy.write_bytes((tmp_path / "runs/s1" / ("0" * 16) / "results/tokenizer.attempt1.json").read_bytes())
    r = ingest(store, [copy])
    assert (r.loaded, r.skipped_duplicate) == (0, 1)
    (run,) = [x for x in store.runs() if x.run_hash == "0" * 16]
    assert run.status == "finished" and run.host is None and run.stage == "tokenizer"
    with store.session() as s:
        p = s.scalars(select(Param).where(Param.run_id == run.id, Param.key == "model.patch_size")).one()
        assert (p.kind, p.value_int) == ("int", 4)


@pytest.mark.parametrize("order", ["in_order", "reversed", "one_batch"])
def test_later_attempt_supersedes_earlier(store, write_result, tmp_path, order):
    h = "e" * 16
    p1 = write_result(h, "tokenizer", 1, status="preempted",
                      metrics=[{"name": "train_loss", "value": 9.0, "step": 10}], slurm_job_id="7_0")
    p2 = write_result(h, "tokenizer", 2, status="finished",
                      metrics=[{"name": "train_loss", "value": 1.0, "step": 20},
                               {"name": "gflops_total", "value": 3.5, "step": None}], slurm_job_id="8_0")
    if order == "one_batch":
        r = ingest(store, [p2, p1])
        assert (r.loaded, r.superseded) == (2, 1)  # one batch: applied oldest attempt first
    else:
        first, second = (p1, p2) if order == "in_order" else (p2, p1)
        ingest(store, [first])
        r = ingest(store, [second])
        assert (r.loaded, r.superseded) == ((1, 1) if order == "in_order" else (0, 1))
    with store.session() as s:
        rows = s.execute(select(Metric.name, Metric.value, Metric.attempt).order_by(Metric.name)).all()
        st = s.scalars(select(RunStage)).one()
    assert [tuple(r) for r in rows] == [("gflops_total", 3.5, 2), ("train_loss", 1.0, 2)]
    assert (st.status, st.attempt, st.result_attempt, st.slurm_job_id) == ("finished", 2, 2, "8_0")
    (run,) = store.runs()
    assert (run.status, run.attempts) == ("finished", 2)
    assert count(store, IngestedFile) == 2


def test_submitter_state_of_a_newer_attempt_is_kept(store, write_result, tmp_path):
    h = "d" * 16
    store.upsert_run(h, "s1", {"x": 1}, stages=["tokenizer"])
    store.set_stage_state(h, "tokenizer", "running", attempt=2, slurm_job_id="11_0")
    ingest(store, [write_result(h, "tokenizer", 1, status="preempted")])  # late file of the old attempt
    (run,) = store.runs()
    assert run.stages[0].status == "running" and run.stages[0].attempt == 2 and run.status == "running"
    assert count(store, Metric) == 1  # its data is loaded until attempt 2 reports


def test_failed_result_records_error_tail(store, write_result):
    h = "f" * 16
    path = write_result(h, "evaluate", 1, status="failed", metrics=[],
                        error={"type": "RuntimeError", "message": "CUDA OOM", "log_tail": "line1\nline2"})
    ingest(store, [path])
    (run,) = store.runs()
    assert run.status == "failed"
    assert run.error_tail.startswith("RuntimeError: CUDA OOM") and run.error_tail.endswith("line2")
    assert run.stages[0].error_tail == run.error_tail


def test_corrupt_and_conflicting_files_are_skipped_and_reported(store, write_result, tmp_path, payload):
    good = [write_result(f"{i:016x}") for i in range(3)]
    truncated = good[1].parent.parent.parent / ("9" * 16) / "results" / "tokenizer.attempt1.json"
    truncated.parent.mkdir(parents=True)
    truncated.write_text(good[0].read_text()[:50])
    wrong = truncated.with_name("evaluate.attempt1.json")
    wrong.write_text(json.dumps(payload("9" * 16, "evaluate", status="bogus")))
    r = ingest(store, [tmp_path / "runs"])
    assert r.loaded == 3 and sorted(p for p, _ in r.errors) == sorted([str(truncated), str(wrong)])
    reasons = dict(r.errors)
    assert "not valid JSON" in reasons[str(truncated)] and "'status'" in reasons[str(wrong)]
    assert count(store, Run) == 3 and count(store, Metric) == 3  # nothing else lost
    # same attempt, different content: reported, the loaded data stays
    other = tmp_path / "elsewhere" / "results" / "tokenizer.attempt1.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps(payload("0" * 16, metrics=[{"name": "psnr", "value": -1.0, "step": 1}])))
    r = ingest(store, [other])
    assert r.loaded == 0 and "immutable" in r.errors[0][1] and str(good[0].resolve()) in r.errors[0][1]
    with store.session() as s:
        assert -1.0 not in s.scalars(select(Metric.value)).all()


def test_every_result_file_of_a_real_config(store, tmp_path, real_config, payload):
    h, cfg = real_config(8, seed=3)
    p = payload(h, "tokenizer", 1, config=cfg, params={"model.patch_size": 8, "train.seed": 3})
    write_result_file(tmp_path / "runs/s1" / h, "tokenizer", 1, p)
    ingest(store, [tmp_path / "runs"])
    (run,) = store.runs(with_config=True)
    assert run.config == cfg and run.run_hash == h


# ----------------------------------------------------------------------------- concurrency


def _writer(root: str, i: int) -> None:
    h = f"{i:016x}"
    write_result_file(os.path.join(root, "s1", h), "tokenizer", 1, make_payload(
        run_hash=h, sweep="s1", stage="tokenizer", attempt=1, status="finished", started_at="2026-01-01T00:00:00",
        ended_at="2026-01-01T00:01:00", config={"i": i}, params={"i": i},
        metrics=[{"name": "psnr", "value": float(i), "step": 1}, {"name": "ssim", "value": 0.5, "step": 1}]))


def _ingester(url: str, root: str, stop, errors) -> None:
    store = Store(url)
    try:
        while True:
            done = stop.is_set()
            r = ingest(store, [root], batch_size=16)
            errors.extend(r.errors)
            if done:
                return
    finally:
        store.dispose()


def test_64_writers_while_two_ingesters_run(store, tmp_path):
    """Every result ends up in the database exactly once."""
    root = str(tmp_path / "runs")
    os.makedirs(root)
    ctx = mp.get_context("fork")
    stop, errors = ctx.Event(), ctx.Manager().list()
    ingesters = [ctx.Process(target=_ingester, args=(store.url, root, stop, errors)) for _ in range(2)]
    for p in ingesters:
        p.start()
    writers = [ctx.Process(target=_writer, args=(root, i)) for i in range(64)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
    assert all(p.exitcode == 0 for p in writers)
    stop.set()
    for p in ingesters:
        p.join(120)
    assert [p.exitcode for p in ingesters] == [0, 0] and list(errors) == []
    ingest(store, [root])  # anything written after the last pass
    assert count(store, Run) == 64 and count(store, IngestedFile) == 64 and count(store, RunStage) == 64
    assert count(store, Metric) == 128 and count(store, Sweep) == 1 and count(store, Param) == 64
    with store.session() as s:
        values = sorted(s.scalars(select(Metric.value).where(Metric.name == "psnr")))
    assert values == [float(i) for i in range(64)]


# ----------------------------------------------------------------------------- CLI


def cli(*args, cwd=None, env=None):
    """The installed console entry, in a subprocess (one test; the others run in-process)."""
    return subprocess.run([sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())",
                           *args], capture_output=True, text=True, cwd=cwd or REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=300)


def test_cli_ingest(tmp_path, write_result, run_cli):
    write_result("1" * 16)
    url = f"sqlite:///{tmp_path}/cli.db"
    out = run_cli("ingest", str(tmp_path / "runs"), "--db", url)
    assert out.returncode == 0 and "loaded 1" in out.stdout, out.stderr
    out = cli("ingest", cwd=tmp_path, env={"ORCHESTRATE_DB": url})  # default: ./runs, $ORCHESTRATE_DB
    assert out.returncode == 0 and "duplicates 1" in out.stdout, out.stderr
    bad = tmp_path / "runs/s1" / ("2" * 16) / "results/tokenizer.attempt1.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{")
    out = run_cli("ingest", "--db", url, str(tmp_path / "runs"))
    assert out.returncode == 1 and str(bad) in out.stderr and "errors 1" in out.stdout
    out = run_cli("ingest", "--db", url, str(tmp_path / "nope"))
    assert out.returncode == 2 and "nope" in out.stderr


def _hostile_files(payload) -> dict[str, str]:
    """name -> JSON text of result files that must be skipped (each for its own reason)."""
    good = json.dumps(payload("b" * 16))

    def edit(fn) -> str:
        p = payload("b" * 16)
        fn(p)
        return json.dumps(p)

    return {
        "int65_step": good.replace('"step": 10', '"step": 99999999999999999999999'),
        "int65_config": edit(lambda p: p["config"]["train"].update(seed=2**70)),
        "int65_param": edit(lambda p: p["params"].update({"model.patch_size": -2**64})),
        "nul_host": edit(lambda p: p.update(host="node\x00one")),
        "nul_metric_name": edit(lambda p: p["metrics"][0].update(name="ps\x00nr")),
        "nul_config_key": edit(lambda p: p["config"].update({"a\x00b": 1})),
        "nan_config": edit(lambda p: p["config"]["train"].update(lr=float("nan"))),
        "inf_param": edit(lambda p: p["params"].update(x=float("inf"))),
        "nan_step": good.replace('"step": 10', '"step": NaN'),
        "surrogate_sweep": good.replace('"sweep": "s1"', '"sweep": "s\\ud800"'),
        "truncated": good[: len(good) // 2],
        "wrong_type": edit(lambda p: p.update(attempt="1")),
        "deep": good.replace('"info": {}', '"info": ' + "[" * 100_000 + "]" * 100_000),
        "deep_config": edit(lambda p: p["config"].update(x=json.loads("[" * 200 + "]" * 200))),
        "not_object": "[1, 2, 3]",
        "binary": "\udcff",
    }


def test_hostile_result_files_are_reported_and_skipped(store, write_result, tmp_path, payload):
    """One bad file never stops an ingest (nor status/submit, which ingest): every bad file is
    named with its reason, every good file loads, on SQLite and PostgreSQL."""
    good = [write_result(f"{i:016x}") for i in range(3)]
    bad = {}
    for i, (name, text) in enumerate(_hostile_files(payload).items()):
        path = tmp_path / "runs" / "s1" / f"{i + 100:016x}" / "results" / "tokenizer.attempt1.json"
        path.parent.mkdir(parents=True)
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        bad[str(path)] = name
    huge = tmp_path / "runs" / "s1" / ("e" * 16) / "results" / "tokenizer.attempt1.json"
    huge.parent.mkdir(parents=True)
    with open(huge, "wb") as fh:  # 100 GiB (sparse): read no further than the cap
        fh.truncate(100 * 2**30)
    bad[str(huge)] = "huge"
    r = ingest(store, [tmp_path / "runs"])
    reasons = dict(r.errors)
    assert sorted(reasons) == sorted(bad), [(bad.get(p, p), why.rsplit(": ", 2)[-2:]) for p, why in r.errors]
    assert r.loaded == 3
    assert "64 bits" in reasons[next(p for p, n in bad.items() if n == "int65_config")]
    assert "'config.train.seed'" in reasons[next(p for p, n in bad.items() if n == "int65_config")]
    assert "NUL" in reasons[next(p for p, n in bad.items() if n == "nul_host")]
    assert "only in a metric value" in reasons[next(p for p, n in bad.items() if n == "nan_config")]
    assert "MiB" in reasons[str(huge)]
    assert count(store, Run) == 3 and count(store, Metric) == 3 and count(store, IngestedFile) == 3
    again = ingest(store, [tmp_path / "runs"])  # the next status/submit: same report, nothing recorded
    assert sorted(p for p, _ in again.errors) == sorted(bad) and again.skipped_duplicate == 3
    assert count(store, IngestedFile) == 3
    # NaN stays legal where it means something: a diverged run's metric value
    write_result("d" * 16, metrics=[{"name": "train_loss", "value": float("nan"), "step": 5}])
    assert ingest(store, [tmp_path / "runs" / "s1" / ("d" * 16)]).loaded == 1


def test_values_the_driver_cannot_bind_are_reported_not_raised(store, tmp_path, payload, monkeypatch):
    """Past validation, a file the database refuses costs only itself (no traceback)."""
    import orchestrator.ingest as ing

    monkeypatch.setattr(ing, "validate_payload", lambda p, origin: None)  # let a 65-bit int reach the driver
    p = payload("c" * 16, metrics=[{"name": "psnr", "value": 1.0, "step": 2**70}])
    path = tmp_path / "x" / "results" / "tokenizer.attempt1.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(p))
    ok = tmp_path / "y" / "results" / "tokenizer.attempt1.json"
    ok.parent.mkdir(parents=True)
    ok.write_text(json.dumps(payload("a" * 16)))
    r = ingest(store, [tmp_path / "x", tmp_path / "y"])
    assert r.loaded == 1 and [p for p, _ in r.errors] == [str(path)] and "cannot be stored" in r.errors[0][1]
