"""Fixtures for the results-database tests: a SQLite URL in tmp, a real PostgreSQL database
(started by scripts/start_postgres.sh, skipped with the reason when it cannot start), and a
helper that writes result files."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from core.config import config_dict, config_hash, load_config
from orchestrator.results import make_payload, write_result_file

REPO = Path(__file__).resolve().parents[2]
_PG: dict = {}


def _pg_server() -> str:
    """URL of the server's maintenance database; starts the server once per session."""
    if "url" not in _PG and "error" not in _PG:
        try:
            out = subprocess.run(["bash", str(REPO / "scripts/start_postgres.sh")], capture_output=True,
                                 text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            _PG["error"] = f"scripts/start_postgres.sh did not run: {e}"
        else:
            lines = out.stdout.strip().splitlines()
            if out.returncode != 0 or not lines:
                _PG["error"] = (f"scripts/start_postgres.sh failed (exit {out.returncode}): "
                                f"{out.stderr.strip()[-500:]}")
            else:
                _PG["url"] = lines[-1].rsplit("/", 1)[0] + "/postgres"
    if "error" in _PG:
        pytest.skip(f"PostgreSQL unavailable: {_PG['error']}")
    return _PG["url"]


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database on the real local server; dropped afterwards."""
    import sqlalchemy as sa

    from orchestrator.db.store import with_driver

    admin = sa.create_engine(with_driver(_pg_server()), isolation_level="AUTOCOMMIT")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as c:
        c.exec_driver_sql(f"CREATE DATABASE {name}")
    yield _PG["url"].rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/results.db"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """Each test using it runs on SQLite and on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/results.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    """A migrated Store on each backend of ``db_url``."""
    from orchestrator.db.store import Store

    s = Store(db_url)
    s.upgrade()
    yield s
    s.dispose()


def result_payload(run_hash: str, stage: str = "tokenizer", attempt: int = 1, *, sweep: str = "s1",
                   status: str = "finished", metrics=None, params=None, config=None, **extra) -> dict:
    """A valid result payload with small defaults."""
    return make_payload(
        run_hash=run_hash, sweep=sweep, stage=stage, attempt=attempt, status=status,
        started_at=f"2026-01-01T00:{attempt:02d}:00+00:00", ended_at=f"2026-01-01T01:{attempt:02d}:00+00:00",
        config=config if config is not None else {"model": {"patch_size": 4}, "train": {"seed": 0}},
        params=params if params is not None else {"model.patch_size": 4},
        metrics=metrics if metrics is not None else [{"name": "psnr", "value": 20.0 + attempt, "step": 10}],
        **extra,
    )


@pytest.fixture
def payload():
    """``payload(run_hash, stage="tokenizer", attempt=1, **kw) -> dict``: a valid result payload."""
    return result_payload


@pytest.fixture
def write_result(tmp_path):
    """``write_result(run_hash, stage, attempt, **payload_kw) -> Path`` under tmp/runs/{sweep}/{run}."""

    def write(run_hash: str, stage: str = "tokenizer", attempt: int = 1, **kw) -> Path:
        payload = result_payload(run_hash, stage, attempt, **kw)
        return write_result_file(tmp_path / "runs" / payload["sweep"] / run_hash, stage, attempt, payload)

    return write


@pytest.fixture
def real_config():
    """(hash, config dict) of real resolved RunConfigs: ``real_config(patch_size)``."""

    def make(patch_size: int = 4, seed: int = 0):
        cfg = load_config(None, {"model.patch_size": patch_size, "train.seed": seed})
        return config_hash(cfg), config_dict(cfg)

    return make


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv)`` -> (returncode, stdout, stderr) of ``orchestrate`` run in-process."""
    from types import SimpleNamespace

    from orchestrator.cli import main

    def run(*argv):
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            rc = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)

    return run
