"""The default `orchestrate query` view is compact: run id, sweep, status, the config keys that
vary, the metrics, and a `*_backbone` column only where it says something; `--wide` shows all;
`--format parquet` writes a file pandas reads back."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.db import Store
from orchestrator.ingest import ingest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def three_runs(sqlite_url, write_result, tmp_path, real_config):
    for i, p in enumerate((2, 4, 8)):
        h, c = real_config(p)
        write_result(h, "evaluate", 1, sweep="patch", config=c, params={"model.patch_size": p}, metrics=[
            {"name": "psnr", "value": 20.0 + i, "step": 10},  # backbone-free: its column is all null
            {"name": "rfid", "value": 40.0 - i, "step": 10, "backbone": "embedded-featnet-v1"},  # constant
            {"name": "lpips", "value": 0.1 * i, "step": 10,
             "backbone": "lpips-vgg16" if i else "lpips-substitute-featnet-v1"}])  # varies: kept
    store = Store(sqlite_url)
    store.upgrade()
    assert not ingest(store, [tmp_path / "runs"]).errors
    store.dispose()
    return sqlite_url


def test_default_table_is_compact(three_runs, run_cli):
    out = run_cli("query", "--db", three_runs)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["sweep: patch (every run)", "rfid_backbone: embedded-featnet-v1 (every run with rfid)"]
    header = lines[2].split()  # the headline metrics, in their order
    assert header == ["run_hash", "status", "patch_size", "rfid", "psnr", "lpips", "lpips_backbone"]
    assert len(lines) == 2 + 2 + 3  # constants, header, rule, 3 runs


def test_wide_shows_everything(three_runs, run_cli):
    out = run_cli("query", "--db", three_runs, "--wide", "--format", "csv")
    df = pd.read_csv(io.StringIO(out.stdout))
    assert {"data.image_size", "psnr_backbone", "rfid_backbone", "lpips_backbone"} <= set(df.columns)
    assert len(df.columns) > 60


def test_machine_formats_keep_a_constant_backbone_as_a_column(three_runs, run_cli):
    out = run_cli("query", "--db", three_runs, "--format", "csv")
    df = pd.read_csv(io.StringIO(out.stdout))
    assert list(df.columns) == ["run_hash", "sweep", "status", "model.patch_size", "lpips", "lpips_backbone", "psnr",
                                "rfid", "rfid_backbone"]
    assert set(df["rfid_backbone"]) == {"embedded-featnet-v1"}


def test_parquet_to_a_file_and_to_stdout(three_runs, run_cli, tmp_path):
    target = tmp_path / "runs.parquet"
    out = run_cli("query", "--db", three_runs, "--wide", "--format", "parquet", "--out", target)
    assert out.returncode == 0, out.stderr
    df = pd.read_parquet(target)
    assert len(df) == 3 and sorted(df["model.patch_size"]) == [2, 4, 8]
    assert list(df["optim.betas"].iloc[0]) == [0.9, 0.95]  # tuple cells become lists
    with open(tmp_path / "piped.parquet", "wb") as fh:  # stdout redirected to a file
        p = subprocess.run([sys.executable, "-m", "orchestrator.cli", "query", "--db", three_runs, "--format",
                            "parquet"], cwd=REPO, stdout=fh, stderr=subprocess.PIPE, text=False, timeout=120)
    assert p.returncode == 0, p.stderr
    piped = pd.read_parquet(tmp_path / "piped.parquet")
    assert list(piped.columns)[:4] == ["run_hash", "sweep", "status", "model.patch_size"]
    assert set(piped["rfid_backbone"]) == {"embedded-featnet-v1"}


# every metric a quickstart run reports (tokenizer, evaluate, generator stages, measured hours)
QUICKSTART_METRICS = ["train_loss", "params_encoder", "params_decoder", "gflops_encoder", "gflops_decoder",
                      "gflops_total", "train_time_s", "encoder_depth", "psnr", "ssim", "lpips", "rfid",
                      "probe_acc_before", "probe_acc_after", "structure_loss", "gfid", "inception_score",
                      "tokenizer_cpu_hours", "evaluate_cpu_hours", "generator_cpu_hours"]


@pytest.fixture
def quickstart_like(sqlite_url, write_result, tmp_path):
    """16 runs over the quickstart's axes (patch x decoder x split depth x seed), every metric."""
    from core.config import config_dict, config_hash, load_config

    i = 0
    for patch in (8, 4):
        for dec in ("micro", "mini"):
            for k in (2, None):
                for seed in (0, 1):
                    params = {"model.patch_size": patch, "model.decoder_size": dec, "model.split_depth": k,
                              "train.seed": seed}
                    cfg = load_config(None, {"model.encoder_size": "micro", **params})
                    i += 1
                    write_result(config_hash(cfg), "evaluate", 1, sweep="quickstart", config=config_dict(cfg),
                                 params=params, metrics=[{"name": m, "value": 1234.56789 / (j + i), "step": 300}
                                                         for j, m in enumerate(QUICKSTART_METRICS)])
    store = Store(sqlite_url)
    store.upgrade()
    assert not ingest(store, [tmp_path / "runs"]).errors
    store.dispose()
    return sqlite_url


def test_default_table_shows_the_headline_metrics_in_160_columns(quickstart_like, run_cli):
    out = run_cli("query", "--db", quickstart_like)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(ln) for ln in lines) <= 160, "\n".join(lines)
    assert lines[0] == "sweep: quickstart (every run)"
    header = lines[1].split()
    assert header == ["run_hash", "status", "decoder_size", "patch_size", "split_depth", "seed",
                      "rfid", "gfid", "psnr", "lpips", "structure_loss", "gflops_total"]
    # a vanilla run's split depth says what it is (unset = the encoder's depth), never nan
    depths = {ln.split()[header.index("split_depth")] for ln in lines[3:]}
    assert depths == {"2", "—"} and "nan" not in out.stdout
    # the rest on request
    wide = run_cli("query", "--db", quickstart_like, "--wide")
    assert {"train_time_s", "tokenizer_cpu_hours", "params_decoder"} <= set(wide.stdout.splitlines()[0].split())
    some = run_cli("query", "--db", quickstart_like, "--metrics", "train_time_s,rfid")
    assert some.stdout.splitlines()[1].split()[-2:] == ["train_time_s", "rfid"]  # in the order asked
    # files keep every metric (and null stays null)
    csv = pd.read_csv(io.StringIO(run_cli("query", "--db", quickstart_like, "--format", "csv").stdout))
    assert set(QUICKSTART_METRICS) <= set(csv.columns) and csv["model.split_depth"].isna().sum() == 8
