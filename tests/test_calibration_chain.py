"""The calibration fallback chain through the real daemon and runner (fake stage code): a
calibrator group whose own solve fails its gate is calibrated from the registry; a chain
with nothing left waits, then is quarantined with the list of what was tried."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from supervisor import calibration
from supervisor.config import Config
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import CalibrationSet, Group, Product, StageAttempt, Transition
from supervisor.states import Actor, State, transition
from tests.conftest import add_pending_group, fake_pipeline_config

EARLIER_CAL = "2025-10-05T12:25:00"  # solved 5 minutes before
OFF_TRANSIT = "2025-10-05T12:30:00"  # the calibrator still in the beam, off transit


def chain(*, solve_gate: str) -> dict:
    """The default chain's sources, run by the fake stage."""
    return {
        "when_exhausted": "wait_calibration",
        "tiers": [
            {"name": "primary", "params": {"source": "self", "solve_gate": solve_gate}},
            {"name": "relaxed", "params": {"source": "self", "solve_gate": solve_gate}},
            {"name": "valid_window", "params": {"source": "valid_window"}},
            {"name": "last_known_good", "params": {"source": "last_known_good"}},
            {"name": "field_calibrator", "params": {"source": "field_calibrator"}},
        ],
    }


def load_catalogue_dec(name: str) -> float:
    from supervisor.calibrators import load_catalogue

    return next(c.dec_deg for c in load_catalogue() if c.name == name)


def run_until_idle(cfg: Config, db: Database) -> None:
    Daemon(cfg, db, rng=random.Random(0), ingest=False).run(until_idle=True)


def calibrate_attempts(db: Database, gid: str) -> list[tuple[int, str, str | None]]:
    with db.transaction() as s:
        return [
            (a.fallback_tier, a.outcome, a.error_code)
            for a in s.scalars(
                select(StageAttempt)
                .where(StageAttempt.group_id == gid, StageAttempt.stage == "calibrate")
                .order_by(StageAttempt.id)
            )
        ]


def register_earlier_set(db: Database, cfg: Config, group_id: str = EARLIER_CAL) -> int:
    """Tables solved on an earlier calibrator group (that group then leaves the queue)."""
    add_pending_group(db, group_id)
    now = datetime.now(UTC)
    with db.transaction() as s:
        earlier = s.get(Group, group_id)
        cal_set = calibration.register_solution(
            s, earlier, {"caltable_B": Path("/p/B"), "caltable_G": Path("/p/G")}, {}, cfg, now
        )
        transition(s, earlier, State.QUARANTINED, now=now, actor=Actor("test"))
        return cal_set.id


def test_off_transit_solve_that_fails_its_gate_completes_on_valid_window(
    workspace: Path, sqlite_db: Database
) -> None:
    cfg = fake_pipeline_config(workspace, calibrate=chain(solve_gate="fail"))
    set_id = register_earlier_set(sqlite_db, cfg)
    add_pending_group(sqlite_db, OFF_TRANSIT)  # a calibrator group (3C48)
    run_until_idle(cfg, sqlite_db)

    with sqlite_db.transaction() as s:
        group = s.get(Group, OFF_TRANSIT)
        assert group.state == State.COMPLETED
        products = s.scalars(select(Product).where(Product.group_id == OFF_TRANSIT)).all()
        reasons = [
            t.message
            for t in s.scalars(
                select(Transition)
                .where(Transition.group_id == OFF_TRANSIT, Transition.code.is_not(None))
                .order_by(Transition.id)
            )
        ]
        own_sets = s.scalars(
            select(CalibrationSet).where(CalibrationSet.group_id == OFF_TRANSIT)
        ).all()
    # Both solve tiers failed the calibrate gate; the registry's tables then served.
    assert calibrate_attempts(sqlite_db, OFF_TRANSIT) == [
        (0, "failed", "calibrate_gate_failed"),
        (1, "failed", "calibrate_gate_failed"),
        (2, "succeeded", None),
    ]
    assert len(reasons) == 2 and all("bandpass_flag_fraction" in r for r in reasons)
    assert {(p.calibration_tier, p.calibration_set_id) for p in products} == {
        ("valid_window", set_id)
    }
    assert own_sets == []  # a failed solve registers nothing


