"""A `--db` that is not a results database, or whose schema is newer than the code: every
command says so (exit 2, no traceback) and leaves the file / rows unchanged."""
from __future__ import annotations

import hashlib

import pytest
import yaml
from sqlalchemy import create_engine

from orchestrator.db import Store
from orchestrator.db.store import with_driver

SWEEP = {"name": "t", "base": {"train": {"steps": 1}}, "stages": {"selftest": {"needs": []}}, "executor": "local"}


def _commands(tmp_path, url):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    (tmp_path / "runs").mkdir(exist_ok=True)
    return [("status",), ("status", "--no-refresh"), ("query",), ("query", "SELECT 1"), ("ingest", tmp_path / "runs"),
            ("db", "upgrade"), ("db", "current"), ("submit", sweep, "--dry-run"), ("submit", sweep),
            ("retry", "t"), ("cancel", "t"), ("figures", "--out", tmp_path / "fig")]


@pytest.mark.parametrize("content", [b"this is not a database\n" * 100, b"\x00" * 4096,
                                     b"SQLite format 3\x00" + b"\xff" * 2000])
def test_a_file_that_is_not_a_database(tmp_path, run_cli, content):
    db = tmp_path / "notes.db"
    db.write_bytes(content)
    url = f"sqlite:///{db}"
    for argv in _commands(tmp_path, url):
        out = run_cli(*argv, "--db", url)
        assert out.returncode == 2, (argv, out.stderr)
        assert "Traceback" not in out.stderr and str(db) in out.stderr, (argv, out.stderr)
    assert db.read_bytes() == content
    assert not list((tmp_path / "runs").iterdir())


def _counts(url: str) -> dict:
    eng = create_engine(with_driver(url))
    with eng.connect() as c:
        out = {t: c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar()
               for t in ("sweeps", "runs", "run_stages", "metrics", "ingested_files")}
        out["rev"] = c.exec_driver_sql("SELECT version_num FROM tcae_schema_version").scalar()
    eng.dispose()
    return out


def test_a_schema_newer_than_the_code(db_url, tmp_path, run_cli):
    store = Store(db_url)
    store.upgrade()
    store.upsert_run("a" * 16, "t", {"x": 1}, stages=["selftest"])
    with store.engine.begin() as c:  # as a newer release of the code would leave it
        c.exec_driver_sql("UPDATE tcae_schema_version SET version_num = '9999_from_the_future'")
    store.dispose()
    before = _counts(db_url)
    db = tmp_path / "results.db"
    digest = hashlib.sha256(db.read_bytes()).hexdigest() if db.exists() else None
    for argv in _commands(tmp_path, db_url):
        if argv[:2] == ("query", "SELECT 1"):
            continue  # raw SQL needs no particular schema
        out = run_cli(*argv, "--db", db_url)
        assert out.returncode == 2, (argv, out.stderr)
        assert "newer than this code" in out.stderr and "Traceback" not in out.stderr, (argv, out.stderr)
    assert _counts(db_url) == before
    if digest:
        assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


@pytest.mark.postgres
def test_a_postgresql_url_to_nothing(pg_url, run_cli):
    """A database or user that does not exist on the server: one clear line, exit 2."""
    base = pg_url.rsplit("/", 1)[0]
    for url in (base + "/no_such_db_h3", base.replace("postgres@", "no_such_user_h3@") + "/postgres"):
        for argv in (("status",), ("query",), ("query", "SELECT 1"), ("db", "current")):
            out = run_cli(*argv, "--db", url)
            assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr, (
                argv, out.stderr)
