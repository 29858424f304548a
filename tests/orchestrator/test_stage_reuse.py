"""Stage identities end to end with the real stages on a tiny config (debug executor): a change
that only a downstream stage reads re-runs that stage and reuses the finished tokenizer on
disk; the dry-run says per run and stage what it reuses, runs or re-runs and why; a protocol
bump re-runs only that stage; a longer tokenizer is a new one; a longer generator continues."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from orchestrator import identity
from orchestrator.cli import main
from orchestrator.db.store import Store
from orchestrator.query import runs_table

BASE = {
    "data": {"image_size": 32, "train_size": 64, "val_size": 64, "batch_size": 8},
    "model": {"latent_channels": 8, "patch_size": 8},
    "loss": {"perceptual": 0.0},
    "train": {"steps": 2, "ckpt_every": 2, "device": "cpu", "log_every": 1},
    "eval": {"num_samples": 16, "probe_train": 64, "probe_val": 64, "batch_size": 16},
    "generator": {"steps": 2, "batch_size": 8, "num_samples": 16, "sample_steps": 2, "time_shift": 1.0},
}


def write_sweep(tmp_path, name="reuse", stages=("tokenizer", "evaluate"), **changes):
    base = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        section, leaf = key.split("__")
        base[section][leaf] = value
    needs = {"tokenizer": [], "evaluate": ["tokenizer"], "generator": ["tokenizer"]}
    doc = {"name": name, "base": base, "stages": {s: {"needs": needs[s]} for s in stages},
           "executor": "debug", "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def plan(path, url, run_cli):
    out = run_cli("submit", path, "--db", url, "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def steps_of(doc):
    """{stage: (action, reason)} of the one run of a plan (to run or skipped)."""
    runs = doc["runs"] or [{"steps": s} for s in doc["skipped_steps"].values()]
    (run,) = runs
    return {st: (s["action"], s["reason"]) for st, s in run["steps"].items()}


def mtimes(directory):
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def test_downstream_change_reuses_the_tokenizer_and_the_plan_says_why(tmp_path, run_cli, monkeypatch):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    first = write_sweep(tmp_path)
    assert run_cli("submit", first, "--db", url).returncode == 0
    store = Store(url)
    (a,) = store.runs(sweep="reuse")
    assert a.status == "finished"
    tok_dir = tmp_path / "runs" / "reuse" / a.run_hash / "tokenizer"
    before = mtimes(tok_dir)

    # re-submitting the finished sweep plans nothing
    doc = plan(first, url, run_cli)
    assert doc["runs"] == [] and doc["arrays"] == []
    assert {st: act for st, (act, _) in steps_of(doc).items()} == {"tokenizer": "reuse", "evaluate": "reuse"}

    # eval.num_samples changed: only evaluate runs, with the tokenizer from the first run's directory
    changed = write_sweep(tmp_path, eval__num_samples=32)
    doc = plan(changed, url, run_cli)
    steps = steps_of(doc)
    assert steps["tokenizer"][0] == "reuse" and str(tok_dir) in steps["tokenizer"][1]
    assert steps["evaluate"][0] == "re-run" and "eval.num_samples 16 -> 32" in steps["evaluate"][1]
    assert [(arr["stage"], arr["size"]) for arr in doc["arrays"]] == [("evaluate", 1)]
    text = run_cli("submit", changed, "--db", url, "--dry-run").stdout
    assert "tokenizer: 1 reuse" in text and "evaluate: 1 re-run" in text

    assert run_cli("submit", changed, "--db", url).returncode == 0
    runs = {r.run_hash: r for r in store.runs(sweep="reuse")}
    assert len(runs) == 2 and all(r.status == "finished" for r in runs.values())
    (b,) = [r for h, r in runs.items() if h != a.run_hash]
    assert not (tmp_path / "runs" / "reuse" / b.run_hash / "tokenizer").exists()  # trained once, on disk once
    assert mtimes(tok_dir) == before
    ev = json.loads((tmp_path / "runs" / "reuse" / b.run_hash / "evaluate" / "result.json").read_text())
    assert {"kind": "tokenizer", "path": str(tok_dir.resolve())} in ev["artifacts"]
    stages = {st.stage: st for st in b.stages}
    own = {st.stage: st for st in a.stages}
    assert stages["tokenizer"].source_id == own["tokenizer"].id and stages["tokenizer"].status == "finished"
    assert stages["tokenizer"].dir == str(tok_dir) and stages["evaluate"].source_id is None

    # the one-row-per-run table: both runs carry the shared tokenizer's metrics
    table = runs_table(store, sweep="reuse").set_index("run_hash")
    assert table.loc[b.run_hash, "eval.num_samples"] == 32
    tok_metric = "tokenizer_train_time_s" if "tokenizer_train_time_s" in table else "train_loss"
    assert table.loc[a.run_hash, tok_metric] == table.loc[b.run_hash, tok_metric]
    out = run_cli("status", "reuse", "--db", url, "--no-refresh").stdout
    assert "1 stage(s) reused from other runs" in out and "tokenizer:reused" in out

    # a second sweep with the same grid point plans nothing and records it
    other = write_sweep(tmp_path, name="other", eval__num_samples=32)
    assert {a for a, _ in steps_of(plan(other, url, run_cli)).values()} == {"reuse"}

    # a protocol bump of evaluate re-runs evaluate only, and says so
    monkeypatch.setitem(identity.VERSIONS, "evaluate", identity.VERSIONS["evaluate"] + 1)
    steps = steps_of(plan(changed, url, run_cli))
    assert steps["tokenizer"][0] == "reuse"
    assert steps["evaluate"][0] == "re-run" and "protocol version 1 -> 2" in steps["evaluate"][1]
    monkeypatch.undo()

    # a longer tokenizer is a new stage (its cosine schedule spans train.steps): everything re-runs
    longer = write_sweep(tmp_path, train__steps=4)
    steps = steps_of(plan(longer, url, run_cli))
    assert steps["tokenizer"][0] == "re-run"
    assert "train.steps 2 -> 4" in steps["tokenizer"][1] and "cosine" in steps["tokenizer"][1]
    assert steps["evaluate"][0] == "re-run" and "upstream tokenizer changed" in steps["evaluate"][1]
    store.dispose()


def test_a_changed_weight_file_is_a_changed_evaluation(tmp_path, run_cli):
    """A file a stage reads is part of its identity by content, not by path."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"one")
    flat = {"eval.fid_reference": str(ref)}
    full = {"eval.fid_reference": str(ref), "generator.steps": 2}
    order, needs = ["tokenizer", "generator"], {"tokenizer": [], "generator": ["tokenizer"]}
    k1 = identity.stage_keys(flat, full, order, needs, {})
    moved = tmp_path / "moved.npz"
    os.replace(ref, moved)
    k2 = identity.stage_keys({"eval.fid_reference": str(moved)}, {**full, "eval.fid_reference": str(moved)},
                             order, needs, {})
    assert k2["generator"].identity == k1["generator"].identity  # same content elsewhere: same stage
    moved.write_bytes(b"two")
    k3 = identity.stage_keys({"eval.fid_reference": str(moved)}, {**full, "eval.fid_reference": str(moved)},
                             order, needs, {})
    assert k3["generator"].identity != k1["generator"].identity
    assert k3["tokenizer"].identity == k1["tokenizer"].identity
    assert "file eval.fid_reference: content" in identity.why_different(k1["generator"].inputs,
                                                                        k3["generator"].inputs)


