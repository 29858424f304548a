"""`orchestrate predict`: fit small, predict large, record, check (issue 17 §2, §5).

The statistical claims are measured over repeated synthetic studies with a known law
L = 5 + 200·T^(−0.7) and 5 % log-normal seed noise, 3 seeds per rung:
* fit on 5 rungs (4 … 1024 tokens), predict the mean of 3 new seeds at 4096: the 95 %
  prediction interval covered it in 94.5 % of 200 studies (measured); asserted ≥ 90 % over
  300 studies (a true 95 % falls below 90 % with probability < 0.1 %);
* the error of that extrapolation shrinks as the fit gets more rungs: median |log error|
  0.23 (3 rungs), 0.075 (4), 0.035 (5) over 200 studies; asserted strictly decreasing by
  ≥ 1.5× per rung over 80 studies each.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.fits import fit_power_laws
from analysis.predict import predict_targets
from law_db import law_db, noisy, tokens_of
from orchestrator.db.store import Store
from orchestrator.query import predictions_table

REPO = Path(__file__).resolve().parents[2]
E, A, ALPHA, NOISE = 5.0, 200.0, 0.7, 0.05
RUNGS = np.array([4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0])


def _law(t):
    return E + A * t ** -ALPHA


def test_prediction_interval_covers_new_seeds_at_the_nominal_rate():
    rng = np.random.default_rng(3)
    x = np.repeat(RUNGS[:5], 3)
    fits = fit_power_laws(x, _law(x) * np.exp(rng.normal(0.0, NOISE, (300, len(x)))))
    truth = (_law(RUNGS[-1]) * np.exp(rng.normal(0.0, NOISE, (300, 3)))).mean(1)
    hit = [lo[0] <= y <= hi[0] for f, y in zip(fits, truth) for _, lo, hi in [f.predict_interval([RUNGS[-1]], 3)]]
    assert np.mean(hit) >= 0.90, np.mean(hit)


def test_extrapolation_error_shrinks_with_more_rungs():
    rng = np.random.default_rng(4)
    errors = []
    for k in (3, 4, 5):
        x = np.repeat(RUNGS[:k], 3)
        fits = fit_power_laws(x, _law(x) * np.exp(rng.normal(0.0, NOISE, (80, len(x)))))
        truth = (_law(RUNGS[-1]) * np.exp(rng.normal(0.0, NOISE, (80, 3)))).mean(1)
        errors.append(np.median([abs(np.log(f.predict_interval([RUNGS[-1]], 3)[0][0] / y)) for f, y in zip(fits, truth)]))
    assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2], errors


SWEEP = {
    "name": "law",
    "base": {"data": {"name": "synthetic", "image_size": 64},
             "model": {"encoder_size": "micro", "latent_size": 4, "latent_channels": 8}},
    "axes": {"model.patch_size": [16, 8, 4, 2]},  # 16, 64, 256, 1024 tokens
    "seeds": [0, 1, 2],
    "stages": {"tokenizer": {"needs": [], "resources": {"cpus": 1, "mem_gb": 2, "time_min": 30}},
               "evaluate": {"needs": ["tokenizer"], "resources": {"cpus": 1, "mem_gb": 2, "time_min": 30}}},
    "executor": "local",
}


def _metrics(params, cfg):
    t = tokens_of(params, cfg.data.image_size)
    return {"rfid": noisy(_law(t), params, 1), "gfid": noisy(40.0, params, 2)}


def orchestrate(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_predict_records_then_figures_show_predicted_vs_measured(tmp_path):
    sweep = tmp_path / "law.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    db = law_db(tmp_path, sweep, _metrics, keep=lambda p: p["model.patch_size"] > 2)  # 1024 tokens not run yet
    out = orchestrate("predict", str(sweep), "--fit-on", "tokens<=256", "--metric", "rfid", "--db", db, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    store = Store(db, readonly=True)
    pred = predictions_table(store, sweep="law")
    store.dispose()
    assert len(pred) == 4 and set(pred["metric"]) == {"rfid"} and pred["batch"].nunique() == 1
    big = pred[pred["target"] == json.dumps({"model.patch_size": 2})].iloc[0]
    assert big["law"] == "E + A*T^-alpha" and big["fit_on"] == "tokens<=256" and len(big["fit_runs"]) == 9
    assert big["lower"] < big["value"] < big["upper"] and big["code_version"].startswith("orchestrate ")
    assert json.loads(big["protocol"])["backbone"] == "embedded-featnet-v1"
    assert "not predicted" not in out.stderr

    # the target lands; the ladder and the figures show predicted vs measured
    law_db(tmp_path / "later", sweep, _metrics, keep=lambda p: p["model.patch_size"] == 2, url=db)
    out = orchestrate("predict", str(sweep), "--ladder", "--db", db, cwd=tmp_path)
    assert out.returncode == 0 and "coverage:" in out.stdout and "of 4 measured targets" in out.stdout, out.stdout
    out = orchestrate("query", "--predictions", "--sweep", "law", "--format", "csv", "--db", db, cwd=tmp_path)
    assert out.returncode == 0 and "of 4 measured targets" in out.stderr, out.stdout + out.stderr
    assert "predicted" in out.stdout.splitlines()[0] and "covered" in out.stdout.splitlines()[0]
    assert len(out.stdout.strip().splitlines()) == 1 + 4  # header + one row per recorded prediction
    figs = tmp_path / "figs"
    out = orchestrate("figures", "--db", db, "--out", str(figs), "--only", "predictions", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    md = (figs / "predictions_recorded.md").read_text()
    assert "coverage" in md and "patch_size=2" in md and "not yet" not in md
    assert "tokens 1024" in (figs / "predictions_holdout.md").read_text()


def test_bad_fit_filter_is_exit_2(tmp_path):
    sweep = tmp_path / "law.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    db = law_db(tmp_path, sweep, _metrics)
    for bad in ("tokens<=__import__('os')", "nonesuch<3"):
        out = orchestrate("predict", str(sweep), "--fit-on", bad, "--db", db, cwd=tmp_path)
        assert out.returncode == 2 and "--fit-on" in out.stderr, out.stderr
    store = Store(db, readonly=True)
    assert predictions_table(store).empty  # nothing recorded
    store.dispose()


def _frame(num_samples: int, backbone: str = "embedded-featnet-v1") -> pd.DataFrame:
    rows = []
    for p, t in ((8, 16.0), (4, 64.0), (2, 256.0)):
        for seed in range(3):
            rows.append({"run_hash": f"{p}{seed}{num_samples}", "sweep": "s", "status": "finished",
                         "data.image_size": 32, "model.patch_size": p, "train.seed": seed,
                         "generator.num_samples": num_samples, "eval.subset_seed": 0,
                         "gfid": _law(t) * np.exp(0.05 * (seed - 1)), "gfid_backbone": backbone})
    return pd.DataFrame(rows)


def test_mixed_protocols_are_separate_fits_and_a_mismatch_is_refused():
    fit = pd.concat([_frame(512), _frame(2048)], ignore_index=True)
    fit.loc[fit["generator.num_samples"] == 2048, "gfid"] *= 3.0  # another protocol, other numbers
    target = pd.DataFrame([{"data.image_size": 32, "model.patch_size": 1, "generator.num_samples": n,
                            "eval.subset_seed": 0, "target": json.dumps({"n": n}), "seeds": 3} for n in (512, 2048, 50000)])
    rows, refused = predict_targets(fit, target, "gfid")
    by = {json.loads(r["target"])["n"]: r for r in rows}
    assert set(by) == {512, 2048}  # each predicted from its own protocol's runs only
    assert all(len(r["fit_runs"]) == 9 for r in rows)
    assert by[2048]["value"] == pytest.approx(3.0 * by[512]["value"], rel=1e-3)
    assert len(refused) == 1 and "num_samples 512 vs 50000" in refused[0] and "num_samples 2048 vs 50000" in refused[0]
