"""What an operator can do: look at a group's whole history, retry it, requeue it from an
earlier stage, or quarantine it (every such action is an audited transition like any
other); list and inspect calibration sets, and retire one so that it is never chosen again.
"""

from __future__ import annotations

import getpass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from supervisor import manifest
from supervisor.db import Database
from supervisor.errors import Category, Failure
from supervisor.leases import database_now
from supervisor.models import (
    Artifact,
    CalibrationSet,
    Group,
    Product,
    StageAttempt,
    SubbandFile,
    Transition,
)
from supervisor.states import STAGE_ORDER, Actor, Stage, State, transition
from supervisor.status import group_summary


class OperatorError(Exception):
    exit_code = 2


class GroupNotFound(OperatorError):
    exit_code = 1


class ForbiddenAction(OperatorError):
    exit_code = 2


def operator_actor() -> Actor:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor(f"operator:{user}")


def _get(s: Session, group_id: str) -> Group:
    group = s.get(Group, group_id)
    if group is None:
        raise GroupNotFound(f"no group {group_id!r} (see `contimg-supervisor status`)")
    return group


def show_group(db: Database, group_id: str) -> dict[str, Any]:
    """The group with its full history: transitions, attempts (errors, hints), artifacts."""
    with db.transaction() as s:
        group = _get(s, group_id)
        files = s.scalars(
            select(SubbandFile)
            .where(SubbandFile.group_id == group_id)
            .order_by(SubbandFile.subband, SubbandFile.id)
        ).all()
        out = group_summary(group, sum(f.status == "ready" for f in files))
        out.update(
            correlation_id=group.correlation_id,
            is_calibrator=group.is_calibrator,
            fallback_tier=group.fallback_tier,
            crash_count=group.crash_count,
            fencing_token=group.fencing_token,
            lease_owner=group.lease_owner,
            lease_expires_at=_iso(group.lease_expires_at),
            next_attempt_at=_iso(group.next_attempt_at),
            completed_at=_iso(group.completed_at),
        )
        out["transitions"] = [
            {
                "at": _iso(t.at),
                "from": t.from_state,
                "to": t.to_state,
                "stage": t.stage,
                "attempt": t.attempt,
                "category": t.category,
                "code": t.code,
                "message": t.message,
                "hint": t.hint,
                "actor": t.actor,
            }
            for t in s.scalars(
                select(Transition).where(Transition.group_id == group_id).order_by(Transition.id)
            )
        ]
        out["attempts"] = [
            {
                "stage": a.stage,
                "attempt": a.attempt,
                "tier": a.fallback_tier,
                "outcome": a.outcome,
                "started_at": _iso(a.started_at),
                "finished_at": _iso(a.finished_at),
                "exit_code": a.exit_code,
                "worker_seconds": a.worker_seconds,
                "worker_cpu_seconds": a.worker_cpu_seconds,
                "peak_rss_bytes": a.peak_rss_bytes,
                "pid": a.pid,
                "workdir": a.workdir,
                "error": None
                if a.error_category is None
                else {
                    "category": a.error_category,
                    "code": a.error_code,
                    "type": a.error_type,
                    "message": a.error_message,
                    "hint": a.hint,
                },
            }
            for a in s.scalars(
                select(StageAttempt)
                .where(StageAttempt.group_id == group_id)
                .order_by(StageAttempt.id)
            )
        ]
        out["artifacts"] = [
            {
                "stage": a.stage,
                "kind": a.kind,
                "path": a.path,
                "bytes": a.bytes,
                "pruned_at": _iso(a.pruned_at),
                "pruned_rule": a.pruned_rule,
            }
            for a in s.scalars(
                select(Artifact).where(Artifact.group_id == group_id).order_by(Artifact.id)
            )
        ]
        out["files"] = [
            {
                "subband": f.subband,
                "path": f.path,
                "status": f.status,
                "reason_code": f.reason_code,
                "reason": f.reason,
            }
            for f in files
        ]
        return out


_RESET = {
    "attempt": 0,
    "crash_count": 0,
    "fallback_tier": 0,
    "next_attempt_at": None,
    "lease_owner": None,
    "lease_expires_at": None,
}


