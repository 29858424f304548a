"""Optuna search mode: ask/tell driven by the orchestrator, trials through the normal path."""
from __future__ import annotations

import json

import optuna
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.db.store import Store


def write_search(tmp_path, n_trials=14, executor="local"):
    doc = {
        "name": "srch",
        "base": {"data": {"image_size": 32}, "train": {"steps": 3, "ckpt_every": 3}},
        "stages": {"selftest": {"needs": [], "params": {"objective_key": "loss.ssl", "target": 2.0}}},
        "executor": executor,
        "max_parallel": 2,
        "runs_dir": str(tmp_path / "runs"),
        "search": {"params": {"x": {"key": "loss.ssl", "low": 0.0, "high": 6.0}},
                   "objective": "objective", "direction": "minimize", "n_trials": n_trials,
                   "parallelism": 2, "sampler": "tpe", "seed": 0},
    }
    path = tmp_path / "srch.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_search_finds_minimum_of_analytic_objective(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert main(["submit", str(write_search(tmp_path)), "--db", url, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_trials"] == 14
    assert abs(summary["best_params"]["x"] - 2.0) < 0.5
    assert summary["best_value"] == (summary["best_params"]["x"] - 2.0) ** 2

    # every trial is a run in the results database, its objective told to the study
    store = Store(url)
    runs = {r.run_hash: r for r in store.runs(sweep="srch", with_config=True)}
    study = optuna.load_study(study_name="srch", storage=optuna.storages.RDBStorage(url, skip_compatibility_check=True))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 14
    for t in complete:
        run = runs[t.user_attrs["run_hash"]]
        assert run.status == "finished"
        assert run.config["loss"]["ssl"] == t.params["x"]
        assert abs(t.value - (t.params["x"] - 2.0) ** 2) < 1e-12

    # resuming a finished study runs nothing new
    n_runs = len(runs)
    assert main(["submit", str(write_search(tmp_path)), "--db", url]) == 0
    assert len(store.runs(sweep="srch")) == n_runs
    # the results schema is intact beside Optuna's tables
    store.check_schema()


def test_optuna_and_our_schema_share_a_database_in_either_order(tmp_path):
    import optuna

    from orchestrator.db.store import Store

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for first in ("optuna", "ours"):
        url = f"sqlite:///{tmp_path / (first + '.db')}"
        if first == "optuna":
            optuna.storages.RDBStorage(url)
        store = Store(url)
        store.upgrade()
        optuna.create_study(study_name="s", storage=optuna.storages.RDBStorage(url), load_if_exists=True)
        assert store.current_revision() == store.head_revision()
        store.check_schema()


@pytest.mark.postgres
def test_search_runs_on_the_real_postgresql(tmp_path, pg_url, capsys):
    assert main(["submit", str(write_search(tmp_path, n_trials=4, executor="debug")), "--db", pg_url, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_trials"] == 4 and summary["best_value"] is not None
    assert {r.status for r in Store(pg_url).runs(sweep="srch")} == {"finished"}
