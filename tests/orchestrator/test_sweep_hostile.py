"""Sweep files that are impossible or hostile are refused before anything runs: undeclared
stage inputs, oversized grids, YAML alias bombs, control characters that would reach sbatch,
names that leave runs_dir.  Exit 2, nothing submitted, the database unchanged."""
from __future__ import annotations

import hashlib
import os
import time
import tracemalloc

import pytest
import yaml

from orchestrator.db import Store
from orchestrator.sweep import load_sweep
from sweep_fixture import errors_of

SELFTEST = {"selftest": {"needs": []}}


def write(tmp_path, fname="sweep.yaml", **fields):
    doc = {"name": "t", "base": {"data": {"image_size": 32}}, "stages": SELFTEST, **fields}
    path = tmp_path / fname
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path



@pytest.mark.parametrize("stages, key, words", [
    ({"tokenizer": {}, "evaluate": {"needs": []}}, "stages.evaluate.needs", "add 'tokenizer'"),
    ({"tokenizer": {}, "generator": {}}, "stages.generator.needs", "add 'tokenizer'"),
    ({"tokenizer": {}, "finetune": {"needs": ["tokenizer"]}, "evaluate": {"needs": ["tokenizer"]}},
     "stages.evaluate.needs", "add 'finetune'"),
    ({"tokenizer": {}, "finetune": {}, "evaluate": {"needs": ["finetune"]}}, "stages.finetune.needs", "add 'tokenizer'"),
    ({"evaluate": {}}, "stages.evaluate", "add a 'tokenizer' stage"),
])
def test_a_stage_must_need_the_stage_it_reads(tmp_path, stages, key, words):
    errs = errors_of(write(tmp_path, stages=stages))
    assert any(f"key '{key}'" in e and words in e for e in errs), errs


def test_declared_inputs_directly_or_transitively_are_fine(tmp_path):
    ok = {"tokenizer": {}, "finetune": {"needs": ["tokenizer"]}, "evaluate": {"needs": ["finetune"]},
          "generator": {"needs": ["evaluate"]}}
    assert load_sweep(write(tmp_path, stages=ok)).stage_order[0] == "tokenizer"


