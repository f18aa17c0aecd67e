"""The calibration registry and the calibration fallback chain: which tables a group's
calibrate stage uses (or which calibrator it solves on), registering solved tables with a
validity window, and releasing groups that were waiting for them.

The chain is the calibrate stage's tier list (``[stages.calibrate] tiers``); each tier names
a ``source``:

- ``self``: a calibrator group solves on the calibrator that transits in it (see
  :func:`supervisor.calibrators.choose_calibrator`);
- ``valid_window``: the newest registered set whose validity window covers the group;
- ``last_known_good``: the newest set solved within ``fallback_hours``;
- ``field_calibrator``: solve on another catalogue calibrator in the primary beam, placed
  where it really is (offset and beam attenuation), when one is bright enough;
- ``auto`` (no source given): ``self`` for calibrator groups, else the registry tiers.

A tier that cannot apply (a target group has no calibrator of its own; no set covers the
time) is skipped with its reason; a tier that fails (gate, error) moves to the next one.
When every tier is spent the group waits for a new set (``waiting_calibration``), and is
quarantined after ``max_wait_hours`` with the list of what was tried and why each failed.
Every product records the tier that calibrated it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from supervisor.calibrators import (
    INTEGRATION_S,
    Calibrator,
    angular_separation_deg,
    calibrators_in_beam,
    load_catalogue,
    lst_deg,
    primary_beam_gain,
)
from supervisor.config import Config, StageTier
from supervisor.errors import Category, Failure
from supervisor.models import CalibrationSet, CalibrationTable, Group, StageAttempt
from supervisor.skymodel import field_model, read_catalogue
from supervisor.states import Actor, State, transition

log = structlog.get_logger(__name__)

APPLY_INTERP = {"B": "nearest", "G": "linear"}  # G0 is only a solve intermediate
REGISTRY_SOURCES = ("valid_window", "last_known_good")
SOLVE_SOURCES = ("self", "field_calibrator")


@dataclass(frozen=True)
class CalibrationPlan:
    """What the calibrate worker is asked to do (sent in its request).

    mode: solve / apply; tier: the chain source that chose this plan (self, valid_window,
    last_known_good, field_calibrator); model: for solves, the sources to put in MODEL_DATA
    (J2000 position, catalogue flux at 1.4 GHz, spectral index, offset from the pointing
    centre at mid-group, apparent flux after the 1.4 GHz primary beam)."""

    mode: str
    tier: str
    calibrator: str | None
    set_id: int | None = None
    tables: tuple[dict[str, str], ...] = ()
    model: tuple[dict[str, Any], ...] = ()
    skipped: tuple[dict[str, str], ...] = ()  # earlier tiers that could not apply, and why
    sky_model: str | None = None  # the field catalogue the model's other sources came from

    def as_request(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tier": self.tier,
            "calibrator": self.calibrator,
            "set_id": self.set_id,
            "tables": list(self.tables),
            "model": list(self.model),
            "skipped": list(self.skipped),
            "sky_model": self.sky_model,
        }


@dataclass(frozen=True)
class Unavailable:
    """A tier of the chain that cannot apply to this group, and why."""

    tier: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"tier": self.tier, "reason": self.reason}


def tier_source(tier: StageTier) -> str:
    return str(tier.params.get("source", "auto"))


def group_mid_time(group: Group) -> datetime:
    duration = group.obs_duration_s or 24 * INTEGRATION_S
    return group.obs_start + timedelta(seconds=0.5 * duration)


def catalogue_source(cfg: Config, name: str | None) -> Calibrator | None:
    if not name:
        return None
    for cal in load_catalogue(cfg.calibrator_catalogue_path):
        if cal.name == name:
            return cal
    return None


def plan_for(
    s: Session, group: Group, cfg: Config, source: str = "auto"
) -> CalibrationPlan | Unavailable:
    """The plan tier ``source`` gives ``group``, or why it cannot apply."""
    if source == "auto":
        if group.is_calibrator and group.calibrator_name:
            return plan_for(s, group, cfg, "self")
        first = plan_for(s, group, cfg, "valid_window")
        return (
            first
            if isinstance(first, CalibrationPlan)
            else plan_for(s, group, cfg, "last_known_good")
        )
    if source == "self":
        cal = catalogue_source(cfg, group.calibrator_name) if group.is_calibrator else None
        if cal is None:
            return Unavailable("self", "not a calibrator group: no calibrator transits in it")
        return _solve_plan(group, cfg, cal, "self")
    if source in REGISTRY_SOURCES:
        found = _registered_set(s, group, cfg, source)
        if found is None:
            when = group_mid_time(group).isoformat(timespec="seconds")
            reach = (
                f"+- {cfg.calibration.validity_hours:g} h validity window"
                if source == "valid_window"
                else f"{cfg.calibration.fallback_hours:g} h"
            )
            return Unavailable(source, f"no valid calibration set within {reach} of {when}")
        tables = tuple(
            {"kind": t.kind, "path": t.path, "interp": t.interp}
            for t in sorted(found.tables, key=lambda t: t.kind)  # B before G: bandpass first
            if t.kind in APPLY_INTERP
        )
        return CalibrationPlan("apply", source, found.calibrator, set_id=found.id, tables=tables)
    if source == "field_calibrator":
        if group.pointing_dec_deg is None:
            return Unavailable(source, "pointing declination unknown")
        own = (group.calibrator_name,) if group.is_calibrator and group.calibrator_name else ()
        seen = calibrators_in_beam(
            load_catalogue(cfg.calibrator_catalogue_path),
            when=group_mid_time(group),
            pointing_dec_deg=group.pointing_dec_deg,
            longitude_deg=cfg.telescope.longitude_deg,
            dish_m=cfg.telescope.dish_diameter_m,
            min_apparent_flux_jy=cfg.calibration.min_apparent_flux_jy,
            exclude=own,
        )
        if not seen:
            return Unavailable(
                source,
                f"no other catalogue calibrator in the beam with apparent flux >= "
                f"{cfg.calibration.min_apparent_flux_jy:g} Jy",
            )
        cal = catalogue_source(cfg, seen[0].name)
        assert cal is not None
        return _solve_plan(group, cfg, cal, source)
    raise ValueError(f"unknown calibration source {source!r}")


def pending_solver(s: Session, group: Group, cfg: Config) -> Group | None:
    """A calibrator group, not yet finished, whose solve would cover ``group`` (within the
    validity window): with several attempts in flight a target can reach calibrate while
    its calibrator is still solving, and must wait for those tables rather than fall back
    to older or off-transit ones."""
    window = timedelta(hours=cfg.calibration.validity_hours)
    when = group_mid_time(group)
    # A coarse window on the indexed start time first (a group lasts minutes, not a day),
    # the exact mid-time test below: a backlog of a night is not loaded for every target.
    margin = window + timedelta(days=1)
    for other in s.scalars(
        select(Group).where(
            Group.obs_start >= when - margin,
            Group.obs_start <= when + margin,
            Group.is_calibrator.is_(True),
            Group.group_id != group.group_id,
            Group.state.in_(
                (
                    State.COLLECTING.value,
                    State.PENDING.value,
                    State.RUNNING.value,
                    State.RETRY_WAIT.value,
                )
            ),
        )
    ):
        if abs(group_mid_time(other) - when) <= window:
            return other
    return None


def _walk(
    s: Session, group: Group, cfg: Config, tiers: Sequence[StageTier], start: int
) -> Iterator[tuple[int, CalibrationPlan | Unavailable]]:
    """What each tier from ``start`` on offers ``group``: a plan, or why it cannot apply.
    The older and off-transit tiers stand aside while a calibrator group that covers this
    time is still on its way (see :func:`pending_solver`)."""
    solver = functools.cache(lambda: pending_solver(s, group, cfg))  # only if a tier asks
    for index in range(start, len(tiers)):
        source = tier_source(tiers[index])
        pending = solver() if source in ("last_known_good", "field_calibrator") else None
        if pending is not None:
            reason = f"calibrator group {pending.group_id} covers this time and has not solved yet"
            yield index, Unavailable(source, reason)
        else:
            yield index, plan_for(s, group, cfg, source)


def first_applicable(
    s: Session, group: Group, cfg: Config, tiers: Sequence[StageTier], start: int
) -> tuple[int | None, CalibrationPlan | None]:
    """Walk the chain from tier ``start``: (index, plan) of the first tier that applies, its
    plan recording the tiers skipped on the way; (None, None) when none applies."""
    skipped: list[dict[str, str]] = []
    for index, found in _walk(s, group, cfg, tiers, start):
        if isinstance(found, CalibrationPlan):
            return index, CalibrationPlan(**{**found.__dict__, "skipped": tuple(skipped)})
        skipped.append({"tier": tiers[index].name, "reason": found.reason})
    return None, None


def skipped_reasons(
    s: Session, group: Group, cfg: Config, tiers: Sequence[StageTier], start: int
) -> list[dict[str, str]]:
    """Why each tier from ``start`` on cannot apply (for the waiting message)."""
    return [
        {"tier": tiers[index].name, "reason": found.reason}
        for index, found in _walk(s, group, cfg, tiers, start)
        if isinstance(found, Unavailable)
    ]


def recheck_waiting(s: Session, cfg: Config, now: datetime, actor: Actor) -> list[str]:
    """Groups waiting for calibration go back to pending when a tier can serve them after
    all: the calibrator group they waited for ended without registering tables (failed or
    quarantined), so the older or off-transit tiers may now apply."""
    tiers = cfg.stages["calibrate"].tiers
    released = []
    for group in s.scalars(select(Group).where(Group.state == State.WAITING_CALIBRATION.value)):
        spent = failed_tiers(s, group.group_id)
        start = min(group.fallback_tier, len(tiers) - 1)
        index = next(
            (
                i
                for i, found in _walk(s, group, cfg, tiers, start)
                if isinstance(found, CalibrationPlan) and i not in spent
            ),
            None,
        )
        if index is None:
            continue
        transition(
            s,
            group,
            State.PENDING,
            now=now,
            actor=actor,
            message=f"calibration tier {tiers[index].name} can serve it now",  # type: ignore[index]
        )
        released.append(group.group_id)
    return released


def failed_tiers(s: Session, group_id: str) -> set[int]:
    """Calibration tiers that already failed for this group and would fail the same way
    again: re-offering them on every recheck would run the same failing solve every few
    seconds all night. A tier that failed on a damaged set is not spent (that set is
    invalidated; the tier offers another). A new registered set releases the group anyway
    (:func:`release_waiting`), and an operator's ``retry`` starts the chain afresh."""
    rows = s.execute(
        select(StageAttempt.fallback_tier, StageAttempt.error_code).where(
            StageAttempt.group_id == group_id,
            StageAttempt.stage == "calibrate",
            StageAttempt.outcome == "failed",
        )
    )
    return {tier for tier, code in rows if code not in DAMAGED_SET_CODES}


