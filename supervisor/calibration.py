"""The calibration registry: which tables a group's calibrate stage uses (or whether it solves
its own), registering solved tables with a validity window, and releasing groups that were
waiting for them.

Fallback chain for a target group: the newest valid set whose window covers the observation
("valid_window") → the newest set solved within ``fallback_hours`` ("last_known_good") →
wait for a calibrator (``waiting_calibration``) → after ``max_wait_hours``, quarantine.
Every product records which tier chose its tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from supervisor.calibrators import (
    Calibrator,
    angular_separation_deg,
    load_catalogue,
    lst_deg,
)
from supervisor.config import Config
from supervisor.errors import Category, Failure
from supervisor.models import CalibrationSet, CalibrationTable, Group
from supervisor.simulate import INTEGRATION_S
from supervisor.states import Actor, State, transition

log = structlog.get_logger(__name__)

APPLY_INTERP = {"B": "nearest", "G": "linear"}  # G0 is only a solve intermediate
PB_FWHM_FACTOR = 1.03


@dataclass(frozen=True)
class CalibrationPlan:
    """What the calibrate worker is asked to do (sent in its request)."""

    mode: str  # solve / apply
    tier: str  # self / valid_window / last_known_good
    calibrator: str | None
    set_id: int | None = None
    tables: tuple[dict[str, str], ...] = ()
    model: tuple[dict[str, Any], ...] = ()

    def as_request(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tier": self.tier,
            "calibrator": self.calibrator,
            "set_id": self.set_id,
            "tables": list(self.tables),
            "model": list(self.model),
        }


def group_mid_time(group: Group, n_times: int = 24) -> datetime:
    return group.obs_start + timedelta(seconds=0.5 * n_times * INTEGRATION_S)


def catalogue_source(cfg: Config, name: str | None) -> Calibrator | None:
    if not name:
        return None
    for cal in load_catalogue(cfg.calibrator_catalogue_path):
        if cal.name == name:
            return cal
    return None


def primary_beam_gain(offset_deg: float, freq_hz: float, dish_m: float) -> float:
    """Gaussian approximation of the Airy main lobe, FWHM = 1.03 lambda / D."""
    fwhm_deg = math.degrees(PB_FWHM_FACTOR * 299_792_458.0 / freq_hz / dish_m)
    return math.exp(-4.0 * math.log(2.0) * (offset_deg / fwhm_deg) ** 2)


def plan_for(s: Session, group: Group, cfg: Config) -> CalibrationPlan | None:
    """The calibration plan for ``group``, or None when it must wait for a calibrator."""
    if group.is_calibrator and group.calibrator_name:
        cal = catalogue_source(cfg, group.calibrator_name)
        if cal is not None:
            mid = group_mid_time(group)
            centre_ra = lst_deg(mid, cfg.telescope.longitude_deg)
            dec = group.pointing_dec_deg if group.pointing_dec_deg is not None else cal.dec_deg
            offset = angular_separation_deg(cal.ra_deg, cal.dec_deg, centre_ra, dec)
            gain = primary_beam_gain(offset, 1.4e9, cfg.telescope.dish_diameter_m)
            model = (
                {
                    "name": cal.name,
                    "ra_deg": cal.ra_deg,
                    "dec_deg": cal.dec_deg,
                    "flux_jy_1p4ghz": cal.flux_jy_1p4ghz,
                    "apparent_flux_jy_1p4ghz": cal.flux_jy_1p4ghz * gain,
                    "spectral_index": cal.spectral_index,
                    "offset_deg": offset,
                },
            )
            return CalibrationPlan("solve", "self", cal.name, model=model)
    when = group_mid_time(group)
    valid = s.scalars(
        select(CalibrationSet)
        .where(
            CalibrationSet.status == "valid",
            CalibrationSet.valid_from <= when,
            CalibrationSet.valid_until >= when,
        )
        .order_by(CalibrationSet.solved_at.desc())
    ).first()
    tier = "valid_window"
    if valid is None:
        reach = timedelta(hours=cfg.calibration.fallback_hours)
        valid = s.scalars(
            select(CalibrationSet)
            .where(
                CalibrationSet.status == "valid",
                CalibrationSet.solved_at >= when - reach,
                CalibrationSet.solved_at <= when + reach,
            )
            .order_by(CalibrationSet.solved_at.desc())
        ).first()
        tier = "last_known_good"
    if valid is None:
        return None
    tables = tuple(
        {"kind": t.kind, "path": t.path, "interp": t.interp}
        for t in sorted(valid.tables, key=lambda t: t.kind)  # B before G: bandpass first
        if t.kind in APPLY_INTERP
    )
    return CalibrationPlan("apply", tier, valid.calibrator, set_id=valid.id, tables=tables)


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
    """Groups waiting for calibration that ``cal_set`` can serve go back to pending."""
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
            failure = Failure(
                Category.VALIDATION,
                "no_calibration",
                f"no calibration tables within {cfg.calibration.fallback_hours:.0f} h of "
                f"{group.group_id} after waiting {cfg.calibration.max_wait_hours:.1f} h",
                "process a calibrator group near this time, then `retry` the group",
            )
            transition(s, group, State.QUARANTINED, now=now, actor=actor, failure=failure)
            expired.append(group.group_id)
    return expired
