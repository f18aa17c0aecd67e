"""The one SQLAlchemy schema: ingest queue, subband files, attempts, audit log, products.

Times are stored as naive UTC and returned as aware UTC (``UTCDateTime``) so SQLite and
PostgreSQL behave alike. The transition table is append-only: rows are never updated.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so Alembic migrations match on both engines.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC, always handed back timezone-aware (UTC)."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# The partial indexes' conditions, as literal SQL: a query uses a partial index only when
# its WHERE repeats the index's term (bound parameters would not do).
CLAIMABLE_SQL = "state IN ('pending', 'retry_wait')"
ACTIVE_SQL = "state IN ('pending', 'retry_wait', 'running')"


class Group(Base):
    """One observation group (16 subbands sharing a start time): a row of the ingest queue.

    ``state`` is the lifecycle state (see :mod:`supervisor.states`); ``stage`` is the next
    stage to run (the checkpoint: every stage before it has committed).
    """

    __tablename__ = "groups"

    group_id: Mapped[str] = mapped_column(String(32), primary_key=True)  # earliest timestamp
    obs_start: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    state_reason: Mapped[str | None] = mapped_column(Text)
    error_category: Mapped[str | None] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(64))
    pointing_dec_deg: Mapped[float | None] = mapped_column(Float)
    is_calibrator: Mapped[bool] = mapped_column(Boolean, default=False)
    calibrator_name: Mapped[str | None] = mapped_column(String(32))
    # Why the group is (or is not) a calibrator group: the candidates considered, hour angle,
    # primary-beam gain and apparent flux of the one chosen (see calibrators.choose_calibrator).
    calibrator_choice: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    obs_duration_s: Mapped[float | None] = mapped_column(Float)  # from the files' time arrays
    priority: Mapped[int] = mapped_column(Integer, default=0)  # lower runs first
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # attempts of the current stage
    crash_count: Mapped[int] = mapped_column(Integer, default=0)
    fallback_tier: Mapped[int] = mapped_column(Integer, default=0)
    fencing_token: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    correlation_id: Mapped[str] = mapped_column(String(36))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    files: Mapped[list[SubbandFile]] = relationship(back_populates="group")

    __table_args__ = (
        Index("ix_groups_runnable", "state", "priority", "obs_start"),
        # Partial: only the few live rows, so that a claim and the queue figures stay fast
        # with a million finished groups (migration 0005). Queries repeat the exact term.
        Index(
            "ix_groups_claimable",
            "priority",
            "obs_start",
            sqlite_where=text(CLAIMABLE_SQL),
            postgresql_where=text(CLAIMABLE_SQL),
        ),
        Index(
            "ix_groups_active",
            "first_seen_at",
            sqlite_where=text(ACTIVE_SQL),
            postgresql_where=text(ACTIVE_SQL),
        ),
        Index("ix_groups_completed_at", "completed_at"),
    )


class SubbandFile(Base):
    """A file seen in the incoming directory, with its readiness and any rejection reason.

    Rows are kept for rejected files too, so that ingest is idempotent and the reason stays
    visible. The file itself is never modified, moved or deleted.
    """

    __tablename__ = "subband_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    group_id: Mapped[str | None] = mapped_column(ForeignKey("groups.group_id"), index=True)
    subband: Mapped[int] = mapped_column(Integer)
    file_time: Mapped[datetime] = mapped_column(UTCDateTime)  # from the file name
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)  # see ingest.FileStatus
    reason_category: Mapped[str | None] = mapped_column(String(16))
    reason_code: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    observed_at: Mapped[datetime] = mapped_column(UTCDateTime)  # when size/mtime last changed
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Integrations in the file (UVH5 ``Ntimes``; not the length of ``time_array``, which is
    # Nblts) and the span they cover, first start to last end, in seconds.
    n_integrations: Mapped[int | None] = mapped_column(Integer)
    time_span_s: Mapped[float | None] = mapped_column(Float)

    group: Mapped[Group | None] = relationship(back_populates="files")


class StageAttempt(Base):
    """One run of one stage worker for one group."""

    __tablename__ = "stage_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.group_id"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer)
    fallback_tier: Mapped[int] = mapped_column(Integer, default=0)
    fencing_token: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(16))  # running/succeeded/failed/abandoned
    owner: Mapped[str] = mapped_column(String(128))
    workdir: Mapped[str] = mapped_column(String(1024))
    pid: Mapped[int | None] = mapped_column(Integer)
    pgid: Mapped[int | None] = mapped_column(Integer)
    proc_start_time: Mapped[float | None] = mapped_column(Float)  # psutil create_time, s
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error_category: Mapped[str | None] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_type: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    correlation_id: Mapped[str] = mapped_column(String(36))
    peak_rss_bytes: Mapped[int | None] = mapped_column(BigInteger)  # worker + descendants
    worker_seconds: Mapped[float | None] = mapped_column(Float)  # spawn to exit, wall (s)
    # user + system CPU (s) of the worker and the descendants it waited for (wait4 rusage)
    worker_cpu_seconds: Mapped[float | None] = mapped_column(Float)


class Transition(Base):
    """Append-only audit log: one row per state change, written with the change itself."""

    __tablename__ = "transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.group_id"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    fencing_token: Mapped[int] = mapped_column(BigInteger, default=0)
    category: Mapped[str | None] = mapped_column(String(16))
    code: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    correlation_id: Mapped[str] = mapped_column(String(36))


class Artifact(Base):
    """A file or directory produced by a stage attempt (MS, caltable, image, preview)."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.group_id"), index=True)
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("stage_attempts.id"))
    stage: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Retention removed the file (the row stays, saying by which rule and when).
    pruned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pruned_rule: Mapped[str | None] = mapped_column(String(64))


