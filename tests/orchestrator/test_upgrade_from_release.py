"""A database and run tree written by the release before stage identities (commit 279d85a, run
from a ``git worktree`` of it) are adopted by ``orchestrate db upgrade``: re-submitting the
finished sweep plans nothing, every metric reads back unchanged, and a deliberate protocol
bump re-runs only that stage, saying why."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import identity
from orchestrator.db.store import Store
from orchestrator.query import runs_table

REPO = Path(__file__).resolve().parents[2]
RELEASE = "279d85a"  # the last commit whose runs are identified by the whole-config hash

SWEEP = {
    "name": "old",
    "base": {
        "data": {"image_size": 32, "train_size": 64, "val_size": 64, "batch_size": 8},
        "model": {"latent_channels": 8},
        "loss": {"perceptual": 0.0},
        "train": {"steps": 2, "ckpt_every": 2, "device": "cpu"},
        "eval": {"num_samples": 16, "probe_train": 64, "probe_val": 64, "batch_size": 16},
    },
    "axes": {"model.patch_size": [8, 4]},
    "stages": {"tokenizer": {"needs": []}, "evaluate": {"needs": ["tokenizer"]}},
    "executor": "debug",
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A checkout of the release (a detached git worktree), removed afterwards."""
    where = tmp_path_factory.mktemp("release") / "tree"
    out = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), RELEASE],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"commit {RELEASE} is not available here: {out.stderr.strip()[-300:]}")
    yield where
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], capture_output=True)


def old_orchestrate(release: Path, *argv) -> subprocess.CompletedProcess:
    """``orchestrate`` of the release (its code first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(release)}
    code = "import sys; from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=release, env=env,
                          capture_output=True, text=True, timeout=900)


def metric_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return sorted(c.execute("SELECT r.run_hash, m.stage, m.name, m.step, m.value, m.attempt FROM metrics m "
                                "JOIN runs r ON r.id = m.run_id").fetchall())


def test_a_release_database_and_run_tree_are_adopted(release, tmp_path, run_cli, monkeypatch):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "runs_dir": str(tmp_path / "runs")}))
    db = tmp_path / "results.db"
    url = f"sqlite:///{db}"
    out = old_orchestrate(release, "submit", path, "--db", url)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Store(url).current_revision() == "0003"
    before = metric_rows(db)
    assert {(r[1], r[2]) for r in before} >= {("evaluate", "psnr")} and len({r[0] for r in before}) == 2
    files = sorted(p for p in (tmp_path / "runs").rglob("*") if p.is_file())

    # the new code refuses the old schema until upgraded, then adopts every run
    assert run_cli("submit", path, "--db", url, "--dry-run").returncode == 2
    up = run_cli("db", "upgrade", "--db", url)
    assert up.returncode == 0 and "2 run(s) adopted" in up.stdout, up.stderr
    out = run_cli("submit", path, "--db", url, "--dry-run", "--json")
    doc = json.loads(out.stdout)
    assert doc["runs"] == [] and doc["arrays"] == []
    assert {s["action"] for steps in doc["skipped_steps"].values() for s in steps.values()} == {"reuse"}
    old_hashes = {r[0] for r in before}
    assert set(doc["skipped"]) == old_hashes  # the grid points are found under their old directories

    assert run_cli("submit", path, "--db", url).returncode == 0  # really re-submitted: nothing runs
    assert sorted(p for p in (tmp_path / "runs").rglob("*") if p.is_file()
                  if ".submissions" not in p.parts) == [p for p in files if ".submissions" not in p.parts]
    assert metric_rows(db) == before
    store = Store(url)
    table = runs_table(store, sweep="old").set_index("run_hash")
    assert set(table.index) == old_hashes and (table["status"] == "finished").all()
    for h, stage, name, step, value, _ in before:
        if name == "psnr":
            assert table.loc[h, "psnr"] == value

    # a deliberate protocol change of evaluate: that stage only, and the dry-run says why
    monkeypatch.setitem(identity.VERSIONS, "evaluate", identity.VERSIONS["evaluate"] + 1)
    doc = json.loads(run_cli("submit", path, "--db", url, "--dry-run", "--json").stdout)
    assert [(a["stage"], a["size"]) for a in doc["arrays"]] == [("evaluate", 2)]
    for run in doc["runs"]:
        assert run["steps"]["tokenizer"]["action"] == "reuse"
        assert run["steps"]["evaluate"]["action"] == "re-run"
        assert "protocol version 1 -> 2" in run["steps"]["evaluate"]["reason"]
    store.dispose()