def retry_group(
    db: Database, group_id: str, *, now: datetime | None = None, actor: Actor | None = None
) -> Group:
    """Run a failed, quarantined or retry-waiting group again from its checkpoint, now,
    with fresh budgets."""
    with db.transaction() as s:
        group = _get(s, group_id)
        allowed = (State.FAILED, State.QUARANTINED, State.RETRY_WAIT, State.WAITING_CALIBRATION)
        if group.state not in allowed:
            raise ForbiddenAction(
                f"group {group_id} is {group.state}: retry applies to "
                f"{', '.join(allowed)}; see `requeue --from-stage` for completed groups"
            )
        if group.stage is None:
            raise ForbiddenAction(
                f"group {group_id} never completed ingest ({group.state_reason}); "
                "use `requeue --from-stage preflight` once its files are fixed"
            )
        return transition(
            s,
            group,
            State.PENDING,
            now=now or database_now(s),
            actor=actor or operator_actor(),
            message=f"operator retry at stage {group.stage}",
            set_fields=_RESET,
        )


def requeue_group(
    db: Database,
    group_id: str,
    from_stage: str,
    *,
    now: datetime | None = None,
    actor: Actor | None = None,
    reason: str | None = None,
    products: Path | None = None,
) -> Group:
    """Send a group that is not running back to ``from_stage`` (which must not lie beyond
    its last committed stage). The commit manifests of ``from_stage`` and later (under
    ``products``) are marked superseded, so that a rebuild does not bring them back."""
    group = _requeue(db, group_id, from_stage, now=now, actor=actor, reason=reason)
    if products is not None:
        start = STAGE_ORDER.index(Stage(from_stage))
        for stage in STAGE_ORDER[start:]:
            manifest.record_event(
                products,
                group_id,
                stage.value,
                {
                    "event": "superseded",
                    "at": group.updated_at,
                    "why": reason or f"requeue from {from_stage}",
                },
            )
    return group


def _requeue(
    db: Database,
    group_id: str,
    from_stage: str,
    *,
    now: datetime | None,
    actor: Actor | None,
    reason: str | None,
) -> Group:
    message = reason or f"operator requeue from {from_stage}"
    try:
        stage = Stage(from_stage)
    except ValueError:
        raise ForbiddenAction(
            f"unknown stage {from_stage!r}; stages are {', '.join(STAGE_ORDER)}"
        ) from None
    with db.transaction() as s:
        group = _get(s, group_id)
        if group.state in (State.RUNNING, State.COLLECTING):
            raise ForbiddenAction(f"group {group_id} is {group.state}: cannot requeue it now")
        checkpoint = (
            len(STAGE_ORDER)
            if group.state == State.COMPLETED
            else (STAGE_ORDER.index(Stage(group.stage)) if group.stage else 0)
        )
        if STAGE_ORDER.index(stage) > checkpoint:
            raise ForbiddenAction(
                f"group {group_id}: cannot requeue from {stage}, stages before it never "
                f"committed (checkpoint: {group.stage or 'preflight'})"
            )
        if group.state == State.PENDING:
            group.stage = stage.value  # already runnable: only move its checkpoint back
            s.add(
                Transition(
                    group_id=group_id,
                    from_state="pending",
                    to_state="pending",
                    stage=stage.value,
                    at=now or database_now(s),
                    attempt=0,
                    fencing_token=group.fencing_token,
                    actor=(actor or operator_actor()).name,
                    correlation_id=group.correlation_id,
                    message=message,
                )
            )
            return group
        return transition(
            s,
            group,
            State.PENDING,
            now=now or database_now(s),
            actor=actor or operator_actor(),
            message=message,
            set_fields={**_RESET, "stage": stage.value, "completed_at": None},
        )


