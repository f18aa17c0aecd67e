"""Read-only summaries of the queue for operators: counts per state and the newest groups."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text

from supervisor.db import Database
from supervisor.models import ACTIVE_SQL, DaemonRecord, Group, SubbandFile, Transition
from supervisor.states import State


def group_summary(group: Group, files_ready: int | None = None) -> dict[str, Any]:
    return {
        "group_id": group.group_id,
        "state": group.state,
        "stage": group.stage,
        "obs_start": group.obs_start.isoformat(),
        "calibrator": group.calibrator_name,
        "pointing_dec_deg": group.pointing_dec_deg,
        "attempt": group.attempt,
        "reason": group.state_reason,
        "error_category": group.error_category,
        "error_code": group.error_code,
        "files_ready": files_ready,
        "updated_at": group.updated_at.isoformat(),
    }


def collect_status(db: Database, limit: int = 20) -> dict[str, Any]:
    """``{"states": {state: count}, "groups": [...newest first], "rejected_files": n}``."""
    with db.read() as s:
        counts = dict(s.execute(select(Group.state, func.count()).group_by(Group.state)).all())
        newest = s.scalars(select(Group).order_by(Group.obs_start.desc()).limit(limit)).all()
        ready_counts = dict(
            s.execute(
                select(SubbandFile.group_id, func.count())
                .where(SubbandFile.status == "ready")
                .where(SubbandFile.group_id.in_([g.group_id for g in newest]))
                .group_by(SubbandFile.group_id)
            ).all()
        )
        rejected = s.scalar(
            select(func.count()).select_from(SubbandFile).where(SubbandFile.status == "rejected")
        )
        in_flight = s.scalars(
            select(Group).where(Group.state == State.RUNNING.value).order_by(Group.obs_start)
        ).all()
        failures = s.scalars(
            select(Transition)
            .where(
                Transition.to_state.in_(
                    [State.FAILED.value, State.QUARANTINED.value, State.RETRY_WAIT.value]
                )
            )
            .order_by(Transition.id.desc())
            .limit(10)
        ).all()
        daemons = s.scalars(
            select(DaemonRecord)
            .where(DaemonRecord.state != "stopped")
            .order_by(DaemonRecord.started_at.desc())
            .limit(10)
        ).all()
        return {
            "states": {state.value: int(counts.get(state.value, 0)) for state in State},
            "daemons": [
                {
                    "owner": d.owner,
                    "state": d.state,
                    "heartbeat_at": d.heartbeat_at.isoformat(),
                    "in_flight": len((d.status or {}).get("in_flight", [])),
                    "paused": (d.status or {}).get("paused", {}),
                }
                for d in daemons
            ],
            "groups": [group_summary(g, ready_counts.get(g.group_id, 0)) for g in newest],
            "in_flight": [
                {
                    "group_id": g.group_id,
                    "stage": g.stage,
                    "attempt": g.attempt,
                    "owner": g.lease_owner,
                    "lease_expires_at": g.lease_expires_at and g.lease_expires_at.isoformat(),
                }
                for g in in_flight
            ],
            "recent_failures": [
                {
                    "group_id": t.group_id,
                    "at": t.at.isoformat(),
                    "state": t.to_state,
                    "stage": t.stage,
                    "category": t.category,
                    "code": t.code,
                    "message": t.message,
                    "hint": t.hint,
                }
                for t in failures
            ],
            "rejected_files": int(rejected or 0),
        }


def queue_snapshot(db: Database, n_subbands: int = 16) -> dict[str, Any]:
    """What the metrics say about the queue, from the database (on its clock): groups per
    state, age of the oldest runnable group, completions in the last hour, age of the
    newest usable calibration set, running groups past their lease, time since the newest
    raw file was seen (since the newest daemon started, when none ever was: a node that
    never receives data is as silent as one that stopped), and how many recent groups each
    subband has been missing from."""
    from datetime import timedelta

    from supervisor.leases import database_now
    from supervisor.models import CalibrationSet

    with db.read() as s:
        now = database_now(s)
        counts = dict(s.execute(select(Group.state, func.count()).group_by(Group.state)).all())
        oldest = s.scalar(select(func.min(Group.first_seen_at)).where(text(ACTIVE_SQL)))
        completed = s.scalar(
            select(func.count())
            .select_from(Group)
            .where(Group.completed_at >= now - timedelta(hours=1))
        )
        newest_cal = s.scalar(
            select(func.max(CalibrationSet.created_at)).where(CalibrationSet.status == "valid")
        )
        expired = s.scalar(
            select(func.count())
            .select_from(Group)
            .where(
                text(ACTIVE_SQL),  # the partial index (models.Group): live rows only
                Group.state == State.RUNNING.value,
                Group.lease_expires_at < now,
            )
        )
        # The newest file row (the id, not a scan of first_seen_at: a year is ~10^6 rows).
        last_file = s.scalar(
            select(SubbandFile.first_seen_at).order_by(SubbandFile.id.desc()).limit(1)
        )
        if last_file is None:  # never a file: silence counts from the newest daemon's start
            last_file = s.scalar(select(func.max(DaemonRecord.started_at)))
        missing = _subband_missing_groups(s, n_subbands)
    return {
        "states": {state.value: int(counts.get(state.value, 0)) for state in State},
        "queue_lag_s": (now - oldest).total_seconds() if oldest else 0.0,
        "completed_last_hour": int(completed or 0),
        "calibration_age_s": (now - newest_cal).total_seconds() if newest_cal else None,
        "leases_expired": int(expired or 0),
        "seconds_since_last_file": (now - last_file).total_seconds() if last_file else None,
        "subband_missing_groups": missing,
    }


RECENT_GROUPS = 24  # two hours of the sky


def _subband_missing_groups(s: Any, n_subbands: int) -> dict[int, int]:
    """For each subband, how many of the newest groups that stopped collecting (up to
    RECENT_GROUPS) lack a ready file of it, counted back from the newest until one has it:
    a correlator node down shows as a subband whose count grows by one per group."""
    newest = (
        s.execute(
            select(Group.group_id)
            .where(Group.state != State.COLLECTING.value)
            .order_by(Group.obs_start.desc())
            .limit(RECENT_GROUPS)
        )
        .scalars()
        .all()
    )
    present: dict[str, set[int]] = {g: set() for g in newest}
    if newest:
        for group_id, subband in s.execute(
            select(SubbandFile.group_id, SubbandFile.subband).where(
                SubbandFile.group_id.in_(newest), SubbandFile.status == "ready"
            )
        ):
            present[group_id].add(int(subband))
    out = {}
    for sb in range(n_subbands):
        run = 0
        for g in newest:
            if sb in present[g]:
                break
            run += 1
        out[sb] = run
    return out
