"""State integrity: do the database and the disk agree? ``check-state`` (and the periodic
state-check job, report only) lists every disagreement; ``--repair`` does what is safe.

Found: committed outputs (MS, calibration tables, images) missing or of another size than
their rows; calibration tables that vanished; product directories and staging areas (on
disk and in tmpfs) that no row owns (including a daemon that died between renaming a
staging area into place and its commit); groups running past their lease; attempts
``running`` whose owner is gone.

Repaired (``--repair``; a dry run is the default): a group whose outputs are damaged is
requeued from the earliest stage whose outputs are not intact; a calibration set whose
tables vanished is marked unusable (targets then fall back like any missing calibration);
orphaned staging areas are removed; an unowned product directory whose commit manifest is
trustworthy (rebuild.py) is adopted into the database, any other is moved to
``lost+found/<date>/`` at the workspace's top level, never deleted; expired leases are
reaped; orphaned attempt rows are closed. Never touched: raw incoming files, and any
registered product (pruned artifacts are expected to be gone and are not findings).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from supervisor import manifest
from supervisor.config import Config
from supervisor.db import Database
from supervisor.leases import Leases, Owner, database_now
from supervisor.models import Artifact, CalibrationSet, Group, StageAttempt
from supervisor.states import STAGE_ORDER, Actor, StaleTransition, State

log = structlog.get_logger(__name__)

REPAIR_ACTOR = Actor("check-state")
FINDING_KINDS = (
    "missing_output",
    "size_mismatch",
    "missing_caltable",
    "orphan_staging",
    "orphan_product_dir",
    "expired_lease",
    "orphan_attempt",
)


@dataclass
class Finding:
    """One disagreement between the database and the disk.

    kind: missing_output / size_mismatch / missing_caltable / orphan_staging /
    orphan_product_dir / expired_lease / orphan_attempt. repair: what ``--repair`` does
    (or "report only"). repaired: whether it was done in this run.
    """

    kind: str
    detail: str
    repair: str
    group_id: str | None = None
    path: str | None = None
    repaired: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_staging_areas(s: Session) -> set[tuple[str, str]]:
    """(group, area name) of every staging area a running attempt owns."""
    return {
        (a.group_id, f"{a.stage}-t{a.fencing_token}")
        for a in s.scalars(select(StageAttempt).where(StageAttempt.outcome == "running"))
    }


def orphan_tmpfs_areas(cfg: Config, live: set[tuple[str, str]]) -> list[Path]:
    """Attempt areas in tmpfs staging that no running attempt owns (a convert killed
    mid-write, or a daemon that died): RAM nobody will free. Entries not named like an
    attempt's area are not ours and are left alone."""
    from supervisor.stage_request import tmpfs_owner

    if not cfg.paths.tmpfs_staging:
        return []
    root = cfg.path("tmpfs_staging")
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        owner = tmpfs_owner(entry.name)
        if owner is not None and owner not in live:
            out.append(entry)
    return out


def artifact_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def check_state(
    cfg: Config, db: Database, *, repair: bool = False, leases: Leases | None = None
) -> list[Finding]:
    """Compare the database with the disk; with ``repair``, fix what is safe (module doc)."""
    findings: list[Finding] = []
    findings += _outputs(cfg, db, repair)
    findings += _caltables(cfg, db, repair)
    findings += _orphan_dirs(cfg, db, repair)
    findings += _leases_and_attempts(cfg, db, repair, leases)
    for f in findings:
        log.warning("state_check.finding", **f.as_dict())
    return findings


# Committed outputs ------------------------------------------------------------------------
def _outputs(cfg: Config, db: Database, repair: bool) -> list[Finding]:
    found: list[Finding] = []
    damaged: dict[str, str] = {}  # group -> earliest stage whose outputs are not intact
    with db.transaction() as s:
        rows = s.execute(
            select(Artifact, Group.state, Group.stage)
            .join(Group, Group.group_id == Artifact.group_id)
            .where(Artifact.pruned_at.is_(None))
        ).all()
    for art, state, _next in rows:
        if state == State.RUNNING.value:
            continue  # a stage may be replacing it right now
        path = Path(art.path)
        if not path.exists():
            kind, detail = "missing_output", f"{art.kind} {path} is gone"
        else:
            size = artifact_size(path)
            if art.bytes and size != art.bytes:
                kind = "size_mismatch"
                detail = f"{art.kind} {path} is {size} bytes, its row says {art.bytes}"
            else:
                continue
        earliest = damaged.get(art.group_id)
        if earliest is None or STAGE_ORDER.index(art.stage) < STAGE_ORDER.index(earliest):
            damaged[art.group_id] = art.stage
        found.append(Finding(kind, detail, "", group_id=art.group_id, path=str(path)))
    for f in found:
        f.repair = f"requeue the group from {damaged[f.group_id]}"  # type: ignore[index]
    if repair:
        for group_id, stage in damaged.items():
            ok = _requeue(
                db,
                group_id,
                stage,
                "; ".join(f.detail for f in found if f.group_id == group_id),
                cfg.path("products"),
            )
            for f in found:
                if f.group_id == group_id:
                    f.repaired = ok
    return found


