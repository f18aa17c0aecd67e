"""Product registration: the rows an astronomer queries (the MS, the images, the QA numbers,
which calibration and which fallback tier produced them), written in the same transaction
that marks the group completed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from supervisor.models import (
    Artifact,
    CalibrationSet,
    Group,
    Product,
    QualityAssessment,
    StageAttempt,
)

PRODUCT_KINDS = ("ms", "image_fits", "image_pbcor_fits", "image_png", "source_catalogue")


def calibration_used(s: Session, group: Group) -> tuple[str | None, int | None]:
    """(tier, calibration set id) of the group's committed calibrate attempt."""
    attempt = _committed_attempt(s, group.group_id, "calibrate")
    if attempt is None:
        return None, None
    metrics = (attempt.result or {}).get("metrics", {})
    tier = metrics.get("calibration_tier")
    if metrics.get("mode") == "solve" and tier not in (None, "self"):
        return tier, None  # solved on another calibrator for itself only: no registered set
    if metrics.get("mode") == "solve":
        own = s.scalars(
            select(CalibrationSet)
            .where(CalibrationSet.group_id == group.group_id)
            .order_by(CalibrationSet.id.desc())
        ).first()
        return "self", own.id if own else None
    return metrics.get("calibration_tier"), metrics.get("calibration_set_id")


def register_products(s: Session, group: Group, now: datetime) -> list[Product]:
    tier, set_id = calibration_used(s, group)
    s.execute(delete(Product).where(Product.group_id == group.group_id))
    artifacts = {
        a.kind: a for a in s.scalars(select(Artifact).where(Artifact.group_id == group.group_id))
    }
    qa: dict[str, Any] = {}
    for row in s.scalars(
        select(QualityAssessment)
        .where(QualityAssessment.group_id == group.group_id)
        .order_by(QualityAssessment.id)
    ):
        qa[row.stage] = {"score": row.score, "verdict": row.verdict, "metrics": row.metrics}
    image_metrics = _stage_metrics(s, group.group_id, "image")
    products = []
    for kind in PRODUCT_KINDS:
        art = artifacts.get(kind)
        if art is not None:
            products.append(
                Product(
                    group_id=group.group_id,
                    kind=kind,
                    path=art.path,
                    calibration_tier=tier,
                    calibration_set_id=set_id,
                    metrics=image_metrics if kind != "ms" else None,
                    created_at=now,
                )
            )
    products.append(
        Product(
            group_id=group.group_id,
            kind="qa",
            path=None,
            calibration_tier=tier,
            calibration_set_id=set_id,
            metrics={"gates": qa, "image": image_metrics},
            created_at=now,
        )
    )
    s.add_all(products)
    s.flush()
    return products


def _committed_attempt(s: Session, group_id: str, stage: str) -> StageAttempt | None:
    """The newest succeeded attempt of ``stage`` for the group (the one that committed)."""
    return s.scalars(
        select(StageAttempt)
        .where(
            StageAttempt.group_id == group_id,
            StageAttempt.stage == stage,
            StageAttempt.outcome == "succeeded",
        )
        .order_by(StageAttempt.id.desc())
    ).first()


def _stage_metrics(s: Session, group_id: str, stage: str) -> dict[str, Any]:
    attempt = _committed_attempt(s, group_id, stage)
    return dict((attempt.result or {}).get("metrics", {})) if attempt else {}
