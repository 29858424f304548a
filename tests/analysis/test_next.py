"""`orchestrate next`: under a budget, the proposal holds the configuration that the true law
says is best among those the budget can buy, and `submit --dry-run` accepts the file."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import yaml

from analysis.next_rung import propose
from law_db import law_db, noisy, tokens_of
from orchestrator.sweep import load_sweep

WIDTH_DEPTH = {"micro": (48, 4), "mini": (96, 6), "Ti": (192, 12)}  # core.models.geometry.VIT_SIZES


def n_dec(size: str) -> float:
    w, d = WIDTH_DEPTH[size]
    return 12.0 * w * w * d


def truth(t: float, size: str) -> float:
    """The known law: L = 1 + 50·T^-0.6 + 3000·N^-0.5 (the decoder matters as much as tokens)."""
    return 1.0 + 50.0 * t ** -0.6 + 3000.0 * n_dec(size) ** -0.5


SWEEP = {
    "name": "rungs",
    "base": {"data": {"name": "synthetic", "image_size": 64},
             "model": {"encoder_size": "micro", "latent_size": 4, "latent_channels": 8}},
    "axes": {"model.patch_size": [16, 8, 4, 2], "model.decoder_size": ["micro", "mini", "Ti"]},
    "seeds": [0, 1, 2],
    "stages": {"tokenizer": {"needs": [], "resources": {"cpus": 1, "mem_gb": 2, "time_min": 30}},
               "evaluate": {"needs": ["tokenizer"], "resources": {"cpus": 1, "mem_gb": 2, "time_min": 30}}},
    "executor": "local",
}


def _metrics(params, cfg):
    t = tokens_of(params, cfg.data.image_size)
    return {"gfid": noisy(truth(t, params["model.decoder_size"]), {**params, "model.patch_size":
                                                                    params["model.patch_size"] * 10 + len(params["model.decoder_size"])}, 3, sd=0.02)}


def orchestrate(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_next_rung_contains_the_true_best_within_budget(tmp_path):
    from orchestrator.commands.next import cost_of

    sweep_file = tmp_path / "rungs.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    # finished: patches 16, 8, 4 with decoders micro and mini, 16 and 8 with Ti (24 runs);
    # new: p = 2 with every decoder, p = 4 with Ti
    old = {(16, "Ti"), (8, "Ti")} | {(p, d) for p in (16, 8, 4) for d in ("micro", "mini")}
    db = law_db(tmp_path, sweep_file, _metrics, keep=lambda p: (p["model.patch_size"], p["model.decoder_size"]) in old)
    sweep = load_sweep(sweep_file)
    groups = {}
    for r in sweep.runs:
        groups.setdefault((r.params["model.patch_size"], r.params["model.decoder_size"]), []).append(r)
    new = {k: v for k, v in groups.items() if k not in old}
    cost = {k: cost_of(sweep, v, "core-h", None) for k, v in new.items()}
    # a budget that buys every new configuration but the dearest (p = 2 with the Ti decoder)
    budget = sorted(cost.values())[-2] * 1.01
    assert cost[(2, "Ti")] > budget
    affordable = [k for k in new if cost[k] <= budget]
    best = min(affordable, key=lambda k: truth((64 / k[0]) ** 2, k[1]))
    assert best == (4, "Ti")  # not the largest token count: the law trades tokens for decoder

    out_file = tmp_path / "next.yaml"
    out = orchestrate("next", str(sweep_file), "--budget", f"{budget}", "--unit", "core-h", "--metric", "gfid",
                      "--law", "joint", "--out", str(out_file), "--db", db, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    first = [line for line in out.stdout.splitlines() if line.strip().startswith("choose")][0]
    assert '"model.decoder_size": "Ti", "model.patch_size": 4' in first and "best predicted" in first, out.stdout
    spec = yaml.safe_load(out_file.read_text())
    chosen = list(zip(spec["zip"][0]["model.patch_size"], spec["zip"][0]["model.decoder_size"]))
    assert (4, "Ti") in chosen and (2, "Ti") not in chosen
    assert sum(cost[k] for k in chosen) <= budget * (1 + 1e-9)
    dry = orchestrate("submit", str(out_file), "--dry-run", "--db", db, cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"{len(chosen) * 3} runs" in dry.stdout or str(len(chosen) * 3) in dry.stdout


def test_propose_spends_the_rest_on_the_widest_intervals():
    cand = pd.DataFrame({"target": ["a", "b", "c", "d"], "value": [3.0, 2.0, 5.0, 1.0],
                         "lower": [2.9, 1.0, 2.0, 0.5], "upper": [3.1, 4.0, 12.0, 2.0], "cost": [1.0, 3.0, 2.0, 50.0]})
    chosen, notes = propose(cand, budget=6.0)
    assert list(chosen["target"]) == ["b", "c", "a"]  # best affordable, then log-width per cost
    assert any(n.startswith("d: costs 50") for n in notes)