def resume_tier(tiers: Sequence[StageTier]) -> int:
    """Where a group that waited for calibration starts again: the first registry tier
    (its own solve already failed or never applied), else the beginning."""
    for index, tier in enumerate(tiers):
        if tier_source(tier) in REGISTRY_SOURCES:
            return index
    return 0


def attempts_summary(
    s: Session, group_id: str, tiers: Sequence[StageTier] = ()
) -> list[dict[str, Any]]:
    """What the calibrate stage tried for a group (tier name, plan source) and how each
    try ended."""
    rows = s.scalars(
        select(StageAttempt)
        .where(StageAttempt.group_id == group_id, StageAttempt.stage == "calibrate")
        .order_by(StageAttempt.id)
    )
    out = []
    for row in rows:
        if row.outcome == "running":
            continue
        source = ((row.result or {}).get("metrics") or {}).get("calibration_tier")
        index = row.fallback_tier
        out.append(
            {
                "tier": tiers[index].name if 0 <= index < len(tiers) else f"tier {index}",
                "source": source,
                "outcome": row.outcome,
                "code": row.error_code,
                "message": (row.error_message or "")[:300],
            }
        )
    return out


def _solve_plan(group: Group, cfg: Config, cal: Calibrator, tier: str) -> CalibrationPlan:
    """Solve on ``cal`` where it really is at mid-group: its offset from the meridian
    pointing centre and the 1.4 GHz beam gain there (the worker applies the beam's
    frequency dependence across the band); with a sky catalogue configured, the field's
    other sources join the model (the gains must not absorb them)."""
    mid = group_mid_time(group)
    centre_ra = lst_deg(mid, cfg.telescope.longitude_deg)
    dec = group.pointing_dec_deg if group.pointing_dec_deg is not None else cal.dec_deg
    offset = angular_separation_deg(cal.ra_deg, cal.dec_deg, centre_ra, dec)
    gain = primary_beam_gain(offset, 1.4e9, cfg.telescope.dish_diameter_m)
    model: tuple[dict[str, Any], ...] = (
        {
            "name": cal.name,
            "ra_deg": cal.ra_deg,
            "dec_deg": cal.dec_deg,
            "flux_jy_1p4ghz": cal.flux_jy_1p4ghz,
            "apparent_flux_jy_1p4ghz": cal.flux_jy_1p4ghz * gain,
            "spectral_index": cal.spectral_index,
            "offset_deg": offset,
            "pb_gain_1p4ghz": gain,
            "origin": "calibrator_catalogue",
        },
    )
    sky = cfg.sky_catalogue_path
    if sky is not None:
        c = cfg.calibration
        model += tuple(
            field_model(
                read_catalogue(sky),
                centre_ra,
                dec,
                dish_m=cfg.telescope.dish_diameter_m,
                min_beam_gain=c.sky_model_min_beam_gain,
                min_apparent_jy=c.sky_model_min_apparent_jy,
                max_sources=c.sky_model_max_sources,
                exclude=((cal.ra_deg, cal.dec_deg),),
            )
        )
    return CalibrationPlan(
        "solve", tier, cal.name, model=model, sky_model=str(sky) if sky else None
    )


