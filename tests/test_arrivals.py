"""The instrument's health in the metrics: which subband has been missing for how many
groups, the time since the last raw file, ingest quarantines counted with stage="ingest";
health degraded while data stopped arriving. Real UVH5 files through the real ingest."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import REGISTRY
from sqlalchemy import update

from supervisor import health, metrics, migrate
from supervisor.db import Database
from supervisor.ingest import Ingestor
from supervisor.models import SubbandFile
from supervisor.status import queue_snapshot
from tests.conftest import SimulatedNight, fake_pipeline_config


def _quarantined_by_ingest() -> float:
    return (
        REGISTRY.get_sample_value(
            "contimg_stage_attempts_total", {"stage": "ingest", "result": "quarantined"}
        )
        or 0.0
    )


def test_a_subband_missing_from_every_group_is_counted_and_alertable(
    workspace: Path, night: SimulatedNight
) -> None:
    cfg = fake_pipeline_config(
        workspace, settings={"ingest": {"stability_interval_s": 0, "group_deadline_s": 1}}
    )
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    for i in range(3):  # a correlator node down all night: sb07 never comes
        night.copy_group(i, cfg.incoming_dir, skip={7})
    before = _quarantined_by_ingest()
    clock = [datetime.now(UTC)]
    ingestor = Ingestor(cfg, db, clock=lambda: clock[0])
    ingestor.run_once()
    clock[0] += timedelta(seconds=5)  # past the deadline: short groups end (today)
    report = ingestor.run_once()
    assert len(report.groups_quarantined) == 3
    assert _quarantined_by_ingest() - before == 3  # ingest's quarantines are counted

    snap = queue_snapshot(db)
    assert snap["subband_missing_groups"][7] == 3
    assert {sb for sb, n in snap["subband_missing_groups"].items() if n} == {7}
    assert snap["seconds_since_last_file"] < 60
    # The metric as Prometheus scrapes it, and ContimgSubbandMissing's expression (>= 3).
    metrics.QUEUE.source = lambda: queue_snapshot(db)
    try:
        value = REGISTRY.get_sample_value("contimg_subband_missing_groups", {"subband": "07"})
        assert value is not None and value >= 3
        assert REGISTRY.get_sample_value("contimg_subband_missing_groups", {"subband": "06"}) == 0
    finally:
        metrics.QUEUE.source = None
    check = health._arrivals(cfg, snap)
    assert check.status == "ok" and "sb07 x3" in check.detail

    # Nothing more arrives for an hour: degraded (the alert: > 2 cadences).
    with db.transaction() as s:
        s.execute(update(SubbandFile).values(first_seen_at=datetime.now(UTC) - timedelta(hours=1)))
    check = health._arrivals(cfg, queue_snapshot(db))
    assert check.status == "degraded" and check.value is not None and check.value > 2 * 309