def _requeue(db: Database, group_id: str, stage: str, why: str, products: Path) -> bool:
    """Send the group back to ``stage`` (its outputs from there on are rebuilt)."""
    from supervisor.operator import OperatorError, requeue_group

    try:
        requeue_group(
            db,
            group_id,
            stage,
            actor=REPAIR_ACTOR,
            reason=f"check-state: {why}",
            products=products,
        )
        return True
    except (OperatorError, StaleTransition) as exc:
        log.warning("state_check.requeue_refused", group_id=group_id, error=str(exc))
        return False


# Calibration tables -----------------------------------------------------------------------
def _caltables(cfg: Config, db: Database, repair: bool) -> list[Finding]:
    found = []
    marked: list[tuple[str, int, str]] = []
    with db.transaction() as s:
        now = database_now(s)
        for cal_set in s.scalars(select(CalibrationSet).where(CalibrationSet.status == "valid")):
            gone = [t for t in cal_set.tables if not Path(t.path).exists()]
            if not gone:
                continue
            names = ", ".join(f"{t.kind} {t.path}" for t in gone)
            f = Finding(
                "missing_caltable",
                f"calibration set {cal_set.id} ({cal_set.calibrator}) lost {names}",
                "mark the set unusable (targets fall back to other sets)",
                group_id=cal_set.group_id,
                path=gone[0].path,
            )
            if repair:
                cal_set.status = "invalid"
                cal_set.status_reason = f"check-state: tables missing: {names}"
                marked.append((cal_set.group_id, cal_set.id, cal_set.status_reason))
                f.repaired = True
            found.append(f)
    for group_id, set_id, reason in marked:
        manifest.record_calibration_status(
            cfg.path("products"), group_id, set_id, "invalid", reason, now
        )
    return found


# Directories no row owns ------------------------------------------------------------------
def _orphan_dirs(cfg: Config, db: Database, repair: bool) -> list[Finding]:
    found: list[Finding] = []
    with db.transaction() as s:
        live = live_staging_areas(s)
        # A stage directory is owned by its artifact rows, or by its committed attempt (a
        # stage may declare no artifacts).
        owned = {
            (group_id, stage)
            for group_id, stage in s.execute(select(Artifact.group_id, Artifact.stage)).all()
        } | {
            (group_id, stage)
            for group_id, stage in s.execute(
                select(StageAttempt.group_id, StageAttempt.stage).where(
                    StageAttempt.outcome == "succeeded"
                )
            ).all()
        }
        # A group running under a live lease may be publishing right now: leave it alone.
        running = set(
            s.scalars(
                select(Group.group_id).where(
                    Group.state == State.RUNNING.value,
                    Group.lease_expires_at >= database_now(s),
                )
            )
        )
    staging = cfg.path("staging")
    if staging.is_dir():
        for group_dir in sorted(p for p in staging.iterdir() if p.is_dir()):
            for area in sorted(group_dir.iterdir()):
                if (group_dir.name, area.name) in live:
                    continue
                found.append(
                    _remove(
                        Finding(
                            "orphan_staging",
                            f"staging area {area} belongs to no running attempt",
                            "remove it",
                            group_id=group_dir.name,
                            path=str(area),
                        ),
                        area,
                        repair,
                    )
                )
    for area in orphan_tmpfs_areas(cfg, live):
        found.append(
            _remove(
                Finding(
                    "orphan_staging",
                    f"tmpfs staging area {area} belongs to no running attempt",
                    "remove it (it holds RAM)",
                    group_id=area.name[:19],
                    path=str(area),
                ),
                area,
                repair,
            )
        )
    found += _unowned_products(cfg, db, owned, running, repair)
    return found


def _unowned_products(
    cfg: Config,
    db: Database,
    owned: set[tuple[str, str]],
    running: set[str],
    repair: bool,
) -> list[Finding]:
    """Product directories no artifact row owns: adopted when their manifest is a trusted
    commit the database does not know (rebuild.survey), otherwise moved to lost+found."""
    from supervisor import rebuild

    products = cfg.path("products")
    if not products.is_dir():
        return []
    unowned = [
        stage_dir
        for group_dir in sorted(p for p in products.iterdir() if p.is_dir())
        if group_dir.name not in running
        for stage_dir in sorted(p for p in group_dir.iterdir() if p.is_dir())
        if (group_dir.name, stage_dir.name) not in owned
    ]
    if not unowned:
        return []
    adoptable = {
        f.manifest.directory: f for f in rebuild.survey(cfg, db, skip_completed=True).all()
    }
    found: list[Finding] = []
    for stage_dir in unowned:
        group_dir = stage_dir.parent
        commit = adoptable.get(stage_dir)
        if commit is not None:
            found.append(
                Finding(
                    "orphan_product_dir",
                    f"product directory {stage_dir}: a committed {commit.manifest.stage} "
                    f"(token {commit.manifest.fencing_token}, {commit.kind}) the database "
                    "does not know",
                    "adopt it from its commit manifest (db rebuild does the same)",
                    group_id=group_dir.name,
                    path=str(stage_dir),
                )
            )
            continue
        why = (
            "left by a replaced stage"
            if ".replaced-" in stage_dir.name or stage_dir.name.endswith(".incoming")
            else "no artifact row owns it and no trustworthy commit manifest describes it"
        )
        finding = Finding(
            "orphan_product_dir",
            f"product directory {stage_dir}: {why}",
            f"move it to {lost_and_found(cfg)} (never deleted)",
            group_id=group_dir.name,
            path=str(stage_dir),
        )
        if repair:
            finding.repaired = bool(move_to_lost_and_found(cfg, [stage_dir]))
        found.append(finding)
    if repair:
        adopt = [
            f for f in adoptable.values() if any(x.path == str(f.manifest.directory) for x in found)
        ]
        if adopt:
            rebuild.apply(cfg, db, _with_chains(adopt, adoptable), why="check-state --repair")
            done = {str(f.manifest.directory) for f in adopt}
            for f in found:
                if f.path in done:
                    f.repaired = True
    return found