def reference_sources(cfg: Config, group: Group) -> list[dict[str, Any]] | None:
    """The sky catalogue's sources an image of ``group`` should show (for the image QA),
    with their offsets from the pointing centre at mid-group; None with no catalogue."""
    sky = cfg.sky_catalogue_path
    if sky is None or group.pointing_dec_deg is None:
        return None
    centre_ra = lst_deg(group_mid_time(group), cfg.telescope.longitude_deg)
    return field_model(
        read_catalogue(sky),
        centre_ra,
        group.pointing_dec_deg,
        dish_m=cfg.telescope.dish_diameter_m,
        min_beam_gain=cfg.calibration.sky_reference_min_beam_gain,
        min_apparent_jy=0.0,
        max_sources=100_000,
    )


def _registered_set(s: Session, group: Group, cfg: Config, source: str) -> CalibrationSet | None:
    when = group_mid_time(group)
    query = select(CalibrationSet).where(CalibrationSet.status == "valid")
    if source == "valid_window":
        query = query.where(CalibrationSet.valid_from <= when, CalibrationSet.valid_until >= when)
    else:
        reach = timedelta(hours=cfg.calibration.fallback_hours)
        query = query.where(
            CalibrationSet.solved_at >= when - reach, CalibrationSet.solved_at <= when + reach
        )
    return s.scalars(query.order_by(CalibrationSet.solved_at.desc())).first()