def test_target_skips_the_solve_tiers_with_recorded_reasons(
    workspace: Path, sqlite_db: Database
) -> None:
    cfg = fake_pipeline_config(workspace, calibrate=chain(solve_gate="pass"))
    register_earlier_set(sqlite_db, cfg)
    target = "2025-10-05T12:40:00"
    add_pending_group(sqlite_db, target, calibrator=None)
    run_until_idle(cfg, sqlite_db)
    assert calibrate_attempts(sqlite_db, target) == [(2, "succeeded", None)]
    with sqlite_db.transaction() as s:
        (attempt,) = s.scalars(
            select(StageAttempt).where(
                StageAttempt.group_id == target, StageAttempt.stage == "calibrate"
            )
        ).all()
        request = Path(attempt.workdir, "request.json").read_text()
    assert "not a calibrator group" in request  # the skipped tiers travel with the plan


def test_exhausted_chain_waits_then_is_quarantined_naming_what_was_tried(
    workspace: Path, sqlite_db: Database
) -> None:
    cfg = fake_pipeline_config(workspace, calibrate=chain(solve_gate="fail"))
    add_pending_group(sqlite_db, OFF_TRANSIT)
    run_until_idle(cfg, sqlite_db)
    with sqlite_db.transaction() as s:
        group = s.get(Group, OFF_TRANSIT)
        assert (group.state, group.stage) == (State.WAITING_CALIBRATION, "calibrate")
        assert group.fallback_tier == 2  # a new set is tried from the registry tiers
        later = datetime.now(UTC) + timedelta(hours=cfg.calibration.max_wait_hours + 1)
        assert calibration.expire_waiting(s, cfg, later, Actor("test")) == [OFF_TRANSIT]
    with sqlite_db.transaction() as s:
        group = s.get(Group, OFF_TRANSIT)
        assert (group.state, group.error_code) == (State.QUARANTINED, "no_calibration")
        assert "primary: failed (calibrate_gate_failed" in group.state_reason
        assert "relaxed: failed (calibrate_gate_failed" in group.state_reason


def test_a_new_set_releases_a_waiting_calibrator_group_to_the_registry_tiers(
    workspace: Path, sqlite_db: Database
) -> None:
    cfg = fake_pipeline_config(workspace, calibrate=chain(solve_gate="fail"))
    add_pending_group(sqlite_db, OFF_TRANSIT)
    run_until_idle(cfg, sqlite_db)
    assert [a[0] for a in calibrate_attempts(sqlite_db, OFF_TRANSIT)] == [0, 1]
    set_id = register_earlier_set(sqlite_db, cfg)
    with sqlite_db.transaction() as s:
        cal_set = s.get(CalibrationSet, set_id)
        assert calibration.release_waiting(s, cal_set, datetime.now(UTC), Actor("t")) == [
            OFF_TRANSIT
        ]
    run_until_idle(cfg, sqlite_db)
    # Its own solve is not tried again: the released group starts at valid_window.
    assert [a[0] for a in calibrate_attempts(sqlite_db, OFF_TRANSIT)] == [0, 1, 2]
    with sqlite_db.transaction() as s:
        assert s.get(Group, OFF_TRANSIT).state == State.COMPLETED


def test_a_target_waits_for_its_calibrator_in_flight_then_falls_back_if_it_fails(
    workspace: Path, sqlite_db: Database
) -> None:
    """Tables from yesterday would do as last-known-good, but the calibrator group that
    covers this time has not solved yet: the target waits for it. When that group is
    quarantined without tables, the target is released to last-known-good."""
    cfg = fake_pipeline_config(workspace, calibrate=chain(solve_gate="pass"))
    yesterday = "2025-10-04T12:30:00"
    add_pending_group(sqlite_db, yesterday)
    now = datetime.now(UTC)
    with sqlite_db.transaction() as s:
        g = s.get(Group, yesterday)
        calibration.register_solution(s, g, {}, {}, cfg, now)
        transition(s, g, State.QUARANTINED, now=now, actor=Actor("test"))
    solver, target = "2025-10-05T12:30:00", "2025-10-05T12:40:18"
    add_pending_group(sqlite_db, solver)  # a calibrator group, not yet run
    add_pending_group(sqlite_db, target, calibrator=None)
    with sqlite_db.transaction() as s:
        tiers = cfg.stages["calibrate"].tiers
        index, plan = calibration.first_applicable(s, s.get(Group, target), cfg, tiers, 0)
        assert (index, plan) == (None, None)
        reasons = calibration.skipped_reasons(s, s.get(Group, target), cfg, tiers, 0)
    assert any(f"calibrator group {solver}" in r["reason"] for r in reasons)
    with sqlite_db.transaction() as s:
        g = s.get(Group, target)
        transition(s, g, State.RUNNING, now=now, actor=Actor("t"))
        transition(s, g, State.WAITING_CALIBRATION, now=now, actor=Actor("t"))
        assert calibration.recheck_waiting(s, cfg, now, Actor("t")) == []  # still coming
        transition(s, s.get(Group, solver), State.QUARANTINED, now=now, actor=Actor("t"))
        assert calibration.recheck_waiting(s, cfg, now, Actor("t")) == [target]
        index, plan = calibration.first_applicable(s, s.get(Group, target), cfg, tiers, 2)
    assert plan is not None and plan.tier == "last_known_good"


