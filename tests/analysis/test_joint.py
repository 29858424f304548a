"""The joint law L = E + A·T^(−α) + B·N^(−β): known exponents recovered within their
intervals over repeated synthetic studies, the `joint_fits` output (form, points, residuals,
every parameter's interval, iso-compute table), and protocols never pooled."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from analysis.joint import fit_joint, joint_fits

TOK = np.array([16.0, 64.0, 256.0, 1024.0])
NDEC = np.array([1e5, 6.6e5, 5.3e6])
E, A, ALPHA, B, BETA = 1.0, 50.0, 0.6, 3000.0, 0.5


def _study(rng, noise=0.03, seeds=2):
    T, N = (g.ravel() for g in np.meshgrid(TOK, NDEC, indexing="ij"))
    T, N = np.repeat(T, seeds), np.repeat(N, seeds)
    return T, N, (E + A * T ** -ALPHA + B * N ** -BETA) * np.exp(rng.normal(0.0, noise, len(T)))


def test_exponent_intervals_cover_the_truth():
    # 40 studies of 4 token counts × 3 decoder sizes × 2 seeds (19 residual dof): a 95 % interval
    # below 80 % coverage here would be a broken interval (probability < 0.5 % if it holds 95 %)
    rng = np.random.default_rng(11)
    hits = np.zeros(2)
    for _ in range(40):
        f = fit_joint(*_study(rng))
        hits += [f.ci["alpha"][0] <= ALPHA <= f.ci["alpha"][1], f.ci["beta"][0] <= BETA <= f.ci["beta"][1]]
    assert (hits >= 32).all(), hits


def _frame(rng, protocol_samples=(512,)):
    rows = []
    for ns in protocol_samples:
        for p, t in zip((16, 8, 4, 2), TOK):
            for dec, n in zip(("micro", "mini", "Ti"), NDEC):
                for seed in range(2):
                    v = (E + A * t ** -ALPHA + B * n ** -BETA) * np.exp(rng.normal(0.0, 0.03)) * (1 + (ns != 512))
                    rows.append({"run_hash": f"{p}{dec}{seed}{ns}", "sweep": "s", "status": "finished",
                                 "data.image_size": 64, "model.patch_size": p, "model.decoder_size": dec,
                                 "train.seed": seed, "params_decoder": n, "gflops_total": t * n / 1e6,
                                 "generator.num_samples": ns, "gfid": v, "gfid_backbone": "embedded-featnet-v1"})
    return pd.DataFrame(rows)


def test_joint_fits_output_states_form_points_residuals_and_intervals(tmp_path):
    out = joint_fits(_frame(np.random.default_rng(2)), tmp_path)
    assert sorted(f.name for f in out.files) == ["iso_compute.md", "iso_compute.tex", "joint_fits.json",
                                                   "joint_fits.md", "joint_fits.tex"]
    (fit,) = json.loads((tmp_path / "joint_fits.json").read_text())
    assert fit["form"].startswith("L = E + A·T^(−α) + B·N^(−β)") and fit["dof"] == 24 - 5
    assert len(fit["points"]) == 24 and all("log_residual" in p for p in fit["points"])
    for name, (value, lo, hi) in fit["params"].items():
        assert lo <= value <= hi, name
    iso = (tmp_path / "iso_compute.md").read_text()
    assert "p=2, dec Ti" in iso  # the largest budget buys the most tokens and the largest decoder


def test_mixed_protocols_are_separate_joint_fits(tmp_path):
    joint_fits(_frame(np.random.default_rng(3), (512, 2048)), tmp_path)
    fits = json.loads((tmp_path / "joint_fits.json").read_text())
    assert len(fits) == 2 and all(len(f["points"]) == 24 for f in fits)
    assert {f["line"] for f in fits} == {"all runs [num_samples=512]", "all runs [num_samples=2048]"}
