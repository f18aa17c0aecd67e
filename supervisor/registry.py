"""Product registration: the rows an astronomer queries (the MS, the images, the QA numbers,
which calibration and which fallback tier produced them), written in the same transaction
that marks the group completed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select

from supervisor.models import Artifact, CalibrationSet, Product, QualityAssessment, StageAttempt

PRODUCT_KINDS = ("ms", "image_fits", "image_pbcor_fits", "image_png", "source_catalogue")

# Core statements on the tables, built once: registration runs in every group's last commit.
_attempts, _sets = StageAttempt.__table__, CalibrationSet.__table__
_artifacts, _qa, _products = Artifact.__table__, QualityAssessment.__table__, Product.__table__
_COMMITTED_RESULTS = (
    select(_attempts.c.stage, _attempts.c.result)
    .where(_attempts.c.group_id == bindparam("group_id"), _attempts.c.outcome == "succeeded")
    .order_by(_attempts.c.id)
)
_OWN_SET = (
    select(_sets.c.id)
    .where(_sets.c.group_id == bindparam("group_id"))
    .order_by(_sets.c.id.desc())
    .limit(1)
)
_ARTIFACTS = select(_artifacts.c.kind, _artifacts.c.path).where(
    _artifacts.c.group_id == bindparam("group_id")
)
_ASSESSMENTS = (
    select(_qa.c.stage, _qa.c.score, _qa.c.verdict, _qa.c.metrics)
    .where(_qa.c.group_id == bindparam("group_id"))
    .order_by(_qa.c.id)
)
_DELETE_PRODUCTS = delete(_products).where(_products.c.group_id == bindparam("group_id"))
_INSERT_PRODUCT = insert(_products)


def committed_metrics(conn: Connection, group_id: str) -> dict[str, dict[str, Any]]:
    """Each stage's metrics from its newest succeeded (committed) attempt: a worker's
    upstream metrics (stage_request) and the registered products' QA."""
    newest: dict[str, dict[str, Any]] = {}
    for stage, result in conn.execute(_COMMITTED_RESULTS, {"group_id": group_id}):
        newest[stage] = dict((result or {}).get("metrics", {}))  # later ids overwrite
    return newest


def calibration_used(
    conn: Connection, group_id: str, calibrate: dict[str, Any] | None
) -> tuple[str | None, int | None]:
    """(tier, calibration set id) given the metrics of the group's committed calibrate
    attempt (None: none committed)."""
    if calibrate is None:
        return None, None
    tier = calibrate.get("calibration_tier")
    if calibrate.get("mode") == "solve" and tier not in (None, "self"):
        return tier, None  # solved on another calibrator for itself only: no registered set
    if calibrate.get("mode") == "solve":
        return "self", conn.execute(_OWN_SET, {"group_id": group_id}).scalar()
    return tier, calibrate.get("calibration_set_id")


def register_products(conn: Connection, group_id: str, now: datetime) -> list[dict[str, Any]]:
    """Replace the group's product rows (its MS, images, catalogue, and one QA row);
    returns the rows written."""
    key = {"group_id": group_id}
    stage_metrics = committed_metrics(conn, group_id)
    tier, set_id = calibration_used(conn, group_id, stage_metrics.get("calibrate"))
    conn.execute(_DELETE_PRODUCTS, key)
    artifacts = {kind: path for kind, path in conn.execute(_ARTIFACTS, key)}
    qa = {
        stage: {"score": score, "verdict": verdict, "metrics": metrics}
        for stage, score, verdict, metrics in conn.execute(_ASSESSMENTS, key)
    }
    image_metrics = stage_metrics.get("image", {})
    common = {
        "group_id": group_id,
        "calibration_tier": tier,
        "calibration_set_id": set_id,
        "created_at": now,
    }
    rows = [
        {
            **common,
            "kind": kind,
            "path": artifacts[kind],
            "metrics": None if kind == "ms" else image_metrics,
        }
        for kind in PRODUCT_KINDS
        if kind in artifacts
    ]
    rows.append(
        {**common, "kind": "qa", "path": None, "metrics": {"gates": qa, "image": image_metrics}}
    )
    conn.execute(_INSERT_PRODUCT, rows)
    return rows
