"""Data another DSA-110 simulator wrote, through the real pipeline: every antenna on the
E-W arm (a co-linear array: the N-S arm down), no autocorrelations, drift-scan phasing,
channels ascending within each file, the telescope called "DSA-110". The image stage once
died of MemoryError here (a QA mask dilated by a 98 360" beam); now every group ends in a
classified state, and the elongated beam is a quality warning with its numbers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import select

from supervisor import migrate
from supervisor.config import load_config
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Group, QualityAssessment, StageAttempt
from supervisor.simulate import SimulationSpec, simulate

pytestmark = pytest.mark.casa


def test_a_colinear_foreign_night_ends_classified_with_the_beam_reported(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    truths = simulate(
        ws / "incoming",
        SimulationSpec(
            n_groups=2,
            n_antennas=8,
            n_channels_per_subband=2,
            layout="ew",
            autos=False,
            phase="drift",
            channel_order="ascending",
            telescope_name="DSA-110",
            calibrator="3C48",
            seed=110,
        ),
    )
    # hogbom for both groups: mtmfs on a co-linear calibrator field takes minutes (measured
    # 195 s here) and this test is about the path, not the deconvolver.
    config = tmp_path / "hogbom.toml"
    config.write_text(
        '[stages.image]\ntiers = [{ name = "primary", params = { deconvolver = "hogbom" } }]\n'
    )
    cfg = load_config(config, workspace=ws, environ={})
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    Daemon(cfg, db, rng=random.Random(0)).run(until_idle=True)
    with db.transaction() as s:
        groups = {g.group_id: g for g in s.scalars(select(Group))}
        failures = [
            (a.stage, a.error_category, a.error_code)
            for a in s.scalars(select(StageAttempt).where(StageAttempt.outcome == "failed"))
        ]
        image_qa = s.scalars(
            select(QualityAssessment).where(QualityAssessment.stage == "image")
        ).all()
    assert set(groups) == {t.group_id for t in truths}
    for g in groups.values():
        assert g.state in ("completed", "quarantined"), (g.group_id, g.state, g.state_reason)
        assert g.error_code != "unclassified" and g.error_category != "fatal"
    assert all(code != "unclassified" for _s, _c, code in failures), failures
    assert image_qa, "no image was made: the co-linear night never reached imaging"
    for qa in image_qa:
        ratio = qa.metrics["beam_axis_ratio"]["value"]
        assert ratio > 3.0  # a co-linear array: the beam is long and thin
        assert qa.metrics["beam_axis_ratio"]["verdict"] == "warn"
    db.dispose()
