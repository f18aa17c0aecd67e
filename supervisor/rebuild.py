"""Rebuild the database from the disk: which stage commits on disk (their manifests, see
:mod:`supervisor.manifest`) the database does not know, and how to bring it forward.

A manifest is trusted only as part of a chain: a group's stages in order, each with a
fencing token above the stage before it, none superseded by a requeue, starting where the
database's checkpoint for the group is (or at preflight for a group it does not know).
Beyond the database's checkpoint a manifest is one of:

- ``unknown_group``: the database has no such group (deleted, or an empty database);
- ``newer``: its token is above every attempt the database knows for the group: the
  database is older than the disk (a restored backup);
- ``orphan``: written by an attempt the database knows, whose commit never happened (the
  daemon died between the rename and the commit). Adopted only when the group's last move
  was that attempt's own (it is running, or was reaped since), never after a requeue.

``db rebuild`` applies them all; ``run`` and ``db upgrade`` refuse to start while any
``unknown_group`` or ``newer`` one exists (no reprocessing storm, nothing replaced);
``check-state --repair`` adopts orphans. Attempt history is not rebuilt: each applied stage
gets one ``succeeded`` attempt row carrying its result, and the group's audit log says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.orm import Session

from supervisor import manifest, registry
from supervisor.config import Config
from supervisor.db import Database, is_sqlite
from supervisor.leases import Owner
from supervisor.manifest import Manifest
from supervisor.models import (
    Artifact,
    CalibrationSet,
    CalibrationTable,
    Group,
    Product,
    QualityAssessment,
    StageAttempt,
    Transition,
)
from supervisor.states import STAGE_ORDER, State

log = structlog.get_logger(__name__)

REBUILD_ACTOR = "db-rebuild"
REFUSING_KINDS = ("unknown_group", "newer")


@dataclass
class Known:
    """What the database knows of one group."""

    state: str
    stage: str | None
    fencing_token: int
    lease_live: bool
    max_attempt_token: int
    stage_attempt_tokens: dict[str, int]
    last_from_state: str | None

    @property
    def checkpoint(self) -> int:
        if self.state == State.COMPLETED.value:
            return len(STAGE_ORDER)
        return STAGE_ORDER.index(self.stage) if self.stage else 0  # type: ignore[arg-type]


@dataclass
class Found:
    """A stage commit on disk that the database does not know (module docstring)."""

    manifest: Manifest
    kind: str  # unknown_group / newer / orphan

    @property
    def label(self) -> str:
        m = self.manifest
        return f"{m.group_id} {m.stage} (token {m.fencing_token}, {self.kind})"


@dataclass
class Survey:
    """The disk against the database.

    found: group -> its stage commits beyond the database's checkpoint, in stage order.
    legacy: stage directories of groups the database does not know that no trusted chain
    describes (written before manifests existed, or a chain broken at its first stage): not
    rebuildable, but proof of a populated workspace.
    """

    found: dict[str, list[Found]] = field(default_factory=dict)
    legacy: list[Path] = field(default_factory=list)

    def refusing(self) -> list[Found]:
        return [f for chain in self.found.values() for f in chain if f.kind in REFUSING_KINDS]

    def all(self) -> list[Found]:
        return [f for chain in self.found.values() for f in chain]


def _known(db: Database | None, node: str, *, skip_completed: bool) -> dict[str, Known]:
    """What the database knows of each group (``skip_completed``: of the groups that are not
    completed, a small set, and completed ones only by name: a year of them is ~10^5)."""
    if db is None:
        return {}
    out: dict[str, Known] = {}
    live_only = Group.state != State.COMPLETED.value
    with db.read() as s:
        now = _db_now(s)
        columns = select(
            Group.group_id,
            Group.state,
            Group.stage,
            Group.fencing_token,
            Group.lease_expires_at,
            Group.lease_owner,
        )
        rows = s.execute(columns.where(live_only) if skip_completed else columns).all()
        if skip_completed:
            for (group_id,) in s.execute(select(Group.group_id).where(~live_only)):
                out[group_id] = Known(State.COMPLETED.value, None, 0, False, 0, {}, None)
        wanted = select(Group.group_id).where(live_only)
        tokens: dict[str, dict[str, int]] = {}
        attempts = select(
            StageAttempt.group_id, StageAttempt.stage, func.max(StageAttempt.fencing_token)
        ).group_by(StageAttempt.group_id, StageAttempt.stage)
        if skip_completed:
            attempts = attempts.where(StageAttempt.group_id.in_(wanted))
        for group_id, stage, token in s.execute(attempts):
            tokens.setdefault(group_id, {})[stage] = int(token)
        last_ids = select(func.max(Transition.id)).group_by(Transition.group_id)
        if skip_completed:
            last_ids = last_ids.where(Transition.group_id.in_(wanted))
        last_from = dict(
            s.execute(
                select(Transition.group_id, Transition.from_state).where(
                    Transition.id.in_(last_ids)
                )
            ).all()
        )
    for group_id, state, stage, token, lease, owner in rows:
        per_stage = tokens.get(group_id, {})
        # A running group's lease counts only while its owner may be alive: an owner of this
        # node whose process is gone (a killed daemon, in a restored backup) holds nothing.
        holder = Owner.parse(owner or "")
        live = state == State.RUNNING.value and lease is not None and lease >= now
        if live and holder is not None and holder.provably_dead_here(node):
            live = False
        out[group_id] = Known(
            state=state,
            stage=stage,
            fencing_token=int(token or 0),
            lease_live=live,
            max_attempt_token=max(per_stage.values(), default=0),
            stage_attempt_tokens=per_stage,
            last_from_state=last_from.get(group_id),
        )
    return out


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)


def survey(cfg: Config, db: Database | None, *, skip_completed: bool = False) -> Survey:
    """Compare the products' manifests with the database (None: no database at all).
    ``skip_completed``: do not read the manifests of groups the database has completed
    (the start-up check: a completed group has nothing beyond its checkpoint)."""
    node = cfg.daemon.node_name or Owner.this_process().node
    known = _known(db, node, skip_completed=skip_completed)
    products = cfg.path("products")
    by_group: dict[str, dict[str, Path]] = {}
    for stage_dir in manifest.stage_directories(products):
        by_group.setdefault(stage_dir.parent.name, {})[stage_dir.name] = stage_dir
    out = Survey()
    for group_id, dirs in sorted(by_group.items()):
        k = known.get(group_id)
        if k is not None and skip_completed and k.state == State.COMPLETED.value:
            continue
        manifests = {}
        for stage_name, directory in dirs.items():
            m = manifest.read(directory)
            if m is not None and m.stage == stage_name and m.group_id == group_id:
                manifests[stage_name] = m
        chain = _chain(manifests, k) if manifests else []
        if chain:
            out.found[group_id] = chain
        elif k is None:
            # Products of a group the database does not know, and nothing rebuildable:
            # written before manifests existed, or a chain broken at its first stage. Proof
            # of a populated workspace all the same.
            out.legacy.extend(dirs[name] for name in sorted(dirs))
    return out


def _chain(manifests: dict[str, Manifest], k: Known | None) -> list[Found]:
    start = 0 if k is None else k.checkpoint
    if k is not None and k.lease_live:
        return []  # a stage of it is running (it may be committing right now)
    previous = -1
    if k is not None and start > 0:
        previous = k.stage_attempt_tokens.get(STAGE_ORDER[start - 1], -1)
    chain: list[Found] = []
    for stage in STAGE_ORDER[start:]:
        m = manifests.get(stage.value)
        if m is None or m.superseded or m.fencing_token <= previous:
            break
        if k is None:
            kind = "unknown_group"
        elif m.fencing_token > k.max_attempt_token:
            kind = "newer"
        else:
            # The attempt is known: adopt it only if no later attempt of this stage began,
            # and the group's last move was that attempt's (running, or reaped since).
            own_move = k.state == State.RUNNING.value or k.last_from_state == State.RUNNING.value
            if m.fencing_token < k.stage_attempt_tokens.get(stage.value, 0) or not own_move:
                break
            kind = "orphan"
        chain.append(Found(m, kind))
        previous = m.fencing_token
    return chain


# Applying ---------------------------------------------------------------------------------
@dataclass
class Applied:
    groups_created: int = 0
    groups_moved: int = 0
    stages: int = 0
    calibration_sets: int = 0
    events_applied: int = 0
    files_seen: int = 0


def apply(cfg: Config, db: Database, found: Iterable[Found], *, why: str) -> Applied:
    """Write ``found`` (stage commits, in stage order per group) into the database."""
    out = Applied()
    chains: dict[str, list[Found]] = {}
    for f in found:
        chains.setdefault(f.manifest.group_id, []).append(f)
    products = cfg.path("products")
    for group_id, chain in chains.items():
        with db.transaction() as s:
            now = _db_now(s)
            created = _apply_group(s, products, group_id, chain, now, why)
            out.groups_created += created
            out.groups_moved += not created
            out.stages += len(chain)
            out.calibration_sets += sum(
                1 for f in chain if f.manifest.data.get("calibration_set") is not None
            )
        log.info(
            "rebuild.group_applied",
            group_id=group_id,
            stages=[f.manifest.stage for f in chain],
            kinds=sorted({f.kind for f in chain}),
        )
    _fix_sequences(db)
    return out


def _db_now(s: Session) -> datetime:
    from supervisor.leases import database_now

    return database_now(s)


def _apply_group(
    s: Session, products: Path, group_id: str, chain: list[Found], now: datetime, why: str
) -> bool:
    last = chain[-1].manifest
    following = last.data.get("next_stage")
    state = State.COMPLETED.value if following is None else State.PENDING.value
    snap = last.data["group"]
    group = s.get(Group, group_id)
    created = group is None
    source = ", ".join(f"{f.manifest.stage} (token {f.manifest.fencing_token})" for f in chain)
    message = f"{why}: rebuilt from the commit manifests of {source}"
    if group is None:
        group = Group(
            group_id=group_id,
            obs_start=_as_datetime(snap["obs_start"]),
            state=state,
            stage=following or last.stage,
            pointing_dec_deg=snap.get("pointing_dec_deg"),
            is_calibrator=bool(snap.get("is_calibrator")),
            calibrator_name=snap.get("calibrator_name"),
            calibrator_choice=snap.get("calibrator_choice"),
            obs_duration_s=snap.get("obs_duration_s"),
            priority=int(snap.get("priority") or 0),
            attempt=0,
            crash_count=0,
            fallback_tier=0,
            fencing_token=last.fencing_token,
            correlation_id=snap.get("correlation_id") or "",
            first_seen_at=_as_datetime(snap.get("first_seen_at") or snap["obs_start"]),
            updated_at=now,
            completed_at=_as_datetime(last.data["committed_at"]) if following is None else None,
        )
        s.add(group)
        s.flush()
        from_state = None
    else:
        from_state = group.state
        # Attempts the dead database left running end here (no daemon holds this
        # workspace during a rebuild; a live lease was never surveyed).
        s.execute(
            update(StageAttempt)
            .where(StageAttempt.group_id == group_id, StageAttempt.outcome == "running")
            .values(outcome="abandoned", finished_at=now, error_message=f"{why}: ended")
        )
        group.state = state
        group.stage = following or last.stage
        group.fencing_token = max(group.fencing_token, last.fencing_token)
        group.lease_owner = group.lease_expires_at = group.next_attempt_at = None
        group.attempt = group.crash_count = group.fallback_tier = 0
        group.state_reason = group.error_category = group.error_code = None
        group.updated_at = now
        group.completed_at = _as_datetime(last.data["committed_at"]) if following is None else None
    for f in chain:
        _apply_stage(s, products, group_id, f.manifest)
    if following is None:
        s.flush()
        conn = s.connection()
        registry.register_products(conn, group_id, _as_datetime(last.data["committed_at"]))
        _mark_pruned_products(s, group_id)
    s.add(
        Transition(
            group_id=group_id,
            from_state=from_state,
            to_state=state,
            stage=following or last.stage,
            at=now,
            attempt=0,
            fencing_token=group.fencing_token,
            actor=REBUILD_ACTOR,
            correlation_id=group.correlation_id,
            message=message,
        )
    )
    return created


def _apply_stage(s: Session, products: Path, group_id: str, m: Manifest) -> None:
    data = m.data
    committed = _as_datetime(data["committed_at"])
    stage_dir = manifest.stage_directory(products, group_id, m.stage)
    attempt = StageAttempt(
        group_id=group_id,
        stage=m.stage,
        attempt=int(data.get("attempt") or 1),
        fallback_tier=int(data.get("tier") or 0),
        fencing_token=m.fencing_token,
        outcome="succeeded",
        owner=REBUILD_ACTOR,
        workdir=str(data.get("workdir") or ""),
        started_at=committed,
        finished_at=committed,
        result=data.get("result"),
        correlation_id=data["group"].get("correlation_id") or "",
    )
    s.add(attempt)
    s.flush()
    s.execute(delete(Artifact).where(Artifact.group_id == group_id, Artifact.stage == m.stage))
    pruned = m.pruned()
    for entry in data.get("artifacts", []):
        event = pruned.get(entry["path"])
        path = str(stage_dir / entry["path"])
        s.execute(delete(Artifact).where(Artifact.path == path))  # unique: an older row
        s.add(
            Artifact(
                group_id=group_id,
                attempt_id=attempt.id,
                stage=m.stage,
                kind=entry["kind"],
                path=path,
                bytes=int(entry.get("bytes") or 0),
                created_at=committed,
                pruned_at=_as_datetime(event["at"]) if event else None,
                pruned_rule=event.get("rule") if event else None,
            )
        )
    s.flush()
    for old_path, size in (data.get("resized") or {}).items():
        rel = _under_group(old_path, group_id)
        if rel is not None:
            s.execute(
                update(Artifact)
                .where(Artifact.path == str(products / group_id / rel))
                .values(bytes=int(size))
            )
    gate = data.get("gate")
    if gate:
        s.add(
            QualityAssessment(
                group_id=group_id,
                attempt_id=attempt.id,
                stage=m.stage,
                score=float(gate["score"]),
                verdict=str(gate["verdict"]),
                metrics=gate.get("metrics") or {},
                created_at=committed,
            )
        )
    cal = data.get("calibration_set")
    if cal:
        _apply_calibration_set(s, stage_dir, group_id, cal, m, committed)


def _apply_calibration_set(
    s: Session,
    stage_dir: Path,
    group_id: str,
    cal: dict[str, Any],
    m: Manifest,
    committed: datetime,
) -> None:
    status = m.calibration_status() or (cal.get("status", "valid"), cal.get("status_reason"))
    set_id = cal.get("id")
    existing = s.get(CalibrationSet, set_id) if set_id is not None else None
    if existing is not None and existing.group_id != group_id:
        set_id = None  # the id went to another set meanwhile: a new one
    elif existing is not None:
        existing.status, existing.status_reason = status
        return
    cal_set = CalibrationSet(
        id=set_id,
        group_id=group_id,
        calibrator=cal["calibrator"],
        solved_at=_as_datetime(cal["solved_at"]),
        valid_from=_as_datetime(cal["valid_from"]),
        valid_until=_as_datetime(cal["valid_until"]),
        status=status[0],
        status_reason=status[1],
        metrics=cal.get("metrics"),
        created_at=committed,
    )
    s.add(cal_set)
    s.flush()
    for table in cal.get("tables", []):
        s.add(
            CalibrationTable(
                set_id=cal_set.id,
                kind=table["kind"],
                path=str(stage_dir / table["path"]),
                interp=table.get("interp", "linear"),
                created_at=committed,
            )
        )
    s.flush()


def _mark_pruned_products(s: Session, group_id: str) -> None:
    for art in s.scalars(
        select(Artifact).where(Artifact.group_id == group_id, Artifact.pruned_at.is_not(None))
    ):
        s.execute(
            update(Product)
            .where(Product.group_id == group_id, Product.path == art.path)
            .values(pruned_at=art.pruned_at, pruned_rule=art.pruned_rule)
        )


def _under_group(path: str, group_id: str) -> Path | None:
    parts = Path(path).parts
    if group_id not in parts:
        return None
    return Path(*parts[len(parts) - parts[::-1].index(group_id) :])


def _fix_sequences(db: Database) -> None:
    """PostgreSQL: sets inserted with their old ids leave the sequence behind."""
    if is_sqlite(db.engine):
        return
    with db.transaction() as s:
        s.execute(
            text(
                "SELECT setval(pg_get_serial_sequence('calibration_sets', 'id'), "
                "GREATEST((SELECT MAX(id) FROM calibration_sets), 1))"
            )
        )


def sync_events(cfg: Config, db: Database) -> int:
    """Later changes recorded in the manifests of stages the database already knows (a
    pruned MS, a retired or invalid calibration set) that it does not have (an older
    backup): applied. Returns how many."""
    applied = 0
    for stage_dir in manifest.stage_directories(cfg.path("products")):
        m = manifest.read(stage_dir)
        if m is None or not m.events:
            continue
        with db.transaction() as s:
            for rel, event in m.pruned().items():
                path = str(stage_dir / rel)
                art = s.scalars(select(Artifact).where(Artifact.path == path)).first()
                if art is not None and art.pruned_at is None:
                    art.pruned_at, art.pruned_rule = _as_datetime(event["at"]), event.get("rule")
                    s.execute(
                        update(Product)
                        .where(Product.path == path)
                        .values(pruned_at=art.pruned_at, pruned_rule=art.pruned_rule)
                    )
                    applied += 1
            status = m.calibration_status()
            cal = m.data.get("calibration_set") or {}
            if status is not None and cal.get("id") is not None:
                cal_set = s.get(CalibrationSet, cal["id"])
                if (
                    cal_set is not None
                    and cal_set.group_id == m.group_id
                    and (cal_set.status, cal_set.status_reason) != status
                ):
                    cal_set.status, cal_set.status_reason = status
                    applied += 1
    return applied


def insert_subband_rows(cfg: Config, db: Database) -> int:
    """The incoming files' rows (ingest, once: files attach to the rebuilt groups by time)."""
    if not cfg.incoming_dir.is_dir():
        return 0
    from supervisor.ingest import Ingestor

    try:
        return Ingestor(cfg, db).run_once().files_seen
    except Exception:  # noqa: BLE001 - the groups are rebuilt; ingest runs again in the daemon
        log.exception("rebuild.ingest_failed")
        return 0


def rebuild(cfg: Config, db: Database) -> tuple[Survey, Applied]:
    """Bring ``db`` (migrated: empty, or older than the disk) forward from the manifests."""
    found = survey(cfg, db)
    applied = apply(cfg, db, found.all(), why="db rebuild")
    applied.events_applied = sync_events(cfg, db)
    applied.files_seen = insert_subband_rows(cfg, db)
    return found, applied
