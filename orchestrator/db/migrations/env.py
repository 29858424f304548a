"""Alembic environment.  Run only through ``orchestrate db ...`` / ``Store.upgrade()``, which pass
their own connection (so SQLite pragmas apply) in ``config.attributes["connection"]``."""
from alembic import context
from sqlalchemy import create_engine

from orchestrator.db.models import VERSION_TABLE, Base

config = context.config


def _run(connection) -> None:
    # SQLite cannot ALTER most things in place: batch mode copies the table.
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      version_table=VERSION_TABLE, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _run(config.attributes["connection"])
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
