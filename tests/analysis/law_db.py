"""Test helper: a results database of a sweep file's runs whose metrics follow a known law
plus seed noise, written as result files (``orchestrator.results``) and ingested, the way
jobs record them."""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from orchestrator.results import make_payload, write_result_file
from orchestrator.sweep import load_sweep

from analysis_db import ingested

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
BACKBONE = "embedded-featnet-v1"


def tokens_of(params: dict, image_size: int) -> float:
    return float((image_size // params["model.patch_size"]) ** 2)


def law_db(tmp_path, sweep_file, metrics, keep=lambda params: True, url: str | None = None) -> str:
    """Record every run of ``sweep_file`` that ``keep(params)`` accepts, with the metric
    values ``metrics(params, cfg)`` returns (a dict); returns the database URL."""
    sweep = load_sweep(sweep_file)
    root = tmp_path / "runs"
    for r in sweep.runs:
        if not keep(r.params):
            continue
        vals = metrics(r.params, r.config)
        rows = [{"name": n, "value": float(v), "step": 1, "backbone": BACKBONE if n in ("rfid", "gfid") else None}
                for n, v in vals.items()]
        payload = make_payload(run_hash=r.run_hash, sweep=sweep.name, stage="evaluate", attempt=1, status="finished",
                               started_at=NOW, ended_at=NOW, config=r.config_dict(), metrics=rows)
        write_result_file(root / sweep.name / r.run_hash, "evaluate", 1, payload)
    url = url or f"sqlite:///{tmp_path / 'results.db'}"
    return ingested(root, url)


def noisy(value: float, params: dict, salt: int, sd: float = 0.05) -> float:
    """``value`` × log-normal seed noise, reproducible per (config, seed, salt)."""
    key = (int(params.get("train.seed", 0)), int(params["model.patch_size"]), salt)
    return value * float(np.exp(np.random.default_rng(key).normal(0.0, sd)))
