"""The calibration registry: self-solve, valid window, last-known-good, waiting, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from supervisor import calibration
from supervisor.config import Config
from supervisor.db import Database
from supervisor.models import Group
from supervisor.states import Actor, State, transition
from tests.conftest import add_pending_group

ACTOR = Actor("test")
CAL = "2025-10-05T12:30:00"


def _group(db: Database, gid: str) -> Group:
    with db.transaction() as s:
        return s.get(Group, gid)  # type: ignore[return-value]


def _register(db: Database, cfg: Config, gid: str = CAL) -> int:
    with db.transaction() as s:
        group = s.get(Group, gid)
        cal_set = calibration.register_solution(
            s,
            group,
            {"caltable_G0": Path("/p/G0"), "caltable_B": Path("/p/B"), "caltable_G": Path("/p/G")},
            {"mode": "solve"},
            cfg,
            datetime.now(UTC),
        )
        return cal_set.id


def test_calibrator_group_solves_with_a_catalogue_model(cfg: Config, sqlite_db: Database) -> None:
    from supervisor.calibrators import load_catalogue
    from supervisor.simulate import INTEGRATION_S, first_transit_after

    cal = next(c for c in load_catalogue() if c.name == "3C48")
    transit = first_transit_after(
        cal, datetime(2025, 10, 5, tzinfo=UTC), cfg.telescope.longitude_deg
    )
    start = (transit - timedelta(seconds=12 * INTEGRATION_S)).strftime("%Y-%m-%dT%H:%M:%S")
    add_pending_group(sqlite_db, start)
    with sqlite_db.transaction() as s:
        group = s.get(Group, start)
        group.pointing_dec_deg = cal.dec_deg
        plan = calibration.plan_for(s, group, cfg)
    assert (plan.mode, plan.tier, plan.calibrator) == ("solve", "self", "3C48")
    (model,) = plan.model
    assert model["flux_jy_1p4ghz"] == 15.67
    assert model["offset_deg"] < 0.01  # at the phase centre: full primary-beam gain
    assert 0.999 < model["apparent_flux_jy_1p4ghz"] / 15.67 <= 1.0


def test_target_tiers_valid_window_then_last_known_good_then_wait(
    cfg: Config, sqlite_db: Database
) -> None:
    add_pending_group(sqlite_db, CAL)
    near, far, none = "2025-10-05T20:00:00", "2025-10-06T20:00:00", "2025-10-12T12:00:00"
    for gid in (near, far, none):
        add_pending_group(sqlite_db, gid, calibrator=None)
    with sqlite_db.transaction() as s:
        nothing = calibration.plan_for(s, s.get(Group, near), cfg)
    assert isinstance(nothing, calibration.Unavailable)
    assert "no valid calibration set within 48 h" in nothing.reason
    set_id = _register(sqlite_db, cfg)
    with sqlite_db.transaction() as s:
        plan_near = calibration.plan_for(s, s.get(Group, near), cfg)
        plan_far = calibration.plan_for(s, s.get(Group, far), cfg)
        plan_none = calibration.plan_for(s, s.get(Group, none), cfg)
    assert (plan_near.mode, plan_near.tier, plan_near.set_id) == ("apply", "valid_window", set_id)
    assert [t["kind"] for t in plan_near.tables] == ["B", "G"]  # G0 is never applied
    assert [t["interp"] for t in plan_near.tables] == ["nearest", "linear"]
    assert plan_far.tier == "last_known_good"
    assert isinstance(plan_none, calibration.Unavailable)


def test_registration_releases_waiting_groups_in_its_window(
    cfg: Config, sqlite_db: Database
) -> None:
    add_pending_group(sqlite_db, CAL)
    waiting, outside = "2025-10-05T13:00:00", "2025-10-09T13:00:00"
    now = datetime.now(UTC)
    for gid in (waiting, outside):
        add_pending_group(sqlite_db, gid, calibrator=None)
        with sqlite_db.transaction() as s:
            g = s.get(Group, gid)
            transition(s, g, State.RUNNING, now=now, actor=ACTOR)
            transition(s, g, State.WAITING_CALIBRATION, now=now, actor=ACTOR)
    with sqlite_db.transaction() as s:
        cal_set = calibration.register_solution(s, s.get(Group, CAL), {}, {}, cfg, now)
        released = calibration.release_waiting(s, cal_set, now, ACTOR)
    assert released == [waiting]
    assert _group(sqlite_db, waiting).state == State.PENDING
    assert _group(sqlite_db, outside).state == State.WAITING_CALIBRATION
    later = now + timedelta(hours=cfg.calibration.max_wait_hours + 1)
    with sqlite_db.transaction() as s:
        assert calibration.expire_waiting(s, cfg, later, ACTOR) == [outside]
    g = _group(sqlite_db, outside)
    assert (g.state, g.error_code) == ("quarantined", "no_calibration")
