"""predictions: recorded scaling-law predictions (append-only)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("batch", sa.String(64), nullable=False),
        sa.Column("sweep", sa.String(200), nullable=True),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("metric", sa.String(200), nullable=False),
        sa.Column("protocol", sa.Text, nullable=False),
        sa.Column("law", sa.Text, nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("fit_on", sa.Text, nullable=True),
        sa.Column("fit_runs", sa.JSON, nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("lower", sa.Float, nullable=False),
        sa.Column("upper", sa.Float, nullable=False),
        sa.Column("level", sa.Float, nullable=False),
        sa.Column("code_version", sa.String(200), nullable=False),
    )
    op.create_index("ix_predictions_sweep_metric", "predictions", ["sweep", "metric"])


def downgrade() -> None:
    op.drop_index("ix_predictions_sweep_metric", table_name="predictions")
    op.drop_table("predictions")