def test_grid_size_cap_is_counted_before_expansion(tmp_path):
    errs = errors_of(write(tmp_path, axes={"train.steps": list(range(1, 11)), "data.seed": list(range(10))},
                           seeds=[0, 1, 2], max_runs=250))
    assert errs == [f"{tmp_path / 'sweep.yaml'}: key 'max_runs': the grid has 300 points, more than max_runs=250 "
                    f"(raise max_runs if you mean it)"]
    t0 = time.monotonic()  # 10^30 points: refused by arithmetic, never built
    errs = errors_of(write(tmp_path, axes={f"x{i}": list(range(10)) for i in range(30)}))
    assert time.monotonic() - t0 < 60 and "1,000,000,000,000,000,000,000,000,000,000 points" in errs[-1]  # building it: never ends
    assert len(load_sweep(write(tmp_path, axes={"train.seed": list(range(20))}, max_runs=20)).runs) == 20


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
name: bomb
stages: {selftest: {}}
base: {x: *i}
"""


def test_yaml_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 500  # expands to 9^9 ~ 387 million nodes
    tracemalloc.start()
    t0 = time.monotonic()
    errs = errors_of(path)
    elapsed, (_, peak) = time.monotonic() - t0, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(errs) == 1 and "more than 200,000 nodes" in errs[0] and str(path) in errs[0]
    assert elapsed < 60 and peak < 20 * 2**20, (elapsed, peak)  # expanding it: minutes and GBs
    path.write_text("name: loop\nstages: {selftest: {}}\nbase: &a {x: *a}\n")
    assert "recursive" in errors_of(path)[0]
    # anchors and merge keys of ordinary size stay fine
    path.write_text("name: ok\nstages: {selftest: &st {needs: []}}\nbase: {train: &t {steps: 3}}\n"
                    "axes: {train.seed: [0, 1]}\n")
    assert len(load_sweep(path).runs) == 2


@pytest.mark.parametrize("fields, key", [
    ({"stages": {"selftest": {"resources": {"partition": "debug\n#SBATCH --qos=high"}}}},
     "stages.selftest.resources.partition"),
    ({"stages": {"selftest": {"resources": {"account": "lab\rx"}}}}, "stages.selftest.resources.account"),
    ({"stages": {"selftest": {"resources": {"extra": {"constraint": "a100\n#SBATCH --x"}}}}},
     "stages.selftest.resources.extra.constraint"),
    ({"runs_dir": "runs\nx"}, "runs_dir"),
    ({"base": {"data": {"root": "/data/\x00imagenet"}}}, "base.data.root"),
    ({"axes": {"data.root": ["/a", "/b\x1b[2J"]}}, "axes.data.root[1]"),
])
def test_control_characters_are_refused_everywhere(tmp_path, fields, key):
    errs = errors_of(write(tmp_path, **fields))
    assert any(f"key '{key}'" in e and "control character" in e for e in errs), errs


def test_a_runs_root_with_a_control_character_is_refused(tmp_path):
    folder = tmp_path / "lab\nname"
    folder.mkdir()
    errs = errors_of(write(folder))  # runs_dir "runs" relative to a folder whose name holds a newline
    assert any("key 'runs_dir'" in e and "control character" in e for e in errs), errs


def test_sbatch_option_names_are_plain(tmp_path):
    errs = errors_of(write(tmp_path, stages={"selftest": {"resources": {"extra": {"x --qos": "high"}}}}))
    assert any("key 'stages.selftest.resources.extra'" in e and "option names" in e for e in errs), errs


@pytest.mark.parametrize("name", [".", "..", "../up", "a/b", "/abs", "x\x00", "", "a" * 101])
def test_sweep_names_cannot_leave_runs_dir(tmp_path, name):
    errs = errors_of(write(tmp_path, name=name))
    assert any("key 'name'" in e for e in errs), errs


def test_run_dirs_are_run_hashes_inside_runs_root(tmp_path):
    sweep = load_sweep(write(tmp_path, axes={"train.seed": [0, 1]}))
    for r in sweep.runs:
        assert sweep.run_dir(r.run_hash).parent == sweep.runs_root
    for bad in ("..", "../x", "/etc", "0" * 15 + "/"):
        with pytest.raises(ValueError):
            sweep.run_dir(bad)


def test_runs_dir_is_relative_to_the_sweep_file_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "sweeps").mkdir()
    path = write(tmp_path / "sweeps", runs_dir="../runs")
    roots = set()
    for cwd in (tmp_path, tmp_path / "sweeps", "/"):
        monkeypatch.chdir(cwd)
        roots.add(load_sweep(os.path.relpath(path, cwd)).runs_root)
    assert roots == {(tmp_path / "runs" / "t").resolve()}


def test_shipped_sweeps_all_land_in_the_repository_runs_folder():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    roots = {p.name: load_sweep(p).runs_root.parent for p in sorted((repo / "sweeps").glob("*.yaml"))}
    assert set(roots.values()) == {repo / "runs"}, roots


def test_cli_refuses_hostile_sweeps_and_leaves_the_database_unchanged(tmp_path, run_cli):
    db = tmp_path / "r.db"
    url = f"sqlite:///{db}"
    store = Store(url)
    store.upgrade()
    store.upsert_run("a" * 16, "t", {"x": 1}, stages=["selftest"])
    store.dispose()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    hostile = [bomb,
               write(tmp_path, fname="a.yaml", stages={"selftest": {"resources": {"partition": "p\n#SBATCH --x"}}}),
               write(tmp_path, fname="b.yaml", name=".."),
               write(tmp_path, fname="c.yaml", axes={f"x{i}": [1, 2] for i in range(20)}),
               write(tmp_path, fname="d.yaml", stages={"tokenizer": {}, "evaluate": {}})]
    for path in hostile:
        for extra in ([], ["--dry-run"]):
            out = run_cli("submit", path, "--db", url, "--executor", "local", *extra)
            assert out.returncode == 2 and str(path) in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not (tmp_path / "runs").exists()
