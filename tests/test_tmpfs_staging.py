"""tmpfs staging is owned like the rest: an attempt's area in ``paths.tmpfs_staging`` is
removed after the attempt whatever its worker did, swept at start-up when a daemon died
with it, and found (and removed by --repair) by check-state. RAM that leaks fills a node."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from supervisor import migrate, reconcile
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Group
from tests.conftest import add_pending_group, fake_pipeline_config

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
GID = "2025-10-05T12:30:00"


def _config(workspace: Path, behaviour: str):  # noqa: ANN202
    convert = {
        "tiers": [{"name": "primary", "params": {"behaviour": behaviour, "use_tmpfs": True}}]
    }
    return fake_pipeline_config(
        workspace,
        settings={"paths": {"tmpfs_staging": str(workspace / "shm")}},
        convert=convert,
    )


def test_a_failed_convert_leaves_nothing_in_tmpfs(workspace: Path) -> None:
    cfg = _config(workspace, "raise")
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    add_pending_group(db, GID)
    Daemon(cfg, db, ingest=False, rng=random.Random(0)).run(until_idle=True)
    with db.read() as s:
        assert s.get(Group, GID).state == "failed"
    assert (workspace / "logs" / GID / "convert").is_dir()  # the attempt did run
    assert list((workspace / "shm").iterdir()) == []


def test_a_daemon_killed_mid_write_has_its_tmpfs_area_swept_at_restart(workspace: Path) -> None:
    cfg = _config(workspace, "hang")
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    add_pending_group(db, GID)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    cmd = [SCRIPT, "--workspace", cfg.workspace, "--config", f"{cfg.workspace}/fake.toml"]
    daemon = subprocess.Popen(
        [*cmd, "run", "--until-idle", "--listen", ""],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shm = workspace / "shm"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(shm.glob(f"{GID}-convert-t*/table.f0")):
        time.sleep(0.05)
    written = list(shm.glob(f"{GID}-convert-t*"))
    assert written, "the convert worker never wrote into its tmpfs area"
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait()
    assert written[0].exists()  # the worker cannot clean up: its daemon is gone
    _config(workspace, "succeed")
    restart = subprocess.run(
        [*cmd, "run", "--until-idle", "--listen", ""],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restart.returncode == 0, restart.stderr
    assert '"event": "recover.tmpfs_staging_removed"' in restart.stdout
    assert list(shm.iterdir()) == []
    with db.read() as s:
        assert s.get(Group, GID).state == "completed"


def test_check_state_finds_and_repairs_an_orphan_tmpfs_area(workspace: Path) -> None:
    cfg = _config(workspace, "succeed")
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    add_pending_group(db, GID)
    Daemon(cfg, db, ingest=False, rng=random.Random(0)).run(until_idle=True)
    orphan = workspace / "shm" / f"{GID}-convert-t9"
    orphan.mkdir(parents=True)
    (orphan / "table.f0").write_bytes(b"x")
    foreign = workspace / "shm" / "someone-elses"
    foreign.mkdir()
    found = reconcile.check_state(cfg, db)
    assert [(f.kind, f.path) for f in found] == [("orphan_staging", str(orphan))]
    assert orphan.exists()  # a dry run
    repaired = reconcile.check_state(cfg, db, repair=True)
    assert all(f.repaired for f in repaired)
    assert not orphan.exists() and foreign.exists()  # not ours: left alone
