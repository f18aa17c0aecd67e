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


def _subband_file(path: Path, n_rows: int, nan_rows: slice | None, nan_share: float) -> None:
    """The datasets screen_subband reads, chunked along the rows as pyuvdata writes them."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(7)
    vis = (rng.normal(size=(n_rows, 4, 2)) + 1j).astype(np.complex64)
    if nan_rows is not None:
        vis[nan_rows] = np.nan
    if nan_share:
        vis[rng.random(vis.shape) < nan_share] = np.nan
    with h5py.File(path, "w") as fh:
        fh["Header/uvw_array"] = np.zeros((n_rows, 3))
        fh.create_dataset("Data/visdata", data=vis, chunks=(min(500, n_rows), 4, 2))
        fh.create_dataset(
            "Data/nsamples", data=np.ones(vis.shape, np.float32), chunks=(min(500, n_rows), 4, 2)
        )


def test_the_screen_samples_big_subbands_and_still_sees_mostly_bad_ones(tmp_path: Path) -> None:
    from stages.preflight import screen_subband

    clean, half, speckled, small = (tmp_path / f"{n}.hdf5" for n in ("c", "h", "s", "m"))
    _subband_file(clean, 40_000, None, 0.0)
    _subband_file(half, 40_000, slice(0, 24_000), 0.0)  # 60 % bad, early in time
    _subband_file(speckled, 40_000, None, 0.02)
    _subband_file(small, 300, slice(0, 100), 0.0)
    found = {p.name: screen_subband(str(p)) for p in (clean, half, speckled, small)}
    # 40,000 rows in blocks of 3 chunks of 500 rows: 8 of 27 blocks, evenly spread, the
    # last one (1,000 rows) included: 11,500 rows.
    assert found["c.hdf5"]["screened_fraction"] == pytest.approx(11_500 / 40_000)
    assert found["c.hdf5"]["nonfinite_vis"] == 0
    assert 0.5 < found["h.hdf5"]["nonfinite_vis_fraction"] < 0.75  # dropped (> 0.5)
    assert 0.01 < found["s.hdf5"]["nonfinite_vis_fraction"] < 0.03  # kept, flagged by convert
    assert found["m.hdf5"]["screened_fraction"] == 1.0  # small: read whole, exact
    assert found["m.hdf5"]["nonfinite_vis_fraction"] == pytest.approx(1 / 3)
