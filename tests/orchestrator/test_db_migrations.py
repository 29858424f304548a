"""Alembic migrations: an older database with data in it is upgraded to head; the `db` command."""
from __future__ import annotations

import json

from sqlalchemy import inspect, text

from orchestrator.db import Store
from orchestrator.ingest import ingest

def _fill_revision_1(store: Store) -> None:
    """Rows as the revision-0001 code would have written them (raw SQL: the ORM is at head)."""
    with store.engine.begin() as c:
        c.execute(text("INSERT INTO sweeps (id, name, created_at) VALUES (1, 'old', '2025-01-01 00:00:00')"))
        c.execute(text("INSERT INTO runs (id, run_hash, sweep_id, config, status, attempts, created_at) "
                       "VALUES (1, 'aaaaaaaaaaaaaaaa', 1, '{\"model\": {\"patch_size\": 4}}', 'finished', 2, "
                       "'2025-01-01 00:00:00')"))
        c.execute(text("INSERT INTO run_stages (id, run_id, stage, status, attempt) VALUES "
                       "(1, 1, 'tokenizer', 'finished', 2), (2, 1, 'evaluate', 'finished', 1)"))
        c.execute(text("INSERT INTO metrics (run_id, stage, name, value, step, attempt) VALUES "
                       "(1, 'tokenizer', 'train_loss', 0.5, 100, 2)"))
        c.execute(text("INSERT INTO ingested_files (path, sha256, size, run_hash, stage, attempt, ingested_at) VALUES "
                       "('/x/tokenizer.attempt2.json', 's', 1, 'aaaaaaaaaaaaaaaa', 'tokenizer', 2, '2025-01-01'), "
                       "('/x/evaluate.attempt1.json', 't', 1, 'aaaaaaaaaaaaaaaa', 'evaluate', 1, '2025-01-01')"))


def test_upgrade_an_older_database_with_data(db_url, write_result, tmp_path):
    store = Store(db_url)
    store.upgrade("0001")
    assert store.current_revision() == "0001"
    cols = {c["name"] for c in inspect(store.engine).get_columns("run_stages")}
    assert "result_attempt" not in cols and "host" not in cols
    _fill_revision_1(store)

    store.upgrade()
    assert store.current_revision() == store.head_revision()
    (run,) = store.runs(with_config=True)
    assert (run.run_hash, run.sweep.name, run.status, run.config) == (
        "aaaaaaaaaaaaaaaa", "old", "finished", {"model": {"patch_size": 4}})
    stages = {st.stage: st for st in run.stages}
    # backfilled: from the metrics (tokenizer), else from the ingested files (evaluate)
    assert stages["tokenizer"].result_attempt == 2 and stages["evaluate"].result_attempt == 1
    assert "ix_metrics_name_run" in {i["name"] for i in inspect(store.engine).get_indexes("metrics")}
    with store.engine.connect() as c:  # 0003 backfilled the flat base / delta of the old run
        base, delta = c.execute(text("SELECT s.base_config, r.config_delta FROM runs r "
                                     "JOIN sweeps s ON s.id = r.sweep_id")).one()
    assert (json.loads(base) if isinstance(base, str) else base) == {"model.patch_size": 4}
    assert (json.loads(delta) if isinstance(delta, str) else delta) == {}
    from orchestrator.query import runs_table

    assert list(runs_table(store)["model.patch_size"]) == [4]

    # the upgraded data behaves like new data: attempt 3 supersedes the migrated attempt 2
    write_result("a" * 16, "tokenizer", 3, sweep="old", metrics=[{"name": "train_loss", "value": 0.1, "step": 200}])
    r = ingest(store, [tmp_path / "runs"])
    assert (r.loaded, r.superseded, r.errors) == (1, 1, [])
    with store.engine.connect() as c:
        assert c.execute(text("SELECT value, attempt FROM metrics")).all() == [(0.1, 3)]
    store.dispose()


def test_downgrade_and_reupgrade(sqlite_url):
    store = Store(sqlite_url)
    store.upgrade()
    from alembic import command

    with store.engine.begin() as conn:
        command.downgrade(store._alembic_config(conn), "0001")
    assert store.current_revision() == "0001"
    store.upgrade()
    assert store.current_revision() == store.head_revision()
    store.dispose()


def test_db_command(tmp_path, run_cli):
    url = f"sqlite:///{tmp_path}/m.db"
    out = run_cli("db", "current", "--db", url)
    assert out.returncode == 0 and "<none>" in out.stdout and "orchestrate db upgrade" in out.stdout
    out = run_cli("db", "upgrade", "0001", "--db", url)
    assert out.returncode == 0 and "at revision 0001" in out.stdout, out.stderr
    out = run_cli("status", "--db", url)  # outdated schema: clear error, exit 2, nothing migrated
    assert out.returncode == 2 and "revision 0001" in out.stderr and "orchestrate db upgrade" in out.stderr
    assert Store(url).current_revision() == "0001"
    out = run_cli("db", "upgrade", "--db", url)
    assert out.returncode == 0 and f"at revision {Store(url).head_revision()}" in out.stdout
    out = run_cli("db", "stamp", "0001", "--db", url)
    assert out.returncode == 0 and "stamped 0001" in out.stdout
    out = run_cli("db", "stamp", "nonsense", "--db", url)
    assert out.returncode == 2 and "nonsense" in out.stderr
    out = run_cli("db", "stamp", "--db", url)
    assert out.returncode == 2 and "needs a revision" in out.stderr


def test_migrations_match_the_models(db_url):
    """The head revision creates exactly the schema of orchestrator/db/models.py."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from orchestrator.db.models import VERSION_TABLE, Base

    store = Store(db_url)
    store.upgrade()
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
        diff = compare_metadata(ctx, Base.metadata)
    store.dispose()
    assert diff == []
