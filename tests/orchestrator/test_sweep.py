"""Sweep files: expansion and validation (every problem reported, naming file, run and key)."""
from __future__ import annotations

import pytest
import yaml

from core.config import load_config
from orchestrator.identity import run_key
from orchestrator.cli import main
from orchestrator.sweep import load_sweep
from sweep_fixture import errors_of

STAGES = {"selftest": {"needs": []}, "echo": {"needs": ["selftest"]}}


def write(tmp_path, **fields):
    doc = {"name": "t", "base": {"data": {"image_size": 32}}, "stages": STAGES, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_product_zip_and_seeds_expand_in_order(tmp_path):
    path = write(tmp_path, axes={"model.patch_size": [8, 4], "model.decoder_size": ["micro", "mini"]},
                 zip=[{"model.split_depth": [2, 4], "ssl.method": ["ibot", "none"]}], seeds=[0, 1])
    sweep = load_sweep(path)
    assert len(sweep.runs) == 2 * 2 * 2 * 2
    first = sweep.runs[0]
    assert first.params == {"model.patch_size": 8, "model.decoder_size": "micro", "model.split_depth": 2,
                            "ssl.method": "ibot", "train.seed": 0}
    assert first.config.model.patch_size == 8 and first.config.train.seed == 0
    # zipped keys vary together, never crossed
    assert {(r.params["model.split_depth"], r.params["ssl.method"]) for r in sweep.runs} == {(2, "ibot"), (4, "none")}
    # identity = hash of the resolved config's non-default keys, independent of the sweep code
    ref = load_config({"data": {"image_size": 32}}, overrides=first.params)
    assert first.run_hash == run_key(ref)
    assert len({r.run_hash for r in sweep.runs}) == len(sweep.runs)
    assert sweep.stage_order == ["selftest", "echo"]


def test_duplicate_grid_points_collapse_to_one_run(tmp_path):
    # split_depth None and 4 are both "vanilla" for micro, but they are different configs;
    # the same value listed twice is the same run.
    sweep = load_sweep(write(tmp_path, axes={"model.patch_size": [4, 4, 8]}))
    assert len(sweep.runs) == 2


def test_unknown_keys_at_every_depth_are_all_reported(tmp_path):
    path = write(tmp_path, colour="red",
                 stages={"selftest": {"needs": [], "resources": {"gpu": 1}}},
                 axes={"model.patch": [4]})
    errs = errors_of(path)
    text = "\n".join(errs)
    assert str(path) in text
    assert "key 'colour': unknown key" in text
    assert "key 'stages.selftest.resources.gpu': unknown key" in text


def test_unknown_config_key_in_axis_names_run_and_key(tmp_path):
    errs = errors_of(write(tmp_path, axes={"model.patch": [4, 8]}))
    assert len(errs) == 2  # one per run
    assert all("run [model.patch=" in e and "key 'model.patch': unknown key" in e for e in errs)


def test_wrong_types_empty_axes_unequal_zip_missing_dep_and_cycle(tmp_path):
    path = write(tmp_path, max_parallel="many", axes={"model.patch_size": []},
                 zip=[{"model.split_depth": [0, 2], "ssl.method": ["ibot"]}],
                 stages={"selftest": {"needs": ["echo"]}, "echo": {"needs": ["selftest", "nope"]}})
    text = "\n".join(errors_of(path))
    assert "key 'max_parallel'" in text  # schema errors come first, alone
    path = write(tmp_path, axes={"model.patch_size": []},
                 zip=[{"model.split_depth": [0, 2], "ssl.method": ["ibot"]}],
                 stages={"selftest": {"needs": ["echo"]}, "echo": {"needs": ["selftest", "nope"]}})
    errs = errors_of(path)
    text = "\n".join(errs)
    assert "key 'axes.model.patch_size': empty axis" in text
    assert "key 'zip[0]': zipped lists have unequal lengths" in text
    assert "key 'stages.echo.needs': depends on missing stage 'nope'" in text
    assert "dependency cycle" in text
    assert len(errs) >= 4


def test_impossible_model_combinations_name_run_and_key(tmp_path):
    path = write(tmp_path, axes={"model.patch_size": [4, 5]}, zip=[{"model.split_depth": [2, 9]}])
    errs = errors_of(path)
    text = "\n".join(errs)
    # patch 5 does not divide 32 (both split depths), k=9 > depth 4 of micro (patch 4)
    assert f"{path}: run [model.patch_size=5, model.split_depth=2]: key 'model.patch_size'" in text
    assert f"{path}: run [model.patch_size=4, model.split_depth=9]: key 'model.split_depth'" in text
    assert len(errs) == 3


def test_unknown_stage_and_search_conflicts(tmp_path):
    path = write(tmp_path, stages={"train_everything": {"needs": []}},
                 axes={"model.patch_size": [4]},
                 search={"params": {"x": {"key": "loss.ssl", "low": 1, "high": 0}}, "objective": "objective",
                         "n_trials": 2, "stage": "missing"})
    text = "\n".join(errors_of(path))
    assert "key 'stages.train_everything': unknown stage" in text
    assert "a search sweep takes no axes" in text
    assert "key 'search.params.x': low=1.0 must be < high=0.0" in text
    assert "key 'search.stage'" in text


def test_cli_rejects_invalid_sweep_with_exit_2_and_leaves_no_database(tmp_path, capsys):
    path = write(tmp_path, axes={"model.patch_size": [5]})
    db = tmp_path / "r.db"
    assert main(["submit", str(path), "--db", f"sqlite:///{db}"]) == 2
    err = capsys.readouterr().err
    assert "key 'model.patch_size'" in err and str(path) in err
    assert not db.exists()
    assert not (tmp_path / "runs").exists()
