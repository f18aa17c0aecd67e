"""What a stage worker is given: the attempt's directories and its request JSON (the worker
protocol's input), built from the group's rows, its committed artifacts and upstream metrics.

Directories: ``logs/<group>/<stage>/t<token>/`` keeps the request, result, CASA log and
worker stdout/stderr of every attempt; ``staging/<group>/<stage>-t<token>/`` receives the
outputs, and is renamed to ``products/<group>/<stage>/`` on success or deleted on failure.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, select

from supervisor import calibration, registry
from supervisor.calibration import CalibrationPlan
from supervisor.config import Config, StageTier
from supervisor.leases import Claim
from supervisor.models import Artifact, Group, SubbandFile


@dataclass(frozen=True)
class AttemptPaths:
    """The directories of one attempt."""

    workdir: Path  # request, result, logs: kept
    output_dir: Path  # staging: published or removed
    final_dir: Path  # where a successful output_dir goes
    # The attempt's own area in tmpfs staging (None: not configured), removed with the
    # staging area whatever the worker did: RAM that leaks fills the node.
    tmpfs_area: Path | None = None

    @property
    def request(self) -> Path:
        return self.workdir / "request.json"

    @property
    def result(self) -> Path:
        return self.workdir / "result.json"

    @property
    def casa_log(self) -> Path:
        return self.workdir / "casa.log"


# Built once, on the tables (Core statements, no ORM compilation): they run for every stage.
_groups = Group.__table__
_files, _artifacts = SubbandFile.__table__, Artifact.__table__
# What a request needs of the group (and what calibration's helpers read of it).
_GROUP = select(
    _groups.c.obs_start,
    _groups.c.obs_duration_s,
    _groups.c.pointing_dec_deg,
    _groups.c.calibrator_name,
    _groups.c.is_calibrator,
).where(_groups.c.group_id == bindparam("group_id"))
_READY_FILES = (
    select(_files.c.subband, _files.c.path)
    .where(_files.c.group_id == bindparam("group_id"), _files.c.status == "ready")
    .order_by(_files.c.subband)
)
_ARTIFACTS = (
    select(_artifacts.c.kind, _artifacts.c.path)
    .where(_artifacts.c.group_id == bindparam("group_id"))
    .order_by(_artifacts.c.id)
)


def attempt_paths(cfg: Config, claim: Claim) -> AttemptPaths:
    area = f"{claim.stage}-t{claim.fencing_token}"
    return AttemptPaths(
        workdir=cfg.path("logs") / claim.group_id / claim.stage / f"t{claim.fencing_token}",
        output_dir=cfg.path("staging") / claim.group_id / area,
        final_dir=cfg.path("products") / claim.group_id / claim.stage,
        tmpfs_area=tmpfs_area(cfg, claim.group_id, area),
    )


def tmpfs_area(cfg: Config, group_id: str, area: str) -> Path | None:
    """``<tmpfs_staging>/<group>-<stage>-t<token>``: one attempt's area in tmpfs."""
    if not cfg.paths.tmpfs_staging:
        return None
    return cfg.path("tmpfs_staging") / f"{group_id}-{area}"


def tmpfs_owner(name: str) -> tuple[str, str] | None:
    """(group, staging area name) of a tmpfs area's name (None: not one of ours)."""
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})-(\w+-t\d+)", name)
    return (match.group(1), match.group(2)) if match else None


def build_request(
    s: Connection,
    cfg: Config,
    claim: Claim,
    tier: StageTier,
    paths: AttemptPaths,
    plan: CalibrationPlan | None,
    *,
    threads: int,
) -> dict[str, Any]:
    """The request JSON of one attempt (``plan``: the calibrate stage's chosen plan;
    ``threads``: the CPU threads its worker was granted)."""
    key = {"group_id": claim.group_id}
    group = s.execute(_GROUP, key).one()
    files = {subband: path for subband, path in s.execute(_READY_FILES, key)}
    artifacts = {kind: path for kind, path in s.execute(_ARTIFACTS, key)}
    upstream = registry.committed_metrics(s, claim.group_id)
    extras: dict[str, Any] = {}
    if plan is not None:
        extras["calibration_plan"] = plan.as_request()
    if claim.stage == "image":
        extras["reference_sources"] = calibration.reference_sources(cfg, group)
    cal = calibration.catalogue_source(cfg, group.calibrator_name)
    if cal is not None and group.is_calibrator:
        extras["calibrator_source"] = dataclasses.asdict(cal)
    tmpfs = cfg.path("tmpfs_staging") if cfg.paths.tmpfs_staging else None
    return {
        **extras,
        "upstream_metrics": upstream,
        "tmpfs_staging": str(tmpfs) if tmpfs else None,
        "tmpfs_area": str(paths.tmpfs_area) if paths.tmpfs_area else None,
        "group_id": claim.group_id,
        "stage": claim.stage,
        "attempt": claim.attempt,
        "fencing_token": claim.fencing_token,
        "correlation_id": claim.correlation_id,
        "tier": {"index": claim.tier, "name": tier.name, "params": dict(tier.params)},
        "obs_start": group.obs_start.isoformat(),
        "obs_duration_s": group.obs_duration_s,
        "pointing_dec_deg": group.pointing_dec_deg,
        "calibrator": group.calibrator_name,
        "subband_files": {f"{sb:02d}": path for sb, path in files.items()},
        "artifacts": artifacts,
        "output_dir": str(paths.output_dir),
        "final_dir": str(paths.final_dir),
        "result_path": str(paths.result),
        "casa_log": str(paths.casa_log),
        "telescope": dataclasses.asdict(cfg.telescope),
        "calibration": dataclasses.asdict(cfg.calibration),
        "gates": dataclasses.asdict(cfg.gates),
        "threads": threads,
    }