def quarantine_group(
    db: Database,
    group_id: str,
    reason: str,
    *,
    now: datetime | None = None,
    actor: Actor | None = None,
) -> Group:
    """Take a group out of processing (not while a worker runs it)."""
    with db.transaction() as s:
        group = _get(s, group_id)
        if group.state == State.RUNNING:
            raise ForbiddenAction(
                f"group {group_id} is running ({group.stage}); quarantine it after the attempt ends"
            )
        if group.state == State.QUARANTINED:
            raise ForbiddenAction(f"group {group_id} is already quarantined")
        if State.QUARANTINED not in _allowed_from(group.state):
            raise ForbiddenAction(f"group {group_id} is {group.state}: cannot quarantine")
        failure = Failure(
            Category.VALIDATION,
            "operator_quarantine",
            reason,
            "quarantined by an operator; `retry` or `requeue` to resume",
        )
        return transition(
            s,
            group,
            State.QUARANTINED,
            now=now or database_now(s),
            actor=actor or operator_actor(),
            failure=failure,
            set_fields={"next_attempt_at": None},
        )


def _allowed_from(state: str) -> frozenset[State]:
    from supervisor.states import ALLOWED

    return ALLOWED[State(state)]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# Calibration sets -----------------------------------------------------------------------


def _set_summary(s: Session, cal_set: CalibrationSet) -> dict[str, Any]:
    users = sorted(
        set(s.scalars(select(Product.group_id).where(Product.calibration_set_id == cal_set.id)))
    )
    return {
        "id": cal_set.id,
        "calibrator": cal_set.calibrator,
        "group_id": cal_set.group_id,
        "solved_at": _iso(cal_set.solved_at),
        "valid_from": _iso(cal_set.valid_from),
        "valid_until": _iso(cal_set.valid_until),
        "status": cal_set.status,
        "status_reason": cal_set.status_reason,
        "quality": {
            k: (cal_set.metrics or {}).get(k)
            for k in (
                "bandpass_snr_median",
                "gain_snr_median",
                "good_antenna_fraction",
                "gain_phase_scatter_deg",
                "solution_flag_fraction",
            )
        },
        "groups_using": len(users),
        "used_by": users,
    }


def calibration_sets(db: Database) -> list[dict[str, Any]]:
    """Every calibration set, newest solve first, with how many groups' products used it."""
    with db.transaction() as s:
        rows = s.scalars(select(CalibrationSet).order_by(CalibrationSet.solved_at.desc()))
        return [_set_summary(s, c) for c in rows]


def calibration_set(db: Database, set_id: int) -> dict[str, Any]:
    with db.transaction() as s:
        cal_set = s.get(CalibrationSet, set_id)
        if cal_set is None:
            raise GroupNotFound(f"no calibration set {set_id}")
        out = _set_summary(s, cal_set)
        out["tables"] = [
            {"kind": t.kind, "path": t.path, "interp": t.interp, "exists": Path(t.path).exists()}
            for t in sorted(cal_set.tables, key=lambda t: t.kind)
        ]
        out["metrics"] = cal_set.metrics
        return out


def retire_calibration_set(
    db: Database,
    set_id: int,
    reason: str,
    *,
    actor: Actor | None = None,
    products: Path | None = None,
) -> dict[str, Any]:
    """Never choose this set again (targets fall back to other sets); returns the set with
    the completed groups that used it, which an operator may want to ``requeue``."""
    with db.transaction() as s:
        cal_set = s.get(CalibrationSet, set_id)
        if cal_set is None:
            raise GroupNotFound(f"no calibration set {set_id}")
        if cal_set.status == "retired":
            raise ForbiddenAction(f"calibration set {set_id} is already retired")
        who = (actor or operator_actor()).name
        cal_set.status = "retired"
        cal_set.status_reason = f"retired by {who}: {reason}"
        out = _set_summary(s, cal_set)
        when, set_group = database_now(s), cal_set.group_id
    if products is not None:
        manifest.record_calibration_status(
            products, set_group, set_id, "retired", out["status_reason"], when
        )
    completed = []
    with db.transaction() as s:
        for gid in out["used_by"]:
            g = s.get(Group, gid)
            if g is not None and g.state == State.COMPLETED:
                completed.append(gid)
    out["completed_groups_to_requeue"] = completed
    return out
