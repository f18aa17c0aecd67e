"""Disk full on real small filesystems (a tmpfs mounted for the test; skipped where this
process may not mount): the state database's directory, and the products/staging
filesystem. Nothing torn is registered, the database stays intact, intake pauses while
the disk is full and resumes by itself, and the group completes."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select

from supervisor import migrate
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Artifact, Group, StageAttempt
from tests.conftest import add_pending_group, fake_pipeline_config
from tests.test_pipeline import assert_clean

GID = "2025-10-05T12:30:00"


@contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(filesystem: Path) -> Path:
    """Write a ballast file until the filesystem is full; return it."""
    ballast = filesystem / "ballast"
    chunk = b"\0" * 65536
    with ballast.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert os.statvfs(filesystem).f_bavail * os.statvfs(filesystem).f_frsize < 65536
    return ballast


def successes_per_stage(db: Database) -> list[int]:
    with db.transaction() as s:
        rows = s.execute(
            select(StageAttempt.stage, func.count())
            .where(StageAttempt.outcome == "succeeded")
            .group_by(StageAttempt.stage)
        ).all()
    return sorted(n for _stage, n in rows)


def test_the_database_directory_filling_up_loses_nothing(workspace: Path) -> None:
    slow = {"tiers": [{"name": "primary", "params": {"behaviour": "slow_success", "seconds": 1.0}}]}
    with small_filesystem(workspace / "state", 24) as state_fs:
        cfg = fake_pipeline_config(
            workspace, settings={"daemon": {"heartbeat_row_s": 0.2}}, convert=slow, calibrate=slow
        )
        db = Database(cfg.database_url, busy_timeout_ms=2000)
        migrate.upgrade(db)
        add_pending_group(db, GID)
        daemon = Daemon(cfg, db, ingest=False, rng=random.Random(0))
        runner = threading.Thread(target=daemon.run, kwargs={"until_idle": True})
        runner.start()
        time.sleep(0.5)
        ballast = fill(state_fs)
        time.sleep(3.0)  # convert finishes (its commit needs pages) while the disk is full
        ballast.unlink()
        runner.join(timeout=120)
        assert not runner.is_alive()
        with db.transaction() as s:
            group = s.get(Group, GID)
            assert group.state == "completed", group.state_reason
        assert successes_per_stage(db) == [1, 1, 1, 1, 1]
        db.dispose()
        conn = sqlite3.connect(cfg.database_url.removeprefix("sqlite:///"))
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        conn.close()
        assert_clean(cfg)


def test_products_filling_up_pauses_intake_and_registers_nothing_torn(workspace: Path) -> None:
    bulky = {
        "tiers": [
            {
                "name": "primary",
                "params": {"behaviour": "slow_success", "seconds": 1.0, "output_mb": 4},
            }
        ]
    }
    with small_filesystem(workspace / "data", 24) as data_fs:
        cfg = fake_pipeline_config(
            workspace,
            settings={
                "paths": {"products": "data/products", "staging": "data/staging"},
                "resources": {"min_free_disk_gb": 0.002, "monitor_interval_s": 0.2},
            },
            convert=bulky,
        )
        db = Database(cfg.database_url, busy_timeout_ms=5000)
        migrate.upgrade(db)
        add_pending_group(db, GID)
        daemon = Daemon(cfg, db, ingest=False, rng=random.Random(0))
        runner = threading.Thread(target=daemon.run, kwargs={"until_idle": True})
        runner.start()
        time.sleep(0.5)  # convert is running: its 4 MB output will not fit
        ballast = fill(data_fs)
        time.sleep(3.0)
        with db.transaction() as s:
            paused = s.get(Group, GID).state
        ballast.unlink()
        runner.join(timeout=120)
        assert not runner.is_alive()
        with db.transaction() as s:
            group = s.get(Group, GID)
            converts = s.scalars(
                select(StageAttempt)
                .where(StageAttempt.stage == "convert")
                .order_by(StageAttempt.id)
            ).all()
            artifacts = s.scalars(select(Artifact).where(Artifact.stage == "convert")).all()
        assert group.state == "completed", group.state_reason
        assert paused in ("retry_wait", "pending"), paused  # not claimed while full
        assert [(a.outcome, a.error_code) for a in converts] == [
            ("failed", "disk_full"),
            ("succeeded", None),
        ]
        assert "No space left on device" in converts[0].error_message
        assert all(Path(a.path).exists() for a in artifacts)
        bulk = [p for p in (data_fs / "products").rglob("bulk.bin")]
        assert [p.stat().st_size for p in bulk] == [4 * 1024**2]  # the one published whole
        assert successes_per_stage(db) == [1, 1, 1, 1, 1]
        db.dispose()
        assert_clean(cfg)
