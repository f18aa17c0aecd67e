"""Per-subband damage is contained (real preflight and convert workers; the later stages are
the fake stage): a subband of NaN visibilities or non-finite uvw is dropped and named, a few
NaN samples are flagged, the group goes on with the rest of the band; too much damage
quarantines the group naming every file. Raw files are never changed."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Group, StageAttempt
from supervisor.simulate import Fault, SimulationSpec, simulate
from tests.conftest import fake_pipeline_config

pytestmark = pytest.mark.casa

REAL = {"tiers": [{"name": "primary", "params": {}}], "timeout_s": 300.0}


def metrics(db: Database, gid: str, stage: str) -> dict:
    with db.transaction() as s:
        attempt = s.scalars(
            select(StageAttempt).where(
                StageAttempt.group_id == gid,
                StageAttempt.stage == stage,
                StageAttempt.outcome == "succeeded",
            )
        ).one()
        return attempt.result["metrics"]


def test_damaged_subbands_are_dropped_or_flagged_and_named(
    workspace: Path, sqlite_db: Database
) -> None:
    faults = (
        Fault("nan_vis", 0, 3),
        Fault("nan_some_vis", 0, 5),
        Fault("nan_uvw", 1, 7),
        *(Fault("nan_vis", 2, sb) for sb in (0, 2, 4, 6, 8)),
    )
    truths = simulate(
        workspace / "incoming",
        SimulationSpec(
            n_groups=3,
            n_antennas=5,
            n_channels_per_subband=2,
            n_field_sources=1,
            calibrator="3C48",  # group 0 solves (fake), group 1 applies its tables
            seed=10,
            faults=faults,
        ),
    )
    shutil.rmtree(workspace / "incoming" / "truth")
    before = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (workspace / "incoming").iterdir()
    }
    cfg = fake_pipeline_config(
        workspace,
        settings={"ingest": {"stability_interval_s": 0.2}},
        preflight={**REAL, "module": "stages.preflight"},
        convert={**REAL, "module": "stages.convert"},
    )
    Daemon(cfg, sqlite_db, rng=random.Random(0)).run(until_idle=True)
    ids = [t.group_id for t in truths]
    with sqlite_db.transaction() as s:
        states = {
            g.group_id: (g.state, g.error_code, g.state_reason) for g in s.scalars(select(Group))
        }
    assert states[ids[0]][0] == states[ids[1]][0] == "completed"

    pre0, conv0 = metrics(sqlite_db, ids[0], "preflight"), metrics(sqlite_db, ids[0], "convert")
    assert set(pre0["dropped_subbands"]) == {"03"}
    assert (
        "_sb03.hdf5: 100.0% of the visibilities are NaN/Inf"
        in pre0["dropped_subbands"]["03"]["reason"]
    )
    assert set(pre0["nonfinite_to_flag"]) == {"05"}
    assert conv0["subbands_used"] == 15 and conv0["nonfinite_flagged"] > 0
    assert conv0["flagged_fraction"] > 0.0  # the gate sees what was flagged

    pre1 = metrics(sqlite_db, ids[1], "preflight")
    assert set(pre1["dropped_subbands"]) == {"07"}
    assert "uvw rows are not finite" in pre1["dropped_subbands"]["07"]["reason"]
    assert metrics(sqlite_db, ids[1], "convert")["subbands_used"] == 15

    state, code, reason = states[ids[2]]
    assert (state, code) == ("quarantined", "damaged_subbands")
    assert "only 11 of 16 subbands usable" in reason
    for sb in (0, 2, 4, 6, 8):
        assert f"_sb{sb:02d}.hdf5" in reason
    after = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (workspace / "incoming").iterdir()
    }
    assert after == before
