"""stage identities: runs.run_key; run_stages.identity / source_id / dir / inputs / length

The columns only: identities are a function of the code's stage declarations
(orchestrator.identity), so ``orchestrate db upgrade`` fills them after this migration with
the code that will plan (orchestrator.adopt), never a frozen copy here.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("run_key", sa.String(64), nullable=True))
        batch.create_index("ix_runs_run_key", ["run_key"])
    with op.batch_alter_table("run_stages") as batch:
        batch.add_column(sa.Column("identity", sa.String(64), nullable=True))
        batch.add_column(sa.Column("source_id", sa.Integer, nullable=True))
        batch.add_column(sa.Column("dir", sa.Text, nullable=True))
        batch.add_column(sa.Column("inputs", sa.JSON(none_as_null=True), nullable=True))
        batch.add_column(sa.Column("length", sa.JSON(none_as_null=True), nullable=True))
        batch.create_index("ix_run_stages_identity", ["identity"])
        batch.create_index("ix_run_stages_source_id", ["source_id"])
        batch.create_foreign_key("fk_run_stages_source_id_run_stages", "run_stages", ["source_id"], ["id"],
                                 ondelete="SET NULL")


def downgrade() -> None:
    with op.batch_alter_table("run_stages") as batch:
        batch.drop_constraint("fk_run_stages_source_id_run_stages", type_="foreignkey")
        batch.drop_index("ix_run_stages_source_id")
        batch.drop_index("ix_run_stages_identity")
        for c in ("length", "inputs", "dir", "source_id", "identity"):
            batch.drop_column(c)
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_run_key")
        batch.drop_column("run_key")
