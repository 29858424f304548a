"""sweeps.base_config + runs.config_delta: flattened config base per sweep and per-run delta

Lets the one-row-per-run table skip decoding every full config.  Existing rows are
backfilled (the sweep's base is its first run's flattened config).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def upgrade() -> None:
    with op.batch_alter_table("sweeps") as batch:
        batch.add_column(sa.Column("base_config", sa.JSON(none_as_null=True)))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("config_delta", sa.JSON(none_as_null=True)))
    # Backfill (frozen copy of orchestrator.db.configs: migrations must not change with the code).
    conn = op.get_bind()
    runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("sweep_id", sa.Integer),
                    sa.column("config", sa.JSON), sa.column("config_delta", sa.JSON(none_as_null=True)))
    sweeps = sa.table("sweeps", sa.column("id", sa.Integer), sa.column("base_config", sa.JSON(none_as_null=True)))
    bases = {}
    for rid, sid, cfg in conn.execute(sa.select(runs.c.id, runs.c.sweep_id, runs.c.config).order_by(runs.c.id)):
        cfg = json.loads(cfg) if isinstance(cfg, str) else (cfg or {})
        flat = _flatten(cfg)
        if sid not in bases:
            bases[sid] = flat
            conn.execute(sweeps.update().where(sweeps.c.id == sid).values(base_config=flat))
        base = bases[sid]
        delta = {k: v for k, v in flat.items() if k not in base or base[k] != v or type(base[k]) is not type(v)}
        missing = [k for k in base if k not in flat]
        if missing:
            delta["__unset__"] = missing
        conn.execute(runs.update().where(runs.c.id == rid).values(config_delta=delta))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("config_delta")
    with op.batch_alter_table("sweeps") as batch:
        batch.drop_column("base_config")
