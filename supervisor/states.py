"""The group lifecycle: allowed transitions, and the one guarded way to change a group's state.

Every change is ``UPDATE groups ... WHERE state IN (:allowed_from) [AND fencing_token =
:token]`` plus an append-only audit row, in the caller's transaction. A writer whose view is
stale (another process moved the group, or its claim was lost) changes nothing and gets
:class:`StaleTransition`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from supervisor.errors import Failure
from supervisor.models import Group, Transition


class State(enum.StrEnum):
    COLLECTING = "collecting"  # subband files still arriving
    PENDING = "pending"  # runnable: ``Group.stage`` is the next stage to run
    RUNNING = "running"  # claimed under a lease by one worker
    RETRY_WAIT = "retry_wait"  # failed transiently; runnable again at ``next_attempt_at``
    WAITING_CALIBRATION = "waiting_calibration"  # needs tables that do not exist yet
    COMPLETED = "completed"  # registered; terminal
    FAILED = "failed"  # fatal: needs an operator; terminal
    QUARANTINED = "quarantined"  # bad data, skipped; terminal


class Stage(enum.StrEnum):
    PREFLIGHT = "preflight"
    CONVERT = "convert"
    CALIBRATE = "calibrate"
    IMAGE = "image"
    REGISTER = "register"


STAGE_ORDER: tuple[Stage, ...] = tuple(Stage)
TERMINAL: frozenset[State] = frozenset({State.COMPLETED, State.FAILED, State.QUARANTINED})

ALLOWED: Mapping[State, frozenset[State]] = {
    State.COLLECTING: frozenset({State.PENDING, State.QUARANTINED}),
    State.PENDING: frozenset({State.RUNNING, State.QUARANTINED, State.FAILED}),
    State.RUNNING: frozenset(
        {
            State.PENDING,  # stage committed (next stage), or lease reaped to the checkpoint
            State.RETRY_WAIT,
            State.WAITING_CALIBRATION,
            State.COMPLETED,
            State.FAILED,
            State.QUARANTINED,
        }
    ),
    State.RETRY_WAIT: frozenset({State.PENDING, State.RUNNING, State.QUARANTINED, State.FAILED}),
    State.WAITING_CALIBRATION: frozenset({State.PENDING, State.QUARANTINED, State.FAILED}),
    # Operators may send any ended group back for another go (retry / requeue).
    State.COMPLETED: frozenset({State.PENDING}),
    State.FAILED: frozenset({State.PENDING, State.QUARANTINED}),
    State.QUARANTINED: frozenset({State.PENDING}),
}


def next_stage(stage: Stage) -> Stage | None:
    i = STAGE_ORDER.index(stage)
    return STAGE_ORDER[i + 1] if i + 1 < len(STAGE_ORDER) else None


class IllegalTransition(Exception):
    """The requested change is not an edge of the lifecycle graph."""


class StaleTransition(Exception):
    """The group was not in the expected state (or the fencing token moved on): no effect."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change: ``ingest``, ``operator:<user>``, or a worker lease owner."""

    name: str


def new_correlation_id() -> str:
    return str(uuid.uuid4())


def create_group(
    session: Session,
    *,
    group_id: str,
    obs_start: datetime,
    now: datetime,
    actor: Actor,
    **fields: Any,
) -> Group:
    """Insert a new group in ``collecting`` with its first audit row."""
    group = Group(
        group_id=group_id,
        obs_start=obs_start,
        state=State.COLLECTING.value,
        stage=None,
        correlation_id=new_correlation_id(),
        first_seen_at=now,
        updated_at=now,
        priority=0,
        attempt=0,
        crash_count=0,
        fallback_tier=0,
        fencing_token=0,
        is_calibrator=False,
        **fields,
    )
    session.add(group)
    session.add(
        Transition(
            group_id=group_id,
            from_state=None,
            to_state=State.COLLECTING.value,
            at=now,
            actor=actor.name,
            correlation_id=group.correlation_id,
            message="first subband file seen",
        )
    )
    session.flush()
    return group


def transition(
    session: Session,
    group: Group,
    to: State,
    *,
    now: datetime,
    actor: Actor,
    expect: State | Iterable[State] | None = None,
    fencing_token: int | None = None,
    message: str | None = None,
    failure: Failure | None = None,
    set_fields: Mapping[str, Any] | None = None,
) -> Group:
    """Move ``group`` to ``to`` if it is still where the caller believes it is.

    ``expect`` defaults to the group's state as loaded. ``fencing_token``, when given, must
    still match (a worker that lost its claim cannot write). ``set_fields`` are updated in
    the same statement. Raises :class:`IllegalTransition` or :class:`StaleTransition`.
    """
    expected = _as_states(expect if expect is not None else State(group.state))
    for source in expected:
        if to not in ALLOWED[source]:
            raise IllegalTransition(f"group {group.group_id}: {source} -> {to} is not allowed")
    values: dict[str, Any] = {"state": to.value, "updated_at": now}
    if failure is not None:
        values.update(error_category=str(failure.category), error_code=failure.code)
    if message is not None or failure is not None:
        values["state_reason"] = message if message is not None else failure.message  # type: ignore[union-attr]
    if to in (State.PENDING, State.COMPLETED) and failure is None:
        values.update(error_category=None, error_code=None)
    if set_fields:
        values.update(set_fields)
    stmt = (
        update(Group)
        .where(Group.group_id == group.group_id)
        .where(Group.state.in_([s.value for s in expected]))
    )
    if fencing_token is not None:
        stmt = stmt.where(Group.fencing_token == fencing_token)
    result = session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StaleTransition(
            f"group {group.group_id}: expected state {', '.join(expected)}"
            + (f" with fencing token {fencing_token}" if fencing_token is not None else "")
            + f"; not moved to {to}"
        )
    previous, previous_stage = group.state, group.stage
    session.refresh(group)
    session.add(
        Transition(
            group_id=group.group_id,
            from_state=previous if previous in expected else ",".join(expected),
            to_state=to.value,
            stage=previous_stage or group.stage,  # the stage this change concerns
            at=now,
            attempt=group.attempt,
            fencing_token=group.fencing_token,
            category=str(failure.category) if failure else None,
            code=failure.code if failure else None,
            message=message if message is not None else (failure.message if failure else None),
            hint=failure.hint if failure else None,
            actor=actor.name,
            correlation_id=group.correlation_id,
        )
    )
    session.flush()
    return group


def _as_states(value: State | Iterable[State]) -> tuple[State, ...]:
    if isinstance(value, State):
        return (value,)
    return tuple(State(v) for v in value)