class Product(Base):
    """A registered science product: the group's MS, images, and their QA numbers."""

    __tablename__ = "products"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.group_id"), index=True)
    kind: Mapped[str] = mapped_column(
        String(32)
    )  # ms / image_fits / image_pbcor_fits / image_png / qa
    path: Mapped[str | None] = mapped_column(String(1024))
    calibration_tier: Mapped[str | None] = mapped_column(String(32))
    calibration_set_id: Mapped[int | None] = mapped_column(ForeignKey("calibration_sets.id"))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    pruned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pruned_rule: Mapped[str | None] = mapped_column(String(64))


class QualityAssessment(Base):
    """One quality-gate verdict for one stage of one group (score 0..1, ALMA colour bands)."""

    __tablename__ = "quality_assessments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.group_id"), index=True)
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("stage_attempts.id"))
    stage: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(8))  # pass / warn / fail
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CalibrationSet(Base):
    """Calibration tables solved on one calibrator group, valid over a time window."""

    __tablename__ = "calibration_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    group_id: Mapped[str] = mapped_column(ForeignKey("groups.group_id"), index=True)
    calibrator: Mapped[str] = mapped_column(String(32))
    solved_at: Mapped[datetime] = mapped_column(UTCDateTime)  # observation mid-time
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    valid_until: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    status: Mapped[str] = mapped_column(String(16))  # valid / invalid / retired
    status_reason: Mapped[str | None] = mapped_column(Text)  # why invalid or retired
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    tables: Mapped[list[CalibrationTable]] = relationship(back_populates="calibration_set")


class CalibrationTable(Base):
    """One CASA calibration table (bandpass, gain ...) belonging to a calibration set."""

    __tablename__ = "calibration_tables"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    set_id: Mapped[int] = mapped_column(ForeignKey("calibration_sets.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # G0 / B / G
    path: Mapped[str] = mapped_column(String(1024))
    interp: Mapped[str] = mapped_column(String(32))  # applycal interpolation
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    calibration_set: Mapped[CalibrationSet] = relationship(back_populates="tables")

    __table_args__ = (UniqueConstraint("set_id", "kind"),)


class DaemonRecord(Base):
    """One daemon process (node, pid, start time): its lifecycle state and the moment its
    scheduling loop last proved it was alive (a database write), with a status snapshot
    (attempts in flight, paused intake). Read by ``health`` and ``status``."""

    __tablename__ = "daemons"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)  # node:pid:start
    node: Mapped[str] = mapped_column(String(128), index=True)
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(16))  # starting / running / draining / stopped
    status: Mapped[dict[str, Any] | None] = mapped_column(JSON)
