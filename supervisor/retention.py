"""Retention of intermediates: the Measurement Set of a completed *target* group is removed
``retention.target_ms_days`` after completion (it is the biggest file and can be rebuilt
from the raw data with ``requeue --from-stage convert``). Calibrator MS, calibration tables,
images and everything of a group that is not completed are kept; raw incoming files are
never touched. The artifact and product rows stay, marked with when and by which rule the
file went (``show`` prints it; ``check-state`` does not count it as missing).

The row is marked before the file is removed: a crash in between leaves a marked file that
the next run removes, never an unmarked hole.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from sqlalchemy import select

from supervisor import manifest, metrics
from supervisor.config import Config
from supervisor.db import Database
from supervisor.leases import database_now
from supervisor.models import Artifact, Group, Product
from supervisor.reconcile import artifact_size
from supervisor.states import State

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Pruned:
    group_id: str
    path: str
    bytes: int
    rule: str


def _record_pruned(products_root: Path, item: Pruned, now: datetime) -> None:
    path = Path(item.path)
    try:
        stage_dir = next(p for p in path.parents if p.parent.parent == products_root)
    except StopIteration:
        return
    manifest.record_event(
        products_root,
        stage_dir.parent.name,
        stage_dir.name,
        {
            "event": "pruned",
            "artifact": str(path.relative_to(stage_dir)),
            "rule": item.rule,
            "at": now,
        },
    )


def apply_retention(cfg: Config, db: Database, now: datetime | None = None) -> list[Pruned]:
    """Mark and remove what the policy lets go (module docstring); returns what went."""
    days = cfg.retention.target_ms_days
    if not cfg.retention.enabled or days <= 0:
        return []
    rule = f"target_ms_after_{days:g}d"
    products_root = cfg.path("products").resolve()
    out: list[Pruned] = []
    with db.transaction() as s:
        now = now or database_now(s)
        cutoff = now - timedelta(days=days)
        rows = s.execute(
            select(Artifact)
            .join(Group, Group.group_id == Artifact.group_id)
            .where(
                Artifact.kind == "ms",
                Artifact.pruned_at.is_(None),
                Group.state == State.COMPLETED.value,
                Group.is_calibrator.is_(False),
                Group.completed_at <= cutoff,
            )
        ).scalars()
        for art in rows:
            path = Path(art.path).resolve()
            if products_root not in path.parents:
                log.error("retention.refused_outside_products", path=str(path))
                continue
            art.pruned_at, art.pruned_rule = now, rule
            for product in s.scalars(
                select(Product).where(Product.group_id == art.group_id, Product.path == art.path)
            ):
                product.pruned_at, product.pruned_rule = now, rule
            out.append(Pruned(art.group_id, str(path), artifact_size(path), rule))
        # Marked but still on disk (a crash after an earlier commit): remove them too.
        leftovers = [
            Path(a.path)
            for a in s.scalars(select(Artifact).where(Artifact.pruned_at.is_not(None)))
            if Path(a.path).exists()
        ]
    for item in out:
        # The manifest first: a rebuild must not call the pruned MS missing (and requeue).
        _record_pruned(products_root, item, now)
        shutil.rmtree(item.path, ignore_errors=True)
        metrics.PRUNED.labels(item.rule).inc()
        metrics.PRUNED_BYTES.labels(item.rule).inc(item.bytes)
        log.info("retention.pruned", group_id=item.group_id, path=item.path, bytes=item.bytes)
    for path in leftovers:
        if products_root in path.resolve().parents:
            shutil.rmtree(path, ignore_errors=True)
    return out
