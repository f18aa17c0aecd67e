"""The health report, the same for ``contimg-supervisor health`` and ``GET /healthz``:
scheduling-loop liveness, database writable, disk and tmpfs headroom, workspace directories
this process can write, the incoming mount, paused intake, time since the last good
calibration, and the backlog (oldest runnable group) against the 309 s cadence. Each check
is ok, degraded or unhealthy; the report is the worst of them (exit codes 0, 1, 2).
"""

from __future__ import annotations

import shutil
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text

from supervisor import writable
from supervisor.config import Config
from supervisor.db import Database
from supervisor.leases import database_now
from supervisor.metrics import CADENCE_S
from supervisor.models import DaemonRecord
from supervisor.resources import GB, existing_ancestor
from supervisor.status import queue_snapshot

LEVELS = {"ok": 0, "degraded": 1, "unhealthy": 2}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok / degraded / unhealthy
    detail: str
    value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "detail": self.detail,
            "value": self.value,
        }


@dataclass(frozen=True)
class LiveLoop:
    """What a running daemon knows of itself (the HTTP endpoint passes it)."""

    seconds_since_progress: float
    paused: dict[str, list[str]]
    in_flight: int
    state: str
    halted: str | None = None  # why the daemon stopped claiming (its database is damaged)


def report(cfg: Config, db: Database, live: LiveLoop | None = None) -> dict[str, Any]:
    node = cfg.daemon.node_name or socket.gethostname()
    checks: list[Check] = []
    now: datetime | None = None
    try:
        with db.transaction() as s:
            now = database_now(s)
            # A write that changes nothing: proves the database takes writes (locks, disk).
            s.execute(text("UPDATE alembic_version SET version_num = version_num"))
        checks.append(Check("database", "ok", "writable"))
    except Exception as exc:  # noqa: BLE001 - the report must say what is wrong
        checks.append(Check("database", "unhealthy", f"not writable: {type(exc).__name__}: {exc}"))
    record = None
    if now is not None:
        with db.read() as s:
            record = s.scalars(
                select(DaemonRecord)
                .where(DaemonRecord.node == node)
                .order_by(DaemonRecord.started_at.desc())
            ).first()
        snap = queue_snapshot(db)  # the same figures /metrics exports
        checks.append(_backlog(cfg, snap))
        checks.append(_calibration(cfg, snap))
        checks.append(_arrivals(cfg, snap))
    checks.append(_loop(cfg, live, record, now, node))
    checks.append(_intake(live, record))
    checks += _disk(cfg)
    checks.append(_writable(cfg))
    checks.append(_incoming(cfg))
    checks += _database_file(cfg, live)
    worst = max((c.status for c in checks), key=LEVELS.__getitem__)
    return {
        "status": worst,
        "node": node,
        "at": now.isoformat() if now else None,
        "checks": [c.as_dict() for c in checks],
    }


def _arrivals(cfg: Config, snap: dict[str, Any]) -> Check:
    """Data arriving: the telescope drift-scans around the clock, so silence is a fault."""
    age = snap.get("seconds_since_last_file")
    if age is None:
        return Check("arrivals", "ok", "no raw file seen yet, and no daemon has run")
    limit = cfg.health.no_data_warn_s
    missing = {sb: n for sb, n in snap.get("subband_missing_groups", {}).items() if n}
    # (a node that never saw a file counts from its newest daemon's start: status.py)
    detail = f"newest raw file seen {age:.0f} s ago (limit {limit:g} s)"
    if missing:
        detail += "; missing from the newest groups: " + ", ".join(
            f"sb{sb:02d} x{n}" for sb, n in sorted(missing.items())
        )
    return Check("arrivals", "ok" if age <= limit else "degraded", detail, age)


def _incoming(cfg: Config) -> Check:
    """The raw-data mount: there, a directory, listable (a mount point when configured),
    answering within ingest.io_timeout_s. Unhealthy while not: no data can come in."""
    from supervisor import incoming

    state = incoming.look(cfg)
    return Check("incoming", "ok" if state.ok else "unhealthy", state.detail)


def corrupt_report(cfg: Config, detail: str) -> dict[str, Any]:
    """The report for a database that must not be opened (``health`` checked it first)."""
    node = cfg.daemon.node_name or socket.gethostname()
    check = Check("database", "unhealthy", detail)
    return {"status": "unhealthy", "node": node, "at": None, "checks": [check.as_dict()]}


