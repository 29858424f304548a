"""run_stages.result_attempt + run_stages.host; index metrics(name, run_id) for the summary query

``result_attempt`` (the attempt whose metrics are loaded) is backfilled from the metrics
already in the database, so superseding keeps working on upgraded databases.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_stages") as batch:
        batch.add_column(sa.Column("result_attempt", sa.Integer))
        batch.add_column(sa.Column("host", sa.String(200)))
    op.create_index("ix_metrics_name_run", "metrics", ["name", "run_id"])
    # Backfill: the loaded attempt of a stage is the highest attempt among its metrics,
    # or, for stages without metrics, the highest ingested attempt.
    op.execute(
        """
        UPDATE run_stages SET result_attempt = COALESCE(
            (SELECT MAX(m.attempt) FROM metrics m
              WHERE m.run_id = run_stages.run_id AND m.stage = run_stages.stage),
            (SELECT MAX(f.attempt) FROM ingested_files f JOIN runs r ON r.run_hash = f.run_hash
              WHERE r.id = run_stages.run_id AND f.stage = run_stages.stage))
        """
    )


def downgrade() -> None:
    op.drop_index("ix_metrics_name_run", table_name="metrics")
    with op.batch_alter_table("run_stages") as batch:
        batch.drop_column("host")
        batch.drop_column("result_attempt")