def _with_chains(chosen: list[Any], every: dict[Path, Any]) -> list[Any]:
    """A stage is only adopted with the stages before it that are also unknown (a chain)."""
    groups = {f.manifest.group_id for f in chosen}
    return [f for f in every.values() if f.manifest.group_id in groups]


def lost_and_found(cfg: Config, now: datetime | None = None) -> Path:
    """``<workspace>/lost+found/<UTC date>``: where product directories nothing accounts
    for go (outside products/, so no scan mistakes them for products)."""
    day = (now or datetime.now(UTC)).strftime("%Y-%m-%d")
    return Path(cfg.workspace) / "lost+found" / day


def move_to_lost_and_found(cfg: Config, directories: Iterable[Path]) -> list[Path]:
    """Rename each directory to lost+found/<date>/<group>/<name> (another name when taken);
    returns the new places. A rename, so a directory on another filesystem stays put."""
    target_root = lost_and_found(cfg)
    moved = []
    for directory in directories:
        target = target_root / directory.parent.name / directory.name
        n = 1
        while target.exists():
            target = target_root / directory.parent.name / f"{directory.name}.{n}"
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.rename(target)
        except OSError as exc:
            log.error("lost_and_found.not_moved", path=str(directory), error=str(exc)[:300])
            continue
        log.warning("lost_and_found.moved", path=str(directory), to=str(target))
        moved.append(target)
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # the group's directory, when nothing else is left in it
    return moved


def _remove(finding: Finding, path: Path, repair: bool) -> Finding:
    if repair:
        shutil.rmtree(path, ignore_errors=True)
        finding.repaired = not path.exists()
    return finding


# Leases and attempts ----------------------------------------------------------------------
def _leases_and_attempts(
    cfg: Config, db: Database, repair: bool, leases: Leases | None
) -> list[Finding]:
    found: list[Finding] = []
    node = cfg.daemon.node_name or Owner.this_process().node
    with db.transaction() as s:
        now = database_now(s)
        expired = s.scalars(
            select(Group).where(Group.state == State.RUNNING.value, Group.lease_expires_at < now)
        ).all()
        for g in expired:
            found.append(
                Finding(
                    "expired_lease",
                    f"group {g.group_id} running {g.stage} under {g.lease_owner}, lease "
                    f"expired {(now - g.lease_expires_at).total_seconds():.0f} s ago",
                    "reap it (back to its checkpoint)",
                    group_id=g.group_id,
                )
            )
        orphans = _orphan_attempts(s)
        for a, why in orphans:
            f = Finding(
                "orphan_attempt",
                f"attempt {a.id} ({a.stage}, token {a.fencing_token}) is 'running' but {why}",
                "close it as abandoned",
                group_id=a.group_id,
            )
            if repair:
                a.outcome, a.finished_at = "abandoned", now
                a.error_message = f"check-state: {why}"
                f.repaired = True
            found.append(f)
    if repair and expired:
        reaper = leases or Leases(db, Owner.this_process(node), lease_s=cfg.daemon.lease_s)
        reaped = set(reaper.reap(crash_budget=cfg.retry.crash_budget))
        reaped |= set(reaper.reap(crash_budget=cfg.retry.crash_budget, only_dead_here=True))
        for f in found:
            if f.kind == "expired_lease":
                f.repaired = f.group_id in reaped
    return found


def _orphan_attempts(s: Session) -> list[tuple[StageAttempt, str]]:
    """Attempt rows still ``running`` whose group is no longer running under their token
    (a running group with a dead owner is the reaper's: see ``expired_lease``)."""
    out = []
    for a in s.scalars(select(StageAttempt).where(StageAttempt.outcome == "running")):
        group = s.get(Group, a.group_id)
        if group is None or group.state != State.RUNNING.value:
            out.append((a, f"its group is {group.state if group else 'gone'}"))
        elif group.fencing_token != a.fencing_token:
            out.append((a, f"its group moved on to token {group.fencing_token}"))
    return out


def summary(findings: list[Finding]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for f in findings:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    return {
        "findings": len(findings),
        "by_kind": kinds,
        "repaired": sum(f.repaired for f in findings),
        "items": [f.as_dict() for f in findings],
    }
