"""initial schema: sweeps, runs, run_stages, params, metrics, artifacts, ingested_files

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("spec_yaml", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("git_commit", sa.String(64)),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("sweep_id", sa.Integer, sa.ForeignKey("sweeps.id", ondelete="CASCADE"), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(64)),
        sa.Column("executor", sa.String(16)),
        sa.Column("slurm_job_id", sa.String(64)),
        sa.Column("slurm_array_id", sa.String(64)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("ended_at", TS),
        sa.Column("host", sa.String(200)),
        sa.Column("git_commit", sa.String(64)),
        sa.Column("error_tail", sa.Text),
    )
    op.create_index("ix_runs_sweep_status", "runs", ["sweep_id", "status"])
    op.create_table(
        "run_stages",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("slurm_job_id", sa.String(64)),
        sa.Column("started_at", TS),
        sa.Column("ended_at", TS),
        sa.Column("error_tail", sa.Text),
        sa.UniqueConstraint("run_id", "stage", name="uq_run_stages_run_stage"),
    )
    op.create_table(
        "params",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("value_float", sa.Float),
        sa.Column("value_int", sa.BigInteger),
        sa.Column("value_str", sa.Text),
        sa.Column("value_bool", sa.Boolean),
        sa.UniqueConstraint("run_id", "key", name="uq_params_run_key"),
    )
    op.create_index("ix_params_key_float", "params", ["key", "value_float"])
    op.create_index("ix_params_key_int", "params", ["key", "value_int"])
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("step", sa.Integer),
        sa.Column("backbone", sa.String(200)),
        sa.Column("num_samples", sa.Integer),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("source_file", sa.Text),
    )
    op.create_index("ix_metrics_run_stage", "metrics", ["run_id", "stage"])
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer),
    )
    op.create_index("ix_artifacts_run_stage", "artifacts", ["run_id", "stage"])
    op.create_table(
        "ingested_files",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", sa.String(1000), nullable=False, unique=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("run_hash", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("ingested_at", TS, nullable=False),
        sa.UniqueConstraint("run_hash", "stage", "attempt", name="uq_ingested_attempt"),
    )


def downgrade() -> None:
    for name in ("ingested_files", "artifacts", "metrics", "params", "run_stages", "runs", "sweeps"):
        op.drop_table(name)
