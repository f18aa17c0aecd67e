"""The bad-input catalogue: data nobody here wrote, one case per defect. Each case ends in
the right state with a classified reason that names the file and the problem; the other
groups are not disturbed; raw files are checksummed before and after (never modified).

Ingest-level cases run the real ingest on a copy of a good group with one file damaged;
preflight-level cases run the real preflight (and convert, where the group goes on) over a
night of small groups, one defect each. ``bench/reliability.py`` reports this catalogue's
size.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from sqlalchemy import select

from supervisor.config import Config
from supervisor.db import Database
from supervisor.ingest import Ingestor
from supervisor.models import Group, StageAttempt, SubbandFile
from tests.conftest import FakeClock, SimulatedNight, fake_pipeline_config


@dataclass(frozen=True)
class Case:
    """One defect: ``damage(incoming, files) -> name of the file the reason must name``;
    ``code``: the classification expected (a file's rejection, or the group's reason)."""

    name: str
    level: str  # ingest / preflight / config
    code: str
    damage: Callable[[Path, list[Path]], str] | None = None


def _checksums(directory: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not directory.is_dir():
        return out
    for p in sorted(directory.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(directory))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _sb(files: list[Path], sb: int) -> Path:
    return next(f for f in files if f.name.endswith(f"_sb{sb:02d}.hdf5"))


# Ingest-level damage ------------------------------------------------------------------------
def truncated(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    os.truncate(f, f.stat().st_size // 2)
    return f.name


def zero_bytes(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    f.write_bytes(b"")
    return f.name


def random_bytes(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    f.write_bytes(random.Random(3).randbytes(8192))
    return f.name


def hdf5_not_uvh5(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    f.unlink()
    with h5py.File(f, "w") as fh:
        fh["something"] = np.arange(10)
    return f.name


def no_time_array(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    with h5py.File(f, "r+") as fh:
        del fh["Header/time_array"]
    return f.name


def empty_time_array(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    with h5py.File(f, "r+") as fh:
        del fh["Header/time_array"]
        fh["Header"].create_dataset("time_array", shape=(0,), dtype="f8")
    return f.name


def nan_times(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    with h5py.File(f, "r+") as fh:
        t = fh["Header/time_array"][()]
        t[::7] = np.nan
        fh["Header/time_array"][...] = t
    return f.name


def ntimes_disagrees(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    with h5py.File(f, "r+") as fh:
        fh["Header/Ntimes"][()] = 23
    return f.name


def duplicate_under_another_timestamp(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    stamp = f.name[:19]
    later = stamp[:-2] + f"{(int(stamp[-2:]) + 7) % 60:02d}"
    dup = incoming / f"{later}_sb03.hdf5"
    shutil.copy2(f, dup)
    os.utime(dup, (f.stat().st_atime + 5, f.stat().st_mtime + 5))
    return dup.name


def symlink_out_of_incoming(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    outside = incoming.parent / "elsewhere" / f.name
    outside.parent.mkdir(exist_ok=True)
    shutil.move(f, outside)
    f.symlink_to(outside)
    return f.name


def directory_named_like_a_file(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    f.unlink()
    f.mkdir()
    return f.name


def subband_out_of_range(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    bad = f.with_name(f.name.replace("_sb03", "_sb16"))
    shutil.copy2(f, bad)
    return bad.name


def future_timestamp(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    bad = incoming / "2099-01-01T00:00:00_sb03.hdf5"
    shutil.copy2(f, bad)
    return bad.name


def ancient_timestamp(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 3)
    bad = incoming / "1999-01-01T00:00:00_sb03.hdf5"
    shutil.copy2(f, bad)
    return bad.name


def missing_subband(incoming: Path, files: list[Path]) -> str:
    f = _sb(files, 7)
    f.unlink()
    return "sb07"


INGEST_CASES = [
    Case("truncated", "ingest", "truncated_hdf5", truncated),
    Case("zero_bytes", "ingest", "not_hdf5", zero_bytes),
    Case("random_bytes", "ingest", "not_hdf5", random_bytes),
    Case("hdf5_not_uvh5", "ingest", "not_uvh5", hdf5_not_uvh5),
    Case("no_time_array", "ingest", "not_uvh5", no_time_array),
    Case("empty_time_array", "ingest", "empty_time_array", empty_time_array),
    Case("nan_times", "ingest", "bad_time_axis", nan_times),
    Case("ntimes_disagrees", "ingest", "bad_time_axis", ntimes_disagrees),
    Case(
        "duplicate_under_another_timestamp",
        "ingest",
        "duplicate_subband",
        duplicate_under_another_timestamp,
    ),
    Case("symlink_out_of_incoming", "ingest", "symlink_escape", symlink_out_of_incoming),
    Case("directory_named_like_a_file", "ingest", "not_a_file", directory_named_like_a_file),
    Case("subband_out_of_range", "ingest", "bad_subband_index", subband_out_of_range),
    Case("future_timestamp", "ingest", "implausible_timestamp", future_timestamp),
    Case("ancient_timestamp", "ingest", "implausible_timestamp", ancient_timestamp),
    Case("missing_subband", "ingest", "incomplete_group", missing_subband),
]


@pytest.mark.parametrize("case", INGEST_CASES, ids=lambda c: c.name)
def test_ingest_level_bad_input(
    case: Case, cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    files = night.copy_group(2, cfg.incoming_dir)
    named = case.damage(cfg.incoming_dir, files)  # type: ignore[misc]
    raw = (cfg.incoming_dir, cfg.incoming_dir.parent / "elsewhere")
    before = [_checksums(d) for d in raw]
    ingestor = Ingestor(cfg, sqlite_db, clock=clock, sleep=clock.sleep)
    ingestor.run_once()
    clock.advance(cfg.ingest.group_deadline_s + 1)
    ingestor.run_once()
    assert [_checksums(d) for d in raw] == before, "a raw file was modified"
    with sqlite_db.transaction() as s:
        rejected = {
            os.path.basename(r.path): r for r in s.scalars(select(SubbandFile)) if r.reason_code
        }
        groups = list(s.scalars(select(Group)))
    if case.code in ("incomplete_group", "bad_subband_files"):
        (group,) = groups
        assert (group.state, group.error_code) == ("quarantined", case.code)
        assert named in group.state_reason
        return
    if case.code == "duplicate_subband":
        # Two files claim sb03: the first one ready is kept, the other rejected, and the
        # reason names both.
        (row,) = rejected.values()
        assert row.reason_code == case.code and row.reason.count("_sb03.hdf5") == 2
        assert named in row.reason
        return
    assert named in rejected, f"{named} not rejected; rows: {list(rejected)}"
    row = rejected[named]
    assert row.reason_code == case.code and named in row.reason
    # The group of the good files ends with a reason naming the bad file (or completes
    # when the bad file was an extra one).
    main = [g for g in groups if g.group_id == night.group_ids[2]]
    if main and main[0].state == "quarantined":
        assert named in main[0].state_reason or "sb03" in main[0].state_reason


def test_a_file_that_vanishes_between_scan_and_read_is_retryable(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight, monkeypatch
) -> None:  # noqa: ANN001
    import supervisor.ingest as ingest

    files = night.copy_group(2, cfg.incoming_dir)
    victim = _sb(files, 5)
    real = ingest.inspect_uvh5

    def vanish_first(path: str) -> Any:
        if path == str(victim) and victim.exists():
            victim.unlink()
        return real(path)

    monkeypatch.setattr(ingest, "inspect_uvh5", vanish_first)
    Ingestor(cfg, sqlite_db, clock=clock, sleep=clock.sleep).run_once()
    with sqlite_db.transaction() as s:
        row = s.scalars(select(SubbandFile).where(SubbandFile.path == str(victim))).one()
    assert (row.reason_category, row.reason_code) == ("retryable", "vanished")
    assert victim.name in row.reason


def test_an_unreadable_file_is_retryable_and_named(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight, monkeypatch
) -> None:  # noqa: ANN001
    """Permissions (the root-written files of failure mode 8); as root nothing is
    unreadable, so the denial is injected at the open."""
    files = night.copy_group(2, cfg.incoming_dir)
    victim = _sb(files, 6)
    real_file = h5py.File

    def deny(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) == str(victim):
            raise PermissionError(13, "Permission denied", str(path))
        return real_file(path, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", deny)
    Ingestor(cfg, sqlite_db, clock=clock, sleep=clock.sleep).run_once()
    with sqlite_db.transaction() as s:
        row = s.scalars(select(SubbandFile).where(SubbandFile.path == str(victim))).one()
    assert (row.reason_category, row.reason_code) == ("retryable", "unreadable")
    assert victim.name in row.reason


def test_names_with_spaces_or_partial_suffixes_are_ignored_and_counted(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    files = night.copy_group(2, cfg.incoming_dir)
    f = _sb(files, 3)
    for odd in (f.name.replace("_sb03", " _sb03"), f.name + ".part", f"..{f.name}"):
        shutil.copy2(f, cfg.incoming_dir / odd)
    report = Ingestor(cfg, sqlite_db, clock=clock, sleep=clock.sleep).run_once()
    assert report.ignored_names >= 3 and report.ready == 16 and not report.rejected


# Preflight-level damage (real workers) -----------------------------------------------------
def _edit(path: Path, fn: Callable[[h5py.File], None]) -> None:
    with h5py.File(path, "r+") as fh:
        fn(fh)


def declination_mismatch(files: list[Path]) -> str:
    f = _sb(files, 4)
    _edit(
        f,
        lambda fh: fh["Header/extra_keywords/phase_center_dec"].write_direct(
            np.array(fh["Header/extra_keywords/phase_center_dec"][()] + 0.01)
        ),
    )
    return f.name


def frequency_order_swapped(files: list[Path]) -> str:
    a, b = _sb(files, 3), _sb(files, 4)
    with h5py.File(a, "r") as fa:
        fa_freq = fa["Header/freq_array"][()]
    with h5py.File(b, "r+") as fb:
        fb["Header/freq_array"][...] = fa_freq
    return b.name


def times_disagree(files: list[Path]) -> str:
    f = _sb(files, 9)
    _edit(
        f,
        lambda fh: fh["Header/time_array"].write_direct(fh["Header/time_array"][()] + 2.0 / 86400),
    )
    return f.name


def missing_required_header(files: list[Path]) -> str:
    f = _sb(files, 2)
    _edit(f, lambda fh: fh["Header/extra_keywords"].__delitem__("phase_center_dec"))
    return f.name


def nan_frequencies(files: list[Path]) -> str:
    f = _sb(files, 6)
    _edit(
        f,
        lambda fh: fh["Header/freq_array"].write_direct(
            np.full(fh["Header/freq_array"].shape, np.nan)
        ),
    )
    return f.name


def wrong_shapes(files: list[Path]) -> str:
    """One subband written by a correlator that lost an antenna: fewer baselines."""
    from pyuvdata import UVData

    f = _sb(files, 11)
    uvd = UVData()
    uvd.read(str(f), file_type="uvh5")
    keep = [a for a in np.unique(uvd.ant_1_array)][:-1]
    uvd.select(antenna_nums=keep)
    f.unlink()
    uvd.write_uvh5(str(f))
    return f.name


def _vis_edit(sb: int, how: str) -> Callable[[list[Path]], str]:
    def damage(files: list[Path]) -> str:
        f = _sb(files, sb)
        with h5py.File(f, "r+") as fh:
            if how == "uvw":
                uvw = fh["Header/uvw_array"][()]
                uvw[::5] = np.inf
                fh["Header/uvw_array"][...] = uvw
            else:
                vis = fh["Data/visdata"][()]
                if how == "nan_all":
                    vis[...] = np.nan
                else:
                    vis[::17] = np.inf
                fh["Data/visdata"][...] = vis
        return f.name

    return damage


def old_header_shapes(files: list[Path]) -> str:
    """Every file written the pyuvdata < 3 way (spectral-window axis, 2-D frequencies)."""
    from supervisor.simulate import to_old_uvh5_shapes

    for f in files:
        to_old_uvh5_shapes(f)
    return files[0].name


def one_subband_flagged(files: list[Path]) -> str:
    f = _sb(files, 12)
    _edit(f, lambda fh: fh["Data/flags"].write_direct(np.ones(fh["Data/flags"].shape, bool)))
    return f.name


PREFLIGHT_CASES = [
    Case("declination_mismatch", "preflight", "inconsistent_subbands", None),
    Case("frequency_order_swapped", "preflight", "inconsistent_subbands", None),
    Case("times_disagree_between_subbands", "preflight", "inconsistent_subbands", None),
    Case("missing_required_header_field", "preflight", "inconsistent_subbands", None),
    Case("nan_frequencies", "preflight", "inconsistent_subbands", None),
    Case("wrong_shapes", "preflight", "inconsistent_subbands", None),
    Case("nan_visibilities_one_subband", "preflight", "dropped_subband", None),
    Case("inf_uvw_one_subband", "preflight", "dropped_subband", None),
    Case("inf_in_some_visibilities", "preflight", "flagged_nonfinite", None),
    Case("one_subband_all_flagged", "preflight", "goes_on", None),
    Case("old_uvh5_header_shapes", "preflight", "goes_on", None),
]
DAMAGE = {
    "declination_mismatch": declination_mismatch,
    "frequency_order_swapped": frequency_order_swapped,
    "times_disagree_between_subbands": times_disagree,
    "missing_required_header_field": missing_required_header,
    "nan_frequencies": nan_frequencies,
    "wrong_shapes": wrong_shapes,
    "nan_visibilities_one_subband": _vis_edit(8, "nan_all"),
    "inf_uvw_one_subband": _vis_edit(10, "uvw"),
    "inf_in_some_visibilities": _vis_edit(13, "inf_some"),
    "one_subband_all_flagged": one_subband_flagged,
    "old_uvh5_header_shapes": old_header_shapes,
}


@dataclass
class PreflightNight:
    db: Database
    by_case: dict[str, tuple[str, str]]  # case -> (group id, named file)
    undisturbed: str


@pytest.fixture(scope="module")
def preflight_night(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import random as _random

    from supervisor import migrate
    from supervisor.daemon import Daemon
    from supervisor.simulate import SimulationSpec, simulate

    ws = tmp_path_factory.mktemp("bad-inputs") / "ws"
    incoming = ws / "incoming"
    incoming.mkdir(parents=True)
    n = len(PREFLIGHT_CASES) + 1
    truths = simulate(
        incoming,
        SimulationSpec(
            n_groups=n,
            n_antennas=5,
            n_channels_per_subband=1,
            n_field_sources=0,
            seed=31,
            calibrator="3C48",
        ),
    )
    shutil.rmtree(incoming / "truth")
    by_case = {}
    for truth, case in zip(truths[1:], PREFLIGHT_CASES, strict=True):
        files = [incoming / name for name in truth.files]
        by_case[case.name] = (truth.group_id, DAMAGE[case.name](files))
    before = _checksums(incoming)
    real = {"tiers": [{"name": "primary", "params": {}}], "timeout_s": 300.0}
    cfg = fake_pipeline_config(
        ws,
        settings={"ingest": {"stability_interval_s": 0.2}},
        preflight={**real, "module": "stages.preflight"},
        convert={**real, "module": "stages.convert"},
    )
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    Daemon(cfg, db, rng=_random.Random(0)).run(until_idle=True)
    assert _checksums(incoming) == before, "a raw file was modified"
    yield PreflightNight(db, by_case, truths[0].group_id)
    db.dispose()


def _committed(db: Database, gid: str, stage: str) -> dict | None:
    with db.transaction() as s:
        a = s.scalars(
            select(StageAttempt).where(
                StageAttempt.group_id == gid,
                StageAttempt.stage == stage,
                StageAttempt.outcome == "succeeded",
            )
        ).first()
        return a.result["metrics"] if a else None


@pytest.mark.casa
@pytest.mark.parametrize("case", PREFLIGHT_CASES, ids=lambda c: c.name)
def test_preflight_level_bad_input(case: Case, preflight_night: PreflightNight) -> None:
    gid, named = preflight_night.by_case[case.name]
    with preflight_night.db.transaction() as s:
        g = s.get(Group, gid)
        state, code, reason = g.state, g.error_code, g.state_reason or ""
    pre = _committed(preflight_night.db, gid, "preflight")
    if case.code == "inconsistent_subbands":
        assert (state, code) == ("quarantined", "inconsistent_subbands")
        assert named in reason, reason
    elif case.code == "dropped_subband":
        assert pre is not None and state == "completed", (state, reason)
        (dropped,) = pre["dropped_subbands"].values()
        assert named in dropped["reason"]
        assert _committed(preflight_night.db, gid, "convert")["subbands_used"] == 15
    elif case.code == "flagged_nonfinite":
        assert pre is not None and state == "completed"
        (flagged,) = pre["nonfinite_to_flag"].values()
        assert flagged["file"].endswith(named)
        assert _committed(preflight_night.db, gid, "convert")["nonfinite_flagged"] > 0
    elif case.name == "old_uvh5_header_shapes":
        assert state == "completed", (state, reason)
        assert _committed(preflight_night.db, gid, "convert")["subbands_used"] == 16
    else:  # one subband flagged: the band goes on, the gate sees the fraction
        assert state == "completed"
        assert _committed(preflight_night.db, gid, "convert")["flagged_fraction"] >= 1 / 16 - 0.01


@pytest.mark.casa
def test_the_undamaged_group_of_that_night_is_not_disturbed(
    preflight_night: PreflightNight,
) -> None:
    with preflight_night.db.transaction() as s:
        assert s.get(Group, preflight_night.undisturbed).state == "completed"


def test_a_config_with_wrong_types_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nmax_parallel = "two"\n[ingest]\npoll_interval_s = true\n')
    done = subprocess.run(
        [str(Path(sys.executable).parent / "contimg-supervisor"), "config", "check", str(bad)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")},
    )
    assert done.returncode == 2
    assert "daemon.max_parallel = 'two': must be a whole number" in done.stderr
    assert "ingest.poll_interval_s = True: must be a number, not a boolean" in done.stderr


def _write_gain_table(path: Path) -> None:
    """A calibration table shaped like a bandpass (96 rows x 48 channels x 2 pols)."""
    from casacore.tables import makearrcoldesc, makescacoldesc, maketabdesc, table

    desc = maketabdesc(
        [
            makescacoldesc("ANTENNA1", 0),
            makearrcoldesc("CPARAM", 0j, ndim=2, shape=[48, 2]),
            makearrcoldesc("FLAG", False, ndim=2, shape=[48, 2]),
        ]
    )
    with table(str(path), desc, nrow=96, ack=False) as t:
        t.putcol("CPARAM", np.ones((96, 48, 2), complex))


@pytest.mark.parametrize("damaged_file", ["table.dat", "table.f0i"])
def test_a_corrupt_calibration_table_is_named_before_it_is_applied(
    tmp_path: Path, damaged_file: str
) -> None:
    """applycal on a damaged table fails like a corrupt MS (fatal for the group); the check
    before applying blames the table instead (recoverable: the set is invalidated and the
    next one tried, tests/test_calibration_chain.py)."""
    from stages.calibrate import check_registered_table
    from stages.protocol import StageFailure

    table_path = tmp_path / "G0.B"
    _write_gain_table(table_path)
    check_registered_table(table_path)  # whole: no complaint
    victim = table_path / damaged_file
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(StageFailure) as caught:
        check_registered_table(table_path)
    assert (caught.value.category, caught.value.code) == ("recoverable", "caltable_corrupt")
    assert str(table_path) in str(caught.value) and "readBlock" in str(caught.value)
    shutil.rmtree(table_path)
    with pytest.raises(StageFailure) as caught:
        check_registered_table(table_path)
    assert caught.value.code == "caltable_missing"


CATALOGUE = [
    *INGEST_CASES,
    Case("vanishes_between_scan_and_read", "ingest", "vanished"),
    Case("unreadable_permissions", "ingest", "unreadable"),
    Case("names_with_spaces_or_suffixes", "ingest", "ignored_name"),
    *PREFLIGHT_CASES,
    Case("config_with_wrong_types", "config", "config_error"),
    Case("corrupt_calibration_table", "calibrate", "caltable_corrupt"),
    # Covered where the pipeline runs for real (tests/test_e2e_casa.py):
    Case("all_flagged_group", "convert", "convert_gate_failed"),
    Case("corrupt_ms_mid_pipeline", "calibrate", "corrupt_table"),
]
