"""Planning: which (run, stage) pairs run, how they become arrays, how arrays depend."""
from __future__ import annotations

import json

import yaml

from orchestrator.cli import main
from orchestrator.db.store import Store
from orchestrator.decide import plan_steps, todo_of
from orchestrator.plan import build_plan, stages_to_run
from orchestrator.slurm import chunks
from orchestrator.sweep import load_sweep

STAGES = {"selftest": {"needs": []}, "echo": {"needs": ["selftest"]}, "tokenizer": {"needs": []}}


def make_sweep(tmp_path, n_patch=3, stages=STAGES):
    doc = {"name": "p", "base": {"data": {"image_size": 32}}, "stages": stages,
           "axes": {"model.patch_size": [8, 4, 2, 1][:n_patch]}, "seeds": [0, 1]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_sweep(path)


def test_chunks_cover_items_in_order():
    assert chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunks([], 3) == []


def test_stages_to_run_includes_dependants_of_redone_stages():
    order = ["tokenizer", "evaluate", "generator"]
    needs = {"tokenizer": [], "evaluate": ["tokenizer"], "generator": ["tokenizer"]}
    assert stages_to_run(order, needs, done=set()) == order
    assert stages_to_run(order, needs, done={"tokenizer", "evaluate"}) == ["generator"]
    # a redone tokenizer invalidates everything downstream
    assert stages_to_run(order, needs, done=set(order), redo={"tokenizer"}) == order
    assert stages_to_run(order, needs, done={"tokenizer", "generator"}, redo={"evaluate"}) == ["evaluate"]


def test_one_array_per_stage_with_per_element_dependency(tmp_path):
    sweep = make_sweep(tmp_path)
    todo = todo_of(plan_steps(None, sweep, sweep.runs)[1])
    plan = build_plan(sweep, todo, sweep.runs, max_array_size=10001)
    assert [a.stage for a in plan.arrays] == sweep.stage_order
    assert plan.sbatch_calls == 3
    by_stage = {a.stage: a for a in plan.arrays}
    assert by_stage["echo"].runs == by_stage["selftest"].runs == [r.run_hash for r in sweep.runs]
    assert by_stage["echo"].depends_on == [(by_stage["selftest"].index, "aftercorr")]
    assert by_stage["tokenizer"].depends_on == []


def test_arrays_are_chunked_to_max_array_size_and_chunks_pair_up(tmp_path):
    sweep = make_sweep(tmp_path, n_patch=4)  # 8 runs
    plan = build_plan(sweep, todo_of(plan_steps(None, sweep, sweep.runs)[1]), sweep.runs, max_array_size=3)
    sel = [a for a in plan.arrays if a.stage == "selftest"]
    echo = [a for a in plan.arrays if a.stage == "echo"]
    assert [len(a.runs) for a in sel] == [3, 3, 2]
    assert sum(len(a.runs) for a in plan.arrays) == 8 * 3
    for parent, child in zip(sel, echo):
        assert child.runs == parent.runs and child.depends_on == [(parent.index, "aftercorr")]


def test_finished_and_active_runs_are_skipped_failed_ones_left_to_retry(tmp_path):
    sweep = make_sweep(tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    store.upgrade()
    runs, steps, configs, _ = plan_steps(store, sweep, sweep.runs)
    h = [r.run_hash for r in runs]
    # recorded as a submission records them, then states as Slurm reports them
    store.record_plan(sweep.name, "", {x: (configs[x], r.params) for x, r in zip(h, runs)}, "slurm",
                      sweep.stage_order, steps)
    state = {**{(h[0], st): "finished" for st in sweep.stage_order},
             (h[1], "selftest"): "running", (h[1], "echo"): "queued", (h[1], "tokenizer"): "queued",
             (h[2], "selftest"): "failed", (h[2], "echo"): "cancelled", (h[2], "tokenizer"): "finished",
             (h[3], "selftest"): "finished", (h[3], "tokenizer"): "finished"}
    store.set_states({k: {"status": v} for k, v in state.items()})
    todo = todo_of(plan_steps(store, sweep, runs)[1])  # h[3]: echo never submitted (a stage added later)
    assert {x for x, t in todo.items() if t} == set(h) - {h[0], h[1], h[2]}
    assert todo[h[3]] == ["echo"] and todo[h[4]] == sweep.stage_order
    retry = todo_of(plan_steps(store, sweep, runs, retry=True)[1])
    assert {x: t for x, t in retry.items() if t} == {h[2]: ["selftest", "echo"]}
    steps = plan_steps(store, sweep, runs)[1]
    assert steps[h[2]]["selftest"].action == "skip" and "orchestrate retry" in steps[h[2]]["selftest"].reason
    assert steps[h[0]]["echo"].action == "reuse" and steps[h[1]]["echo"].action == "active"
    store.dispose()


def test_partial_parent_set_falls_back_to_afterok(tmp_path):
    sweep = make_sweep(tmp_path)
    h = [r.run_hash for r in sweep.runs]
    todo = {h[0]: ["selftest", "echo"], h[1]: ["echo"]}  # h[1]'s selftest already finished
    plan = build_plan(sweep, todo, sweep.runs, max_array_size=100)
    sel, echo = plan.arrays
    assert sel.runs == [h[0]] and echo.runs == [h[0], h[1]]
    assert echo.depends_on == [(sel.index, "afterok")]
    assert set(plan.skipped) == set(h[2:])


def test_dry_run_json_prints_plan_and_creates_nothing(tmp_path, capsys):
    sweep = make_sweep(tmp_path)
    db = tmp_path / "r.db"
    assert main(["submit", str(sweep.path), "--dry-run", "--json", "--executor", "slurm",
                 "--db", f"sqlite:///{db}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sbatch_calls"] == 3 and len(out["runs"]) == 6 and out["job_ids"] == []
    assert out["arrays"][1]["depends_on"] == [{"array": 0, "type": "aftercorr"}]
    assert not db.exists() and not sweep.runs_root.exists()