# A calibrate attempt failing with one of these names a registered set as the culprit.
DAMAGED_SET_CODES = frozenset({"caltable_missing", "caltable_corrupt"})


def invalidate_damaged_set(s: Session, set_id: int, reason: str) -> bool:
    """Mark a set whose tables a worker could not read ``invalid`` so that no group
    chooses it again (the group that found it moves on to the next tier). True if it was
    still valid."""
    cal_set = s.get(CalibrationSet, set_id)
    if cal_set is None or cal_set.status != "valid":
        return False
    cal_set.status = "invalid"
    cal_set.status_reason = f"tables unreadable when applied: {reason}"[:2000]
    return True


def register_solution(
    s: Session,
    group: Group,
    artifacts: dict[str, Path],
    metrics: dict[str, Any],
    cfg: Config,
    now: datetime,
) -> CalibrationSet:
    """Register the tables a calibrator group solved, valid +- ``validity_hours``."""
    mid = group_mid_time(group)
    window = timedelta(hours=cfg.calibration.validity_hours)
    cal_set = CalibrationSet(
        group_id=group.group_id,
        calibrator=group.calibrator_name or "unknown",
        solved_at=mid,
        valid_from=mid - window,
        valid_until=mid + window,
        status="valid",
        metrics=metrics,
        created_at=now,
    )
    s.add(cal_set)
    s.flush()
    for kind in ("G0", "B", "G"):
        path = artifacts.get(f"caltable_{kind}")
        if path is not None:
            s.add(
                CalibrationTable(
                    set_id=cal_set.id,
                    kind=kind,
                    path=str(path),
                    interp=APPLY_INTERP.get(kind, "linear"),
                    created_at=now,
                )
            )
    s.flush()
    return cal_set


