"""Ingest and grouping: readiness, jitter, late files, duplicates, deadlines, order, bad input."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import h5py
import pytest
from sqlalchemy import func, select

from supervisor.config import Config
from supervisor.db import Database
from supervisor.ingest import FileStatus, Ingestor, parse_name
from supervisor.models import Group, SubbandFile, Transition
from supervisor.states import State
from tests.conftest import FakeClock, SimulatedNight


def make_ingestor(cfg: Config, db: Database, clock: FakeClock) -> Ingestor:
    return Ingestor(cfg, db, clock=clock, sleep=clock.sleep)


def groups(db: Database) -> dict[str, Group]:
    with db.transaction() as s:
        return {g.group_id: g for g in s.scalars(select(Group))}


def file_rows(db: Database) -> dict[str, SubbandFile]:
    with db.transaction() as s:
        return {os.path.basename(f.path): f for f in s.scalars(select(SubbandFile))}


def snapshot(db: Database) -> tuple:
    with db.transaction() as s:
        return (
            sorted(
                (g.group_id, g.state, g.stage, g.state_reason) for g in s.scalars(select(Group))
            ),
            sorted((f.path, f.status, f.reason_code) for f in s.scalars(select(SubbandFile))),
            s.scalar(select(func.count()).select_from(Transition)),
        )


def tree_fingerprint(directory: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            out[p.name] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[p.name] = (0, 0, "link" if p.is_symlink() else "dir")
    return out


def test_parse_name() -> None:
    when, sb = parse_name("2025-10-05T12:30:00_sb03.hdf5")  # type: ignore[misc]
    assert (when.isoformat(), sb) == ("2025-10-05T12:30:00+00:00", 3)
    for bad in (
        "2025-10-05T12:30:00_sb3.hdf5",
        "2025-13-05T12:30:00_sb03.hdf5",
        ".fuse_hidden000001",
        "2025-10-05T12:30:00_sb03.h5",
        "truth",
    ):
        assert parse_name(bad) is None


def test_complete_group_becomes_pending_and_calibrator_is_recognised(
    cfg: Config, db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    night.copy_group(0, cfg.incoming_dir)
    night.copy_group(2, cfg.incoming_dir)
    report = make_ingestor(cfg, db, clock).run_once()
    assert report.ready == 32 and not report.rejected
    got = groups(db)
    cal_group, target = got[night.group_ids[0]], got[night.group_ids[2]]
    assert cal_group.state == target.state == State.PENDING
    assert cal_group.stage == target.stage == "preflight"
    assert cal_group.is_calibrator and cal_group.calibrator_name == "3C48"
    assert not target.is_calibrator and target.calibrator_name is None
    assert cal_group.priority < target.priority
    assert cal_group.pointing_dec_deg == pytest.approx(33.159759, abs=1e-6)


def test_group_is_keyed_on_its_earliest_timestamp_despite_jitter(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    files = night.copy_group(1, cfg.incoming_dir)
    stamps = sorted(f.name[:19] for f in files)
    assert stamps[0] != stamps[-1], "the simulator should jitter name timestamps"
    make_ingestor(cfg, sqlite_db, clock).run_once()
    assert list(groups(sqlite_db)) == [stamps[0]]
    assert night.group_ids[1] == stamps[0]


def test_ingest_is_idempotent(
    cfg: Config, db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    night.copy_group(0, cfg.incoming_dir, skip={5})
    (cfg.incoming_dir / "2025-10-06T08:27:00_sb05.hdf5").write_bytes(b"not hdf5 at all")
    ingestor = make_ingestor(cfg, db, clock)
    ingestor.run_once()
    before = snapshot(db)
    clock.advance(5)
    again = ingestor.run_once()
    assert snapshot(db) == before
    assert again.new_files == again.ready == 0 and not again.rejected


def test_raw_files_are_never_modified_moved_or_deleted(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight, tmp_path: Path
) -> None:
    night.copy_group(0, cfg.incoming_dir)
    night.copy_group(1, cfg.incoming_dir, skip={2})
    (cfg.incoming_dir / "notes.txt").write_text("operator notes")
    outside = tmp_path / "elsewhere.hdf5"
    outside.write_bytes(b"x")
    (cfg.incoming_dir / "2025-10-06T08:32:30_sb02.hdf5").symlink_to(outside)
    before = tree_fingerprint(cfg.incoming_dir)
    ingestor = make_ingestor(cfg, sqlite_db, clock)
    ingestor.run_once()
    clock.advance(cfg.ingest.group_deadline_s + 1)
    ingestor.run_once()
    assert tree_fingerprint(cfg.incoming_dir) == before
    assert outside.read_bytes() == b"x"


def test_late_subband_completes_the_group(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    ingestor = make_ingestor(cfg, sqlite_db, clock)
    night.copy_group(1, cfg.incoming_dir, skip={7, 11})
    ingestor.run_once()
    (group,) = groups(sqlite_db).values()
    assert group.state == State.COLLECTING
    clock.advance(120)
    for f in night.files_by_group[night.group_ids[1]]:
        if f.name.endswith(("_sb07.hdf5", "_sb11.hdf5")):
            shutil.copy2(f, cfg.incoming_dir / f.name)
    report = ingestor.run_once()
    assert report.groups_pending == [night.group_ids[1]]
    assert groups(sqlite_db)[night.group_ids[1]].state == State.PENDING


def test_incomplete_group_is_quarantined_at_the_deadline_naming_missing_subbands(
    cfg: Config, db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    ingestor = make_ingestor(cfg, db, clock)
    night.copy_group(2, cfg.incoming_dir, skip={3, 12})
    ingestor.run_once()
    clock.advance(cfg.ingest.group_deadline_s - 10)
    ingestor.run_once()
    (group,) = groups(db).values()  # keyed on its earliest file present (sb03 may be absent)
    assert group.state == State.COLLECTING
    clock.advance(20)
    report = ingestor.run_once()
    (group,) = groups(db).values()
    assert group.state == State.QUARANTINED
    assert group.error_category == "validation" and group.error_code == "incomplete_group"
    assert "sb03" in group.state_reason and "sb12" in group.state_reason
    assert "deadline" in group.state_reason
    assert report.groups_quarantined[0]["group_id"] == group.group_id


def test_duplicate_subband_is_rejected_and_the_first_file_kept(
    cfg: Config, db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    files = night.copy_group(0, cfg.incoming_dir)
    original = next(f for f in files if f.name.endswith("_sb03.hdf5"))
    stamp = parse_name(original.name)[0]  # type: ignore[index]
    dup_name = (stamp.replace(second=(stamp.second + 2) % 60)).strftime(
        "%Y-%m-%dT%H:%M:%S_sb03.hdf5"
    )
    shutil.copy2(original, cfg.incoming_dir / dup_name)
    report = make_ingestor(cfg, db, clock).run_once()
    rows = file_rows(db)
    assert rows[original.name].status == FileStatus.READY
    assert rows[dup_name].status == FileStatus.REJECTED
    assert rows[dup_name].reason_code == "duplicate_subband"
    assert original.name in rows[dup_name].reason
    assert [r["code"] for r in report.rejected] == ["duplicate_subband"]
    assert groups(db)[night.group_ids[0]].state == State.PENDING


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("truncate", "truncated_hdf5"),
        ("garbage", "not_hdf5"),
        ("empty", "not_hdf5"),
        ("hdf5_not_uvh5", "not_uvh5"),
        ("empty_time_array", "empty_time_array"),
    ],
)
def test_bad_subband_file_is_rejected_with_a_classified_reason(
    damage: str,
    code: str,
    cfg: Config,
    sqlite_db: Database,
    clock: FakeClock,
    night: SimulatedNight,
) -> None:
    files = night.copy_group(1, cfg.incoming_dir)
    victim = next(f for f in files if f.name.endswith("_sb04.hdf5"))
    if damage == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    elif damage == "garbage":
        victim.write_bytes(os.urandom(5000))
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "hdf5_not_uvh5":
        victim.unlink()
        with h5py.File(victim, "w") as fh:
            fh.create_dataset("something", data=[1, 2, 3])
    elif damage == "empty_time_array":
        victim.unlink()
        with h5py.File(victim, "w") as fh:
            fh.create_group("Header").create_dataset("time_array", shape=(0,), dtype="f8")
    report = make_ingestor(cfg, sqlite_db, clock).run_once()
    (rejected,) = report.rejected
    assert rejected["category"] == "validation"
    assert rejected["code"] == code
    assert victim.name in rejected["message"]
    assert rejected["hint"]
    # Every other subband is accounted for, so the group ends at once with a clear reason.
    group = groups(sqlite_db)[night.group_ids[1]]
    assert group.state == State.QUARANTINED
    assert group.error_code == "bad_subband_files"
    assert f"sb04 ({code}" in group.state_reason


def test_symlink_leaving_incoming_is_rejected_but_one_inside_is_followed(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight, tmp_path: Path
) -> None:
    files = night.copy_group(0, cfg.incoming_dir, skip={9})
    sb9 = next(f for f in night.files_by_group[night.group_ids[0]] if "_sb09" in f.name)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(sb9, outside / sb9.name)
    (cfg.incoming_dir / sb9.name).symlink_to(outside / sb9.name)
    report = make_ingestor(cfg, sqlite_db, clock).run_once()
    (rejected,) = report.rejected
    assert rejected["code"] == "symlink_escape" and str(outside) in rejected["message"]

    # A link that stays inside incoming is an ordinary file.
    (cfg.incoming_dir / sb9.name).unlink()
    hidden = cfg.incoming_dir / "store"
    hidden.mkdir()
    shutil.copy2(sb9, hidden / sb9.name)
    (cfg.incoming_dir / sb9.name).symlink_to(hidden / sb9.name)
    clock.advance(2)
    make_ingestor(cfg, sqlite_db, clock).run_once()
    assert file_rows(sqlite_db)[sb9.name].status == FileStatus.READY
    assert len(files) == 15


def test_unreadable_file_is_retried_until_it_becomes_readable(
    cfg: Config,
    sqlite_db: Database,
    clock: FakeClock,
    night: SimulatedNight,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Root reads everything, so the permission error is injected at the h5py boundary.
    files = night.copy_group(2, cfg.incoming_dir)
    victim = str(next(f for f in files if f.name.endswith("_sb06.hdf5")))
    real_file = h5py.File

    def guarded(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(path) == victim:
            raise PermissionError(13, "Permission denied", victim)
        return real_file(path, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", guarded)
    ingestor = make_ingestor(cfg, sqlite_db, clock)
    report = ingestor.run_once()
    (rejected,) = report.rejected
    assert (rejected["category"], rejected["code"]) == ("retryable", "unreadable")
    (group,) = groups(sqlite_db).values()
    assert group.state == State.COLLECTING
    monkeypatch.setattr(h5py, "File", real_file)
    clock.advance(30)
    ingestor.run_once()
    (group,) = groups(sqlite_db).values()
    assert group.state == State.PENDING


def test_growing_file_is_not_ready_until_its_size_holds(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    files = night.copy_group(0, cfg.incoming_dir)
    victim = next(f for f in files if f.name.endswith("_sb10.hdf5"))
    content = victim.read_bytes()
    victim.write_bytes(content[: len(content) // 3])  # the writer is still going
    ingestor = make_ingestor(cfg, sqlite_db, clock)
    ingestor.scan()
    clock.advance(0.5)
    victim.write_bytes(content[: 2 * len(content) // 3])
    ingestor.scan()
    assert file_rows(sqlite_db)[victim.name].status == FileStatus.SETTLING
    victim.write_bytes(content)
    clock.advance(0.5)
    ingestor.scan()
    assert file_rows(sqlite_db)[victim.name].status == FileStatus.SETTLING
    clock.advance(cfg.ingest.stability_interval_s)
    ingestor.scan()
    assert file_rows(sqlite_db)[victim.name].status == FileStatus.READY
    assert groups(sqlite_db)[night.group_ids[0]].state == State.PENDING


def test_a_rejected_file_that_is_rewritten_is_examined_again(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    files = night.copy_group(2, cfg.incoming_dir, skip={1})
    sb1 = next(f for f in night.files_by_group[night.group_ids[2]] if "_sb01" in f.name)
    target = cfg.incoming_dir / sb1.name
    target.write_bytes(sb1.read_bytes()[:1000])  # a stalled writer: truncated but stable
    ingestor = make_ingestor(cfg, sqlite_db, clock)
    ingestor.scan()
    clock.advance(2)
    ingestor.scan()
    assert file_rows(sqlite_db)[sb1.name].reason_code == "truncated_hdf5"
    assert len(files) == 15
    shutil.copy2(sb1, target)  # the writer finished after all
    clock.advance(2)
    ingestor.run_once()
    assert file_rows(sqlite_db)[sb1.name].status == FileStatus.READY


def test_groups_become_pending_in_observation_order_not_arrival_order(
    cfg: Config, db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    # The later group's files arrive first (copied first, older mtimes).
    night.copy_group(2, cfg.incoming_dir)
    night.copy_group(1, cfg.incoming_dir)
    make_ingestor(cfg, db, clock).run_once()
    with db.transaction() as s:
        order = s.scalars(
            select(Transition.group_id)
            .where(Transition.to_state == State.PENDING.value)
            .order_by(Transition.id)
        ).all()
    assert order == [night.group_ids[1], night.group_ids[2]]


def test_ignored_names_are_counted_but_not_recorded(
    cfg: Config, sqlite_db: Database, clock: FakeClock
) -> None:
    for name in (".fuse_hidden0000001", "README", "2025-10-05T12:30:00_sb03.h5", "x_sb01.hdf5"):
        (cfg.incoming_dir / name).write_bytes(b"")
    report = make_ingestor(cfg, sqlite_db, clock).run_once()
    assert report.ignored_names == 4 and report.files_seen == 0
    assert file_rows(sqlite_db) == {}


def test_subband_index_beyond_the_group_size_is_rejected(
    cfg: Config, sqlite_db: Database, clock: FakeClock
) -> None:
    (cfg.incoming_dir / "2025-10-05T12:30:00_sb16.hdf5").write_bytes(b"")
    report = make_ingestor(cfg, sqlite_db, clock).run_once()
    assert [r["code"] for r in report.rejected] == ["bad_subband_index"]


def test_integrations_are_counted_not_baseline_times(
    cfg: Config, sqlite_db: Database, clock: FakeClock, night: SimulatedNight
) -> None:
    """``Header/time_array`` has Nblts entries; a group lasts its integrations (24 x 12.885
    s), not Nblts of them (which made every group a calibrator group at full size)."""
    from supervisor.simulate import INTEGRATION_S

    files = night.copy_group(2, cfg.incoming_dir)
    with h5py.File(files[0], "r") as fh:
        nblts = fh["Header/time_array"].shape[0]
    assert nblts > 24
    make_ingestor(cfg, sqlite_db, clock).run_once()
    rows = file_rows(sqlite_db)
    assert {r.n_integrations for r in rows.values()} == {24}
    for r in rows.values():
        assert r.time_span_s == pytest.approx(24 * INTEGRATION_S, abs=0.01)
    (group,) = groups(sqlite_db).values()
    assert group.obs_duration_s == pytest.approx(24 * INTEGRATION_S, abs=0.01)


def test_target_before_the_transit_is_not_a_calibrator_group(
    cfg: Config, sqlite_db: Database, clock: FakeClock, tmp_path: Path
) -> None:
    """3C48 transits in the second of three groups: only that group solves, and the choice
    is recorded with the hour angles and beam gains that were weighed."""
    from supervisor.simulate import SimulationSpec, simulate

    truths = simulate(
        cfg.incoming_dir,
        SimulationSpec(
            n_groups=3,
            calibrator="3C48",
            calibrator_group=1,
            n_antennas=4,
            n_channels_per_subband=1,
            n_field_sources=0,
            seed=3,
        ),
    )
    shutil.rmtree(cfg.incoming_dir / "truth", ignore_errors=True)
    make_ingestor(cfg, sqlite_db, clock).run_once()
    got = groups(sqlite_db)
    before, transit, after = (got[t.group_id] for t in truths)
    assert [g.state for g in (before, transit, after)] == [State.PENDING] * 3
    assert (before.is_calibrator, transit.is_calibrator, after.is_calibrator) == (
        False,
        True,
        False,
    )
    assert transit.calibrator_name == "3C48" and transit.priority < before.priority
    (seen,) = [c for c in transit.calibrator_choice["candidates"] if c["name"] == "3C48"]
    assert seen["transits"] and seen["hour_angle_start_deg"] < 0 < seen["hour_angle_end_deg"]
    assert seen["pb_gain"] > 0.99
    assert transit.calibrator_choice["chosen"] == "3C48"
    (early,) = [c for c in before.calibrator_choice["candidates"] if c["name"] == "3C48"]
    assert not early["transits"] and early["hour_angle_end_deg"] < 0
    assert before.calibrator_choice["chosen"] is None
