"""The paper-scale sweep files validate with the orchestrator's loader and expand to the
grids the figures/tables need."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.common import prepare

sweep_mod = pytest.importorskip("orchestrator.sweep")
from orchestrator.query import flatten  # noqa: E402

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"


def _frame(name: str) -> pd.DataFrame:
    sweep = sweep_mod.load_sweep(SWEEPS / f"{name}.yaml")
    # token_scaling also fine-tunes the decoder (paper pipeline: tokenizer -> finetune -> evaluate/generator)
    assert sweep.name == name and [s for s in sweep.stage_order if s != "finetune"] == ["tokenizer", "evaluate", "generator"]
    from core.models.tokenizer import VIT_SIZES

    # encoder_depth: what the tokenizer stage records for each run (a metric in the database)
    rows = [{"run_hash": r.run_hash, "sweep": name, "status": "pending", **flatten(r.config.model_dump(mode="json")),
             "encoder_depth": VIT_SIZES[r.config.model.encoder_size].depth} for r in sweep.runs]
    return prepare(pd.DataFrame(rows))


def test_token_scaling_grid():
    df = _frame("token_scaling")
    assert len(df) == 4 * 3 * 5 * 2
    assert sorted(df["tokens"].unique()) == [16, 64, 256, 1024]  # 256 px, patch 64/32/16/8
    assert set(df["model.decoder_size"]) == {"S", "B", "L"} and set(df["ssl"]) == {"none", "ibot"}
    assert sorted(df["k"].unique()) == [0, 3, 6, 9, 12]
    assert (df["stc"] == (df["k"] < 12)).all() and (~df["stc"]).sum() == 24  # k = 12: vanilla
    assert (df["data.name"] == "imagefolder").all() and (df["model.latent_size"] == 8).all()


def test_ssl_method_grid_matches_table6():
    df = _frame("ssl_method")
    assert sorted(df["ssl"]) == ["dino", "dinov2", "ibot"]
    assert (df["model.patch_size"] == 16).all() and not df["stc"].any()


def test_ablations_cover_tables_8_to_10():
    df = _frame("ablations")
    assert len(df) == 10  # 11 table rows, Table 8's conv row = Table 10's c=128 STC row
    t8 = df[(df["model.patch_size"] == 8) & df["stc"] & (df["ssl"] == "none") & (df["model.latent_channels"] == 128)]
    assert sorted(t8["model.compression"]) == ["conv", "shuffle_mlp"]
    t9 = df[(df["model.patch_size"] == 16) & (df["ssl"] == "ibot")]
    assert sorted(t9["lambda_ssl"]) == [0.1, 1.0, 10.0] and not t9["stc"].any()
    t10 = df[(df["model.patch_size"] == 8) & (df["model.compression"] == "conv")]
    cells = sorted(zip(t10["model.latent_channels"], t10["ssl"], t10["stc"]))
    assert cells == [(c, s, stc) for c in (128, 256) for s, stc in (("ibot", False), ("none", False), ("none", True))]


def test_quickstart_has_two_seeds_per_cell_and_science_check_three():
    # Every figure/table point of the quickstart is a mean over 2 seeds with a 95 % interval;
    # the science check (design) has 3 seeds per configuration.
    for name, seeds in (("quickstart", 2), ("science_check", 3)):
        sweep = sweep_mod.load_sweep(SWEEPS / f"{name}.yaml")
        cells = pd.Series([tuple(sorted((k, str(v)) for k, v in r.params.items() if k != "train.seed"))
                           for r in sweep.runs]).value_counts()
        assert (cells == seeds).all(), (name, cells)
    sc = sweep_mod.load_sweep(SWEEPS / "science_check.yaml")
    assert all(r.config.eval.probe_val >= 2048 for r in sc.runs)  # sized in the YAML's comments