def test_a_set_whose_tables_cannot_be_read_is_invalidated_and_the_next_set_serves(
    workspace: Path, sqlite_db: Database
) -> None:
    """The worker reports caltable_corrupt (stages.calibrate.check_registered_table, tested
    on a real damaged table in test_damaged_subbands): the set is marked invalid, naming
    the table, the target goes on to last_known_good with an older set, and nothing blames
    the target's own data."""
    tiers = chain(solve_gate="pass")
    tiers["tiers"][2]["params"].update(
        behaviour="classified",
        category="recoverable",
        code="caltable_corrupt",
        message="registered table /p/B cannot be read: FilebufIO::readBlock",
    )
    cfg = fake_pipeline_config(workspace, calibrate=tiers)
    older = "2025-10-05T10:25:00"
    add_pending_group(sqlite_db, older)
    with sqlite_db.transaction() as s:
        g = s.get(Group, older)
        now = datetime.now(UTC)
        tables = {"caltable_B": Path("/p/B0"), "caltable_G": Path("/p/G0")}
        older_id = calibration.register_solution(s, g, tables, {}, cfg, now).id
        transition(s, g, State.QUARANTINED, now=now, actor=Actor("test"))
    damaged_id = register_earlier_set(sqlite_db, cfg)
    target = "2025-10-05T12:40:00"
    add_pending_group(sqlite_db, target, calibrator=None)
    run_until_idle(cfg, sqlite_db)

    assert calibrate_attempts(sqlite_db, target) == [
        (2, "failed", "caltable_corrupt"),
        (3, "succeeded", None),
    ]
    with sqlite_db.transaction() as s:
        damaged = s.get(CalibrationSet, damaged_id)
        assert damaged.status == "invalid"
        assert "/p/B cannot be read" in damaged.status_reason
        assert s.get(CalibrationSet, older_id).status == "valid"
        assert s.get(Group, target).state == State.COMPLETED
        products = s.scalars(select(Product).where(Product.group_id == target)).all()
    assert {(p.calibration_tier, p.calibration_set_id) for p in products} == {
        ("last_known_good", older_id)
    }


def test_a_waiting_group_is_not_offered_the_tier_that_just_failed_again(
    workspace: Path, sqlite_db: Database
) -> None:
    """A target with a calibrator in its beam solves on it (field_calibrator) and fails;
    the recheck of waiting groups must not hand it the same failing solve again (it did,
    every ~3 s: 358 identical attempts in 15 minutes of a simulated night)."""
    failing = chain(solve_gate="fail")
    failing["tiers"][4]["params"]["solve_gate"] = "fail"
    cfg = fake_pipeline_config(workspace, calibrate=failing)
    NEXT_TO_TRANSIT = "2025-10-06T08:31:51"  # the group after 3C48's transit at 08:29
    add_pending_group(sqlite_db, NEXT_TO_TRANSIT, calibrator=None)
    with sqlite_db.transaction() as s:
        s.get(Group, NEXT_TO_TRANSIT).pointing_dec_deg = load_catalogue_dec("3C48")
    run_until_idle(cfg, sqlite_db)
    tried = calibrate_attempts(sqlite_db, NEXT_TO_TRANSIT)
    assert tried == [(4, "failed", "calibrate_gate_failed")]
    with sqlite_db.transaction() as s:
        assert s.get(Group, NEXT_TO_TRANSIT).state == State.WAITING_CALIBRATION
        assert calibration.failed_tiers(s, NEXT_TO_TRANSIT) == {4}
        assert calibration.recheck_waiting(s, cfg, datetime.now(UTC), Actor("t")) == []
    # A new set still releases it, to the registry tiers.
    set_id = register_earlier_set(sqlite_db, cfg, "2025-10-06T08:26:46")
    with sqlite_db.transaction() as s:
        cal_set = s.get(CalibrationSet, set_id)
        assert calibration.release_waiting(s, cal_set, datetime.now(UTC), Actor("t")) == [
            NEXT_TO_TRANSIT
        ]
