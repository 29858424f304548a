"""`orchestrate submit` runs the preflight before anything is written or handed over."""
from __future__ import annotations

import yaml

from orchestrator.db.store import Store


def test_missing_data_root_is_exit_2_and_nothing_recorded(tmp_path, run_cli):
    doc = {"name": "pf", "base": {"data": {"name": "imagefolder", "root": str(tmp_path / "nowhere")}},
           "stages": {"tokenizer": {}, "evaluate": {"needs": ["tokenizer"]}}, "executor": "debug",
           "runs_dir": str(tmp_path / "runs")}
    path = tmp_path / "pf.yaml"
    path.write_text(yaml.safe_dump(doc))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    out = run_cli("submit", path, "--db", url)
    assert out.returncode == 2, out.stderr
    assert "preflight" in out.stderr and "data.root" in out.stderr and "nowhere" in out.stderr
    assert Store(url).runs() == []  # nothing recorded
    assert not any((tmp_path / "runs" / "pf").glob("*/run.json"))  # no run directory written
