"""The group lifecycle: allowed transitions, and the one guarded way to change a group's state.

Every change is ``UPDATE groups ... WHERE state IN (:allowed_from) [AND fencing_token =
:token]`` plus an append-only audit row, in the caller's transaction. A writer whose view is
stale (another process moved the group, or its claim was lost) changes nothing and gets
:class:`StaleTransition`.
"""

from __future__ import annotations

import enum
import functools
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, Update, bindparam, insert, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from supervisor.db import dialect_of
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
    The loaded ``group`` then shows the row as it now is.
    """
    row = move_group(
        session,
        GroupView(group.group_id, group.state, group.stage),
        to,
        now=now,
        actor=actor,
        expect=expect,
        fencing_token=fencing_token,
        message=message,
        failure=failure,
        set_fields=set_fields,
        whole_row=True,
    )
    for key, value in row.items():
        set_committed_value(group, key, value)
    return group


@dataclass(frozen=True, slots=True)
class GroupView:
    """What a guarded transition needs of a group: its id, and its state and stage as the
    caller last read them (the defaults of what it expects, and the audit row's "from")."""

    group_id: str
    state: str
    stage: str | None


# What a transition's caller and its audit row need of the moved row (RETURNING these, not
# the whole row: every returned column costs its type conversion on the hot path).
MOVED_COLUMNS = ("stage", "attempt", "fallback_tier", "fencing_token", "correlation_id")


def move_group(
    session: Session | Connection,
    group: GroupView,
    to: State,
    *,
    now: datetime,
    actor: Actor,
    expect: State | Iterable[State] | None = None,
    fencing_token: int | None = None,
    message: str | None = None,
    failure: Failure | None = None,
    set_fields: Mapping[str, Any] | None = None,
    whole_row: bool = False,
) -> RowMapping:
    """:func:`transition` without a loaded ORM object: the guarded UPDATE (RETURNING the
    row as it now is) and the audit INSERT, two statements on the claim/commit hot path,
    in an ORM session or on a Core connection. Returns the updated row: its
    :data:`MOVED_COLUMNS`, or (``whole_row``) every column."""
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
    returning = bool(dialect_of(session).update_returning)
    stmt = _move_statement(
        tuple(sorted(values)), len(expected), fencing_token is not None, returning, whole_row
    )
    params = {f"v_{k}": v for k, v in values.items()}
    params.update({f"m_state{i}": state.value for i, state in enumerate(expected)})
    params["m_group_id"] = group.group_id
    if fencing_token is not None:
        params["m_token"] = fencing_token
    if returning:
        rows = session.execute(stmt, params).mappings().all()
    else:  # an engine without UPDATE ... RETURNING: read the row back
        moved = session.execute(stmt, params).rowcount  # type: ignore[attr-defined]
        table = Group.__table__
        wanted = table.columns if whole_row else [table.c[n] for n in MOVED_COLUMNS]
        rows = (
            session.execute(select(*wanted).where(table.c.group_id == group.group_id))
            .mappings()
            .all()
            if moved == 1
            else []
        )
    if len(rows) != 1:
        raise StaleTransition(
            f"group {group.group_id}: expected state {', '.join(expected)}"
            + (f" with fencing token {fencing_token}" if fencing_token is not None else "")
            + f"; not moved to {to}"
        )
    row = rows[0]
    session.execute(
        _INSERT_TRANSITION,
        dict(
            group_id=group.group_id,
            from_state=group.state if group.state in expected else ",".join(expected),
            to_state=to.value,
            stage=group.stage or row["stage"],  # the stage this change concerns
            at=now,
            attempt=row["attempt"],
            fencing_token=row["fencing_token"],
            category=str(failure.category) if failure else None,
            code=failure.code if failure else None,
            message=message if message is not None else (failure.message if failure else None),
            hint=failure.hint if failure else None,
            actor=actor.name,
            correlation_id=row["correlation_id"],
        ),
    )
    return row


# Built once (see db.prepared_update): a transition runs twice per stage.
_INSERT_TRANSITION = insert(Transition.__table__)


@functools.lru_cache(maxsize=128)
def _move_statement(
    columns: tuple[str, ...], n_states: int, fenced: bool, returning: bool, whole_row: bool
) -> Update:
    """The guarded UPDATE, built once per shape. The expected states are ``n_states``
    plain parameters ``m_state<i>`` (an expanding IN list would be re-rendered into new
    SQL at every execution)."""
    table = Group.__table__
    states = [bindparam(f"m_state{i}") for i in range(n_states)]
    stmt = update(table).where(
        table.c.group_id == bindparam("m_group_id"),
        table.c.state == states[0] if n_states == 1 else table.c.state.in_(states),
    )
    if fenced:
        stmt = stmt.where(table.c.fencing_token == bindparam("m_token"))
    stmt = stmt.values({name: bindparam(f"v_{name}") for name in columns})
    if not returning:
        return stmt
    if whole_row:
        return stmt.returning(*table.columns)
    return stmt.returning(*(table.c[name] for name in MOVED_COLUMNS))


def _as_states(value: State | Iterable[State]) -> tuple[State, ...]:
    if isinstance(value, State):
        return (value,)
    return tuple(State(v) for v in value)
