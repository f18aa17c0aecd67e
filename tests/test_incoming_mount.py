"""A failing incoming mount is an outage, not bad data: the daemon waits for it (intake from
it paused, health unhealthy naming the directory), nothing is quarantined for it, and the
night completes once it is back; storage I/O errors on raw files are retryable."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stages.common import storage_failed
from supervisor import health, incoming, migrate
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.ingest import inspect_uvh5
from supervisor.models import Group, Transition
from supervisor.policy import Classifier, Evidence
from tests.conftest import add_pending_group, fake_pipeline_config

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
GROUPS = ("2025-10-05T12:30:00", "2025-10-05T12:35:09")


def test_the_incoming_directory_renamed_away_and_back_pauses_intake_and_loses_nothing(
    workspace: Path,
) -> None:
    cfg = fake_pipeline_config(
        workspace, settings={"ingest": {"poll_interval_s": 0.2}, "daemon": {"stall_exit_s": 600}}
    )
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    for gid in GROUPS:
        add_pending_group(db, gid)
    away = workspace / "incoming.away"
    cfg.incoming_dir.rename(away)  # the FUSE mount dropped out
    daemon = Daemon(cfg, db, rng=random.Random(0))
    thread = threading.Thread(target=daemon.run, kwargs={"until_idle": True})
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while "preflight" not in daemon.admission.paused() and time.monotonic() < deadline:
            time.sleep(0.05)
        paused = daemon.admission.paused()
        assert any(r.startswith("incoming: ") for r in paused["preflight"]), paused
        report = daemon.health_report()
        checks = {c["name"]: c for c in report["checks"]}
        assert report["status"] == "unhealthy"
        assert str(cfg.incoming_dir) in checks["incoming"]["detail"]
        with db.read() as s:
            assert {s.get(Group, g).state for g in GROUPS} == {"pending"}
    finally:
        away.rename(cfg.incoming_dir)  # the mount is back
    thread.join(timeout=60)
    assert not thread.is_alive()
    with db.read() as s:
        assert {s.get(Group, g).state for g in GROUPS} == {"completed"}
        assert not s.query(Transition).filter(Transition.to_state == "quarantined").all()
    assert daemon.admission.paused() == {}


def test_health_names_a_missing_or_unmounted_incoming_directory(workspace: Path) -> None:
    cfg = fake_pipeline_config(workspace)
    assert incoming.look(cfg).ok
    mounted = fake_pipeline_config(workspace, settings={"ingest": {"incoming_is_mount": True}})
    state = incoming.look(mounted)
    assert not state.ok and "is not a mount point" in state.detail
    cfg.incoming_dir.rename(workspace / "gone")
    check = health._incoming(cfg)
    assert check.status == "unhealthy" and "does not exist" in check.detail
    assert str(cfg.incoming_dir) in check.detail


def test_run_waits_for_an_absent_incoming_directory_instead_of_exiting(workspace: Path) -> None:
    cfg = fake_pipeline_config(workspace, settings={"daemon": {"stall_exit_s": 2}})
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    add_pending_group(db, GROUPS[0])
    db.dispose()
    cfg.incoming_dir.rename(workspace / "away")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    out = subprocess.run(
        [SCRIPT, "--workspace", cfg.workspace, "--config", f"{cfg.workspace}/fake.toml"]
        + ["run", "--until-idle", "--listen", ""],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # Started, waited (the stage that reads raw files paused), and, as a batch run, said so.
    assert out.returncode == 1, out.stderr
    assert '"event": "daemon.ready"' in out.stdout
    assert "incoming: incoming directory" in out.stderr and "does not exist" in out.stderr
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    with db.read() as s:
        assert s.get(Group, GROUPS[0]).state == "pending"


def test_a_look_at_a_hung_mount_times_out(workspace: Path, monkeypatch) -> None:  # noqa: ANN001
    cfg = fake_pipeline_config(workspace)
    release = threading.Event()

    def hanging_stat(path: object, *a: object, **k: object) -> os.stat_result:
        release.wait(30)  # a stat on a dead FUSE mount
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

    monkeypatch.setattr(incoming.os, "stat", hanging_stat)
    t0 = time.monotonic()
    state = incoming.look(cfg, timeout_s=0.3)
    release.set()
    assert time.monotonic() - t0 < 5
    assert not state.ok and "did not answer within 0.3 s" in state.detail


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.ESTALE, "Stale file handle"),
        OSError(
            "Unable to synchronously open file (file read failed: time = Mon Dec  7, "
            "filename = 'x.hdf5', file descriptor = 5, errno = 107, error message = "
            "'Transport endpoint is not connected', buf = 0x1, total read size = 8, "
            "bytes this sub-read = 8, bytes actually read = 18446744073709551615, offset = 0)"
        ),
    ],
)
def test_storage_errors_are_told_from_bad_data(exc: OSError) -> None:
    assert incoming.is_storage_failure(exc) and storage_failed(exc)
    for bad_data in (OSError("truncated file: eof = 10"), ValueError("no Header group")):
        assert not incoming.is_storage_failure(bad_data) and not storage_failed(bad_data)


def test_an_io_error_reading_a_raw_file_is_retryable_everywhere(
    workspace: Path, monkeypatch
) -> None:  # noqa: ANN001
    raw = workspace / "incoming" / "2025-10-05T12:30:00_sb00.hdf5"
    raw.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)

    def eio(*a: object, **k: object) -> None:
        raise OSError(errno.EIO, "Input/output error", str(raw))

    import h5py

    monkeypatch.setattr(h5py, "File", eio)
    failure = inspect_uvh5(str(raw)).failure
    assert failure is not None
    assert (str(failure.category), failure.code) == ("retryable", "storage_unavailable")
    # A worker's unclassified OSError with the same words: the policy rules agree.
    cfg = fake_pipeline_config(workspace)
    evidence = Evidence(
        outcome="error",
        stage="preflight",
        exception_type="OSError",
        message=f"[Errno 5] Input/output error: '{raw}'",
    )
    got = Classifier(cfg.policy).classify(evidence)
    assert (str(got.category), got.code) == ("retryable", "storage_unavailable")
    assert json.dumps(got.as_dict())  # names the file
