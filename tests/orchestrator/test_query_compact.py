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
    assert lines[0] == "rfid_backbone: embedded-featnet-v1 (every run with rfid)"
    header = lines[1].split()
    assert header == ["run_hash", "sweep", "status", "model.patch_size", "lpips", "lpips_backbone", "psnr", "rfid"]
    assert len(lines) == 2 + 1 + 3  # constants, header, rule, 3 runs


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
