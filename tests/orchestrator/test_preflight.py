"""Preflight: the paths runs will read exist and are readable (errors, or warnings with
`preflight: warn`), checked per distinct value and only for keys a stage of the sweep reads."""
from __future__ import annotations

import os

import pytest
import yaml

from orchestrator.preflight import preflight
from orchestrator.sweep import load_sweep

STAGES = {"tokenizer": {}, "evaluate": {"needs": ["tokenizer"]}}


def sweep_of(tmp_path, base, stages=STAGES, **fields):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "base": base, "stages": stages, **fields}))
    return load_sweep(path)


def imagefolder(root, splits=("train", "val")):
    for s in splits:
        (root / s / "n01").mkdir(parents=True)
    return str(root)


def test_data_root_needs_train_and_val(tmp_path):
    base = {"data": {"name": "imagefolder", "root": str(tmp_path / "nowhere")}}
    (p,) = preflight(sweep_of(tmp_path, base))
    assert (p.level, p.key) == ("error", "data.root") and "does not exist" in p.message and p.runs == ("[base]",)
    base["data"]["root"] = imagefolder(tmp_path / "half", ("train",))
    (p,) = preflight(sweep_of(tmp_path, base))
    assert p.key == "data.root" and "no val/ folder" in p.message
    base["data"]["root"] = imagefolder(tmp_path / "imnet")
    assert preflight(sweep_of(tmp_path, base)) == []


def test_weight_files_each_named_by_key(tmp_path):
    good = tmp_path / "inception.pt"
    good.write_bytes(b"x")
    base = {"eval": {"inception_weights": str(tmp_path / "missing.pt")},
            "loss": {"lpips_weights": str(tmp_path)},  # a folder, not a file
            "finetune": {"dino_weights": str(tmp_path / "dino.pt")}}  # no finetune stage: not read
    problems = preflight(sweep_of(tmp_path, base, axes={"train.seed": [0, 1]}))
    assert [(p.level, p.key) for p in problems] == [("error", "eval.inception_weights"), ("error", "loss.lpips_weights")]
    assert "does not exist" in problems[0].message and len(problems[0].runs) == 2  # one problem per value
    assert "is not a file" in problems[1].message
    base = {"eval": {"inception_weights": str(good)}}
    assert preflight(sweep_of(tmp_path, base)) == []
    # a tokenizer-only sweep does not read the Inception weights
    assert preflight(sweep_of(tmp_path, {"eval": {"inception_weights": "/nope.pt"}}, stages={"tokenizer": {}})) == []


def test_finetune_keys_and_init_from(tmp_path):
    stages = {"tokenizer": {}, "finetune": {"needs": ["tokenizer"]}}
    problems = preflight(sweep_of(tmp_path, {"finetune": {"dino_weights": "/no/dino.pt"}}, stages=stages))
    assert [p.key for p in problems] == ["finetune.dino_weights"]
    base = {"finetune": {"enabled": True, "init_from": str(tmp_path / "joint")}}
    (p,) = preflight(sweep_of(tmp_path, base, stages={"tokenizer": {}}))
    assert p.key == "finetune.init_from" and "does not exist" in p.message
    (tmp_path / "joint").mkdir()
    assert preflight(sweep_of(tmp_path, base, stages={"tokenizer": {}})) == []


def test_warn_mode_for_paths_on_compute_nodes_only(tmp_path):
    base = {"data": {"name": "imagefolder", "root": "/cluster/only/imagenet"},
            "eval": {"inception_weights": "/cluster/only/pt_inception.pth"}}
    problems = preflight(sweep_of(tmp_path, base, preflight="warn"))
    assert {p.level for p in problems} == {"warning"} and {p.key for p in problems} == {
        "data.root", "eval.inception_weights"}
    assert "warning: key 'data.root': /cluster/only/imagenet does not exist" in str(problems[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file(tmp_path):
    f = tmp_path / "w.pt"
    f.write_bytes(b"x")
    f.chmod(0)
    (p,) = preflight(sweep_of(tmp_path, {"eval": {"inception_weights": str(f)}}))
    assert "not readable" in p.message


def test_selftest_sweeps_read_nothing(tmp_path):
    assert preflight(sweep_of(tmp_path, {"data": {"name": "imagefolder", "root": "/x"}},
                              stages={"selftest": {}})) == []


def test_shipped_paper_sweeps_name_their_missing_paths():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    problems = preflight(load_sweep(repo / "sweeps" / "token_scaling.yaml"))
    assert "data.root" in {p.key for p in problems}
    assert preflight(load_sweep(repo / "sweeps" / "quickstart.yaml")) == []


def test_submit_stops_at_preflight_before_anything_is_written(tmp_path, run_cli):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "base": {"data": {"name": "imagefolder", "root": "/no/imagenet"}},
                                    "stages": STAGES, "executor": "local"}))
    url = f"sqlite:///{tmp_path}/r.db"
    out = run_cli("submit", path, "--db", url)
    assert out.returncode == 2 and "key 'data.root'" in out.stderr and str(path) in out.stderr, out.stderr
    assert not list((tmp_path / "runs").rglob("run.json"))  # no run directory written (a lock file may be)
    if (tmp_path / "r.db").exists():
        from orchestrator.db import Store

        store = Store(url)
        assert store.runs() == []
        store.dispose()