@pytest.mark.slow
def test_a_longer_generator_continues_and_evaluates_only_the_new_points(tmp_path, run_cli):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    short = write_sweep(tmp_path, stages=("tokenizer", "generator"))
    assert run_cli("submit", short, "--db", url).returncode == 0
    store = Store(url)
    (a,) = store.runs(sweep="reuse")
    assert a.status == "finished"
    longer = write_sweep(tmp_path, stages=("tokenizer", "generator"), generator__steps=4, generator__eval_at=[3])
    steps = steps_of(plan(longer, url, run_cli))
    assert steps["tokenizer"][0] == "reuse"
    assert steps["generator"] == ("extend", "continues from step 2 to 4, evaluates at [3, 4]")
    assert run_cli("submit", longer, "--db", url).returncode == 0
    (b,) = [r for r in store.runs(sweep="reuse") if r.run_hash != a.run_hash]
    assert b.status == "finished"
    gen = tmp_path / "runs" / "reuse" / b.run_hash / "generator"
    result = json.loads(gen.joinpath("result.json").read_text())
    gfid_steps = [m["step"] for m in result["metrics"] if m["name"] == "gfid"]
    assert gfid_steps == [2, 3, 4]  # the whole history: 2 from the shorter run, 3 and 4 new
    logged = [json.loads(line) for line in gen.joinpath("log.jsonl").read_text().splitlines()]
    trained = [row["step"] for row in logged if "loss" in row]
    assert trained.count(1) == 1 and trained.count(2) == 1  # steps 1-2 were not trained again
    a_gen = json.loads((tmp_path / "runs" / "reuse" / a.run_hash / "generator" / "result.json").read_text())
    assert [m["step"] for m in a_gen["metrics"] if m["name"] == "gfid"] == [2]  # the shorter one is untouched
    store.dispose()


def test_two_runs_of_one_submission_share_one_tokenizer(tmp_path, run_cli):
    """Grid points that differ only in what evaluation reads: one tokenizer job, both
    evaluations wait for it (Slurm: afterok on its array; debug/local: a later wave)."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    path = write_sweep(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["axes"] = {"eval.num_samples": [16, 32]}
    path.write_text(yaml.safe_dump(doc))
    out = run_cli("submit", path, "--db", url, "--dry-run", "--json", "--executor", "slurm")
    plan_doc = json.loads(out.stdout)
    assert [(a["stage"], a["size"]) for a in plan_doc["arrays"]] == [("tokenizer", 1), ("evaluate", 2)]
    assert plan_doc["arrays"][1]["depends_on"] == [{"array": 0, "type": "afterok"}]
    assert plan_doc["actions"]["tokenizer"] == {"run": 1, "shared": 1}
    assert run_cli("submit", path, "--db", url).returncode == 0
    store = Store(url)
    runs = store.runs(sweep="reuse")
    assert len(runs) == 2 and all(r.status == "finished" for r in runs)
    assert len(list((tmp_path / "runs" / "reuse").glob("*/tokenizer/checkpoints"))) == 1  # trained once
    assert len(list((tmp_path / "runs" / "reuse").glob("*/evaluate/result.json"))) == 2
    assert sorted(st.source_id is not None for r in runs for st in r.stages if st.stage == "tokenizer") == [False, True]
    store.dispose()