def _database_file(cfg: Config, live: LiveLoop | None) -> list[Check]:
    """SQLite only: the daemon's halt (corrupt, or its file removed), and the age of the
    newest verified backup against backup.stale_after_s."""
    from supervisor import backup, dbfile

    path = dbfile.sqlite_file(cfg.database_url)
    if path is None:
        return []
    checks = []
    if live is not None and live.halted:
        checks.append(Check("database_file", "unhealthy", live.halted))
    elif not path.exists():
        checks.append(Check("database_file", "unhealthy", f"{path} is missing"))
    if cfg.backup.enabled:
        newest = backup.newest(cfg.path("backups"))
        if newest is None:
            checks.append(
                Check("backup", "degraded", f"no verified backup in {cfg.path('backups')}")
            )
        else:
            age = (datetime.now(newest.taken_at.tzinfo) - newest.taken_at).total_seconds()
            limit = cfg.backup.stale_after_s
            checks.append(
                Check(
                    "backup",
                    "ok" if age <= limit else "degraded",
                    f"newest verified backup {newest.path.name}, {age:.0f} s old "
                    f"(limit {limit:g} s)",
                    age,
                )
            )
    return checks


def exit_code(rep: dict[str, Any]) -> int:
    return LEVELS[rep["status"]]


def _loop(
    cfg: Config,
    live: LiveLoop | None,
    record: DaemonRecord | None,
    now: datetime | None,
    node: str,
) -> Check:
    limit = cfg.health.loop_stale_s
    if live is not None:
        age, state = live.seconds_since_progress, live.state
    elif record is None or now is None:
        return Check("loop", "unhealthy", f"no daemon has recorded itself on node {node}")
    else:
        age, state = (now - record.heartbeat_at).total_seconds(), record.state
        if state == "stopped":
            return Check("loop", "unhealthy", f"daemon {record.owner} stopped", age)
    status = "ok" if age <= limit else "unhealthy"
    return Check("loop", status, f"{state}; last progress {age:.1f} s ago (limit {limit:g} s)", age)


def _intake(live: LiveLoop | None, record: DaemonRecord | None) -> Check:
    paused = live.paused if live is not None else ((record.status or {}).get("paused") or {})
    if not paused:
        return Check("intake", "ok", "no stage paused")
    text_ = "; ".join(f"{stage}: {', '.join(reasons)}" for stage, reasons in paused.items())
    return Check("intake", "degraded", f"paused {text_}", float(len(paused)))


def _disk(cfg: Config) -> list[Check]:

    out = []
    floor = cfg.resources.min_free_disk_gb
    free = shutil.disk_usage(existing_ancestor(cfg.path("products"))).free / GB
    status = "ok" if free >= 2 * floor else ("degraded" if free >= floor else "unhealthy")
    out.append(Check("disk", status, f"{free:.1f} GB free on {cfg.path('products')}", free))
    if cfg.paths.tmpfs_staging:
        tfree = shutil.disk_usage(existing_ancestor(cfg.path("tmpfs_staging"))).free / GB
        # Short tmpfs only means conversion stages on disk (slower): degraded at worst.
        status = "ok" if tfree >= 1.0 else "degraded"
        out.append(Check("tmpfs", status, f"{tfree:.1f} GB free on tmpfs staging", tfree))
    return out


def _writable(cfg: Config) -> Check:
    problems = writable.workspace_problems(cfg)
    if not problems:
        return Check("writable", "ok", f"{writable.process_user()} can write the workspace")
    return Check("writable", "unhealthy", "; ".join(str(p) for p in problems), len(problems))


def _backlog(cfg: Config, snap: dict[str, Any]) -> Check:
    age = snap["queue_lag_s"]
    if not age:
        return Check("backlog", "ok", "nothing waiting", 0.0)
    h = cfg.health
    status = (
        "ok" if age <= h.backlog_warn_s else "degraded" if age <= h.backlog_fail_s else "unhealthy"
    )
    return Check(
        "backlog",
        status,
        f"oldest runnable group seen {age:.0f} s ago ({age / CADENCE_S:.1f} cadences of 309 s)",
        age,
    )


def _calibration(cfg: Config, snap: dict[str, Any]) -> Check:
    age_s = snap["calibration_age_s"]
    if age_s is None:
        if not any(snap["states"].values()):
            return Check("calibration", "ok", "no groups yet")
        return Check("calibration", "degraded", "no calibration set has been registered")
    hours = age_s / 3600.0
    status = "ok" if hours <= cfg.health.calibration_warn_h else "degraded"
    return Check("calibration", status, f"last good calibration {hours:.1f} h ago", age_s)
