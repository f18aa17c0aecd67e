"""The lifecycle graph and the guarded, audited transition."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from supervisor.db import Database
from supervisor.errors import Category, Failure
from supervisor.models import Group, Transition
from supervisor.states import (
    ALLOWED,
    TERMINAL,
    Actor,
    IllegalTransition,
    Stage,
    StaleTransition,
    State,
    create_group,
    next_stage,
    transition,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ACTOR = Actor("test")


def new_group(db: Database, group_id: str = "2025-10-05T12:30:00") -> None:
    with db.transaction() as s:
        create_group(s, group_id=group_id, obs_start=NOW, now=NOW, actor=ACTOR)


def load(db: Database, group_id: str = "2025-10-05T12:30:00") -> Group:
    with db.transaction() as s:
        group = s.get(Group, group_id)
        assert group is not None
        return group


def audit(db: Database, group_id: str = "2025-10-05T12:30:00") -> list[Transition]:
    with db.transaction() as s:
        return list(
            s.scalars(
                select(Transition).where(Transition.group_id == group_id).order_by(Transition.id)
            )
        )


def test_graph_is_closed_and_every_state_can_leave_or_is_operator_recoverable() -> None:
    assert set(ALLOWED) == set(State)
    for source, targets in ALLOWED.items():
        assert source not in targets, f"{source} -> itself"
    for terminal in TERMINAL:
        assert ALLOWED[terminal] <= {State.PENDING, State.QUARANTINED}
    assert next_stage(Stage.PREFLIGHT) == Stage.CONVERT
    assert next_stage(Stage.REGISTER) is None


def test_transition_updates_state_and_writes_an_audit_row(db: Database) -> None:
    new_group(db)
    failure = Failure(Category.VALIDATION, "incomplete_group", "missing sb03", "requeue later")
    with db.transaction() as s:
        group = s.get(Group, "2025-10-05T12:30:00")
        transition(s, group, State.QUARANTINED, now=NOW, actor=ACTOR, failure=failure)
    group = load(db)
    assert (group.state, group.error_category, group.error_code) == (
        "quarantined",
        "validation",
        "incomplete_group",
    )
    rows = audit(db)
    assert [(r.from_state, r.to_state) for r in rows] == [
        (None, "collecting"),
        ("collecting", "quarantined"),
    ]
    last = rows[-1]
    assert (last.category, last.code, last.message, last.hint, last.actor) == (
        "validation",
        "incomplete_group",
        "missing sb03",
        "requeue later",
        "test",
    )
    assert last.correlation_id == group.correlation_id


def test_illegal_edge_is_refused(db: Database) -> None:
    new_group(db)
    with pytest.raises(IllegalTransition), db.transaction() as s:
        transition(s, s.get(Group, "2025-10-05T12:30:00"), State.COMPLETED, now=NOW, actor=ACTOR)
    assert load(db).state == State.COLLECTING
    assert len(audit(db)) == 1


def test_stale_writer_has_no_effect(db: Database) -> None:
    new_group(db)
    stale = load(db)  # loaded while collecting
    with db.transaction() as s:
        transition(
            s,
            s.get(Group, stale.group_id),
            State.PENDING,
            now=NOW,
            actor=ACTOR,
            set_fields={"stage": Stage.PREFLIGHT.value},
        )
    with pytest.raises(StaleTransition), db.transaction() as s:
        transition(s, stale, State.QUARANTINED, now=NOW, actor=ACTOR, expect=State.COLLECTING)
    assert load(db).state == State.PENDING
    assert [r.to_state for r in audit(db)] == ["collecting", "pending"]


def test_fencing_token_guards_writers_that_lost_their_claim(db: Database) -> None:
    new_group(db)
    with db.transaction() as s:
        g = s.get(Group, "2025-10-05T12:30:00")
        transition(s, g, State.PENDING, now=NOW, actor=ACTOR, set_fields={"stage": "preflight"})
        transition(s, g, State.RUNNING, now=NOW, actor=ACTOR, set_fields={"fencing_token": 7})
    with pytest.raises(StaleTransition, match="fencing token 6"), db.transaction() as s:
        transition(
            s,
            s.get(Group, "2025-10-05T12:30:00"),
            State.PENDING,
            now=NOW,
            actor=ACTOR,
            fencing_token=6,
        )
    with db.transaction() as s:
        transition(
            s,
            s.get(Group, "2025-10-05T12:30:00"),
            State.PENDING,
            now=NOW,
            actor=ACTOR,
            fencing_token=7,
        )
    assert load(db).state == State.PENDING


def test_audit_row_and_state_change_roll_back_together(db: Database) -> None:
    new_group(db)
    with pytest.raises(RuntimeError), db.transaction() as s:
        transition(s, s.get(Group, "2025-10-05T12:30:00"), State.PENDING, now=NOW, actor=ACTOR)
        raise RuntimeError("crash before commit")
    assert load(db).state == State.COLLECTING
    assert len(audit(db)) == 1


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from(list(State)), min_size=1, max_size=25))
def test_random_walks_never_leave_the_graph_and_audit_matches_state(
    sqlite_db: Database, targets: list[State]
) -> None:
    with sqlite_db.transaction() as s:
        s.query(Transition).delete()
        s.query(Group).delete()
    new_group(sqlite_db)
    expected = [State.COLLECTING]
    for target in targets:
        current = expected[-1]
        try:
            with sqlite_db.transaction() as s:
                transition(s, s.get(Group, "2025-10-05T12:30:00"), target, now=NOW, actor=ACTOR)
        except IllegalTransition:
            assert target not in ALLOWED[current]
            continue
        assert target in ALLOWED[current]
        expected.append(target)
    assert load(sqlite_db).state == expected[-1]
    assert [r.to_state for r in audit(sqlite_db)] == [s.value for s in expected]