def release_waiting(s: Session, cal_set: CalibrationSet, now: datetime, actor: Actor) -> list[str]:
    """Groups waiting for calibration that ``cal_set`` can serve go back to pending (at the
    tier their wait left them on: the registry tiers)."""
    released = []
    for group in s.scalars(select(Group).where(Group.state == State.WAITING_CALIBRATION.value)):
        when = group_mid_time(group)
        if cal_set.valid_from <= when <= cal_set.valid_until:
            transition(
                s,
                group,
                State.PENDING,
                now=now,
                actor=actor,
                message=f"calibration set {cal_set.id} ({cal_set.calibrator}) registered",
            )
            released.append(group.group_id)
    return released


def expire_waiting(s: Session, cfg: Config, now: datetime, actor: Actor) -> list[str]:
    """Quarantine groups that waited longer than ``max_wait_hours`` for a calibrator."""
    limit = timedelta(hours=cfg.calibration.max_wait_hours)
    expired = []
    for group in s.scalars(select(Group).where(Group.state == State.WAITING_CALIBRATION.value)):
        if now - group.updated_at >= limit:
            tried = attempts_summary(s, group.group_id, cfg.stages["calibrate"].tiers)
            listed = "; ".join(
                f"{t['tier']}: {t['outcome']}"
                + (f" ({t['code']}: {t['message']})" if t["code"] else "")
                for t in tried
            )
            failure = Failure(
                Category.VALIDATION,
                "no_calibration",
                f"no usable calibration for {group.group_id} after waiting "
                f"{cfg.calibration.max_wait_hours:.1f} h (no set within "
                f"{cfg.calibration.fallback_hours:.0f} h served it)"
                + (f"; tried: {listed}" if listed else "; no tier could be tried"),
                "process a calibrator group near this time, then `retry` the group",
                details={"tried": tried},
            )
            transition(s, group, State.QUARANTINED, now=now, actor=actor, failure=failure)
            expired.append(group.group_id)
    return expired
