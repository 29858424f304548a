"""The results database schema (SQLAlchemy 2 typed ORM).  This module is the head revision;
the alembic scripts in ``migrations/versions`` bring an older database to it.

sweeps 1─* runs 1─* {run_stages, params, metrics, artifacts};  ingested_files records every
loaded result file (idempotent ingestion);  predictions holds recorded scaling-law predictions
(append-only, written by ``orchestrate predict``).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Run / stage life cycle.  Stage result files only carry the last three terminal-or-requeue states.
STATUSES = ("pending", "queued", "running", "finished", "failed", "cancelled", "preempted")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Our alembic version table. Not alembic's default "alembic_version": Optuna keeps its own
# schema revision there when a study lives in the same database.
VERSION_TABLE = "tcae_schema_version"


class Base(DeclarativeBase):
    pass


class Sweep(Base):
    __tablename__ = "sweeps"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    spec_yaml: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    git_commit: Mapped[str | None] = mapped_column(String(64))
    # Flattened config of the sweep's first run (revision 0003; see orchestrator.db.configs).
    base_config: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))

    runs: Mapped[list["Run"]] = relationship(back_populates="sweep")


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_hash: Mapped[str] = mapped_column(String(64), unique=True)  # directory name; = run_key for new runs
    # orchestrator.identity.run_key: hash of the non-default config (revision 0005); a run
    # written before 0005 keeps its run_hash (its directory) and is found by this key.
    run_key: Mapped[str | None] = mapped_column(String(64), index=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id", ondelete="CASCADE"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # resolved RunConfig
    # Flattened keys where config differs from sweep.base_config (revision 0003).
    config_delta: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # one of STATUSES
    stage: Mapped[str | None] = mapped_column(String(64))  # last stage that changed state
    executor: Mapped[str | None] = mapped_column(String(16))
    slurm_job_id: Mapped[str | None] = mapped_column(String(64))
    slurm_array_id: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # highest attempt of any stage
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    host: Mapped[str | None] = mapped_column(String(200))
    git_commit: Mapped[str | None] = mapped_column(String(64))
    error_tail: Mapped[str | None] = mapped_column(Text)

    sweep: Mapped[Sweep] = relationship(back_populates="runs")
    stages: Mapped[list["RunStage"]] = relationship(back_populates="run", cascade="all, delete-orphan")
    params: Mapped[list["Param"]] = relationship(cascade="all, delete-orphan")
    metrics: Mapped[list["Metric"]] = relationship(cascade="all, delete-orphan")
    artifacts: Mapped[list["Artifact"]] = relationship(cascade="all, delete-orphan")

    __table_args__ = (Index("ix_runs_sweep_status", "sweep_id", "status"),)


class RunStage(Base):
    """Per-stage state: written by the submitter (queued/running/cancelled) and the ingester."""

    __tablename__ = "run_stages"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempt: Mapped[int | None] = mapped_column(Integer)  # latest attempt known (submitted or ingested)
    # Attempt whose metrics/artifacts are in the database (added in revision 0002).
    result_attempt: Mapped[int | None] = mapped_column(Integer)
    slurm_job_id: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str | None] = mapped_column(String(200))  # added in revision 0002
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_tail: Mapped[str | None] = mapped_column(Text)
    # Stage identity (revision 0005, orchestrator.identity): the result lives in ``dir``; a
    # stage reused from another run points at that run's row (``source_id``) and mirrors its
    # state.  ``inputs``: what the identity was computed from (the plan's re-run reasons);
    # ``length``: the generator's steps / eval points (excluded from its identity).
    identity: Mapped[str | None] = mapped_column(String(64), index=True)
    source_id: Mapped[int | None] = mapped_column(ForeignKey("run_stages.id", ondelete="SET NULL"), index=True)
    dir: Mapped[str | None] = mapped_column(Text)
    inputs: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    length: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))

    run: Mapped[Run] = relationship(back_populates="stages")

    __table_args__ = (UniqueConstraint("run_id", "stage", name="uq_run_stages_run_stage"),)


class Param(Base):
    """One sweep-axis value of a run, typed: exactly one ``value_*`` column is set, named by ``kind``."""

    __tablename__ = "params"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(8))  # float | int | str | bool | null
    value_float: Mapped[float | None] = mapped_column(Float)
    value_int: Mapped[int | None] = mapped_column(BigInteger)
    value_str: Mapped[str | None] = mapped_column(Text)
    value_bool: Mapped[bool | None] = mapped_column(Boolean)

    __table_args__ = (
        UniqueConstraint("run_id", "key", name="uq_params_run_key"),
        Index("ix_params_key_float", "key", "value_float"),
        Index("ix_params_key_int", "key", "value_int"),
    )

    @property
    def value(self) -> Any:
        return None if self.kind == "null" else getattr(self, f"value_{self.kind}")


def param_columns(value: Any) -> dict[str, Any]:
    """Typed columns for one param value: ``{"kind": ..., "value_<kind>": value}``."""
    cols = {"kind": "null", "value_float": None, "value_int": None, "value_str": None, "value_bool": None}
    if value is None:
        return cols
    # bool before int: bool is a subclass of int.
    kind = ("bool" if isinstance(value, bool) else "int" if isinstance(value, int)
            else "float" if isinstance(value, float) else "str")
    cols["kind"] = kind
    cols[f"value_{kind}"] = value if kind != "str" else str(value)
    return cols


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float | None] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer)
    backbone: Mapped[str | None] = mapped_column(String(200))  # what produced the number
    num_samples: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    source_file: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_metrics_run_stage", "run_id", "stage"),
        Index("ix_metrics_name_run", "name", "run_id"),  # added in revision 0002
    )


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(64))  # checkpoint | samples | figure | ...
    path: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (Index("ix_artifacts_run_stage", "run_id", "stage"),)


class IngestedFile(Base):
    """One loaded result file.  ``path`` and (run_hash, stage, attempt) are each unique, so
    concurrent ingesters cannot load one file (or one attempt) twice."""

    __tablename__ = "ingested_files"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(1000), unique=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    run_hash: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    ingested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (UniqueConstraint("run_hash", "stage", "attempt", name="uq_ingested_attempt"),)


class Prediction(Base):
    """One recorded prediction of a metric for one configuration (revision 0004).  Rows are
    never updated: a new fit is a new ``batch``."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    batch: Mapped[str] = mapped_column(String(64))  # one uuid hex per `orchestrate predict`
    sweep: Mapped[str | None] = mapped_column(String(200))  # the sweep whose configurations are predicted
    target: Mapped[str] = mapped_column(Text)  # canonical JSON of the grid values, seed excluded
    metric: Mapped[str] = mapped_column(String(200))
    protocol: Mapped[str] = mapped_column(Text)  # canonical JSON of the evaluation protocol
    law: Mapped[str] = mapped_column(Text)
    params: Mapped[Any] = mapped_column(JSON, nullable=False)
    fit_on: Mapped[str | None] = mapped_column(Text)
    fit_runs: Mapped[Any] = mapped_column(JSON, nullable=False)
    value: Mapped[float] = mapped_column(Float)
    lower: Mapped[float] = mapped_column(Float)
    upper: Mapped[float] = mapped_column(Float)
    level: Mapped[float] = mapped_column(Float)
    code_version: Mapped[str] = mapped_column(String(200))

    __table_args__ = (Index("ix_predictions_sweep_metric", "sweep", "metric"),)
