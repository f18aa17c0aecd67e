"""Chaos: SIGKILL the daemon at arbitrary moments and start it again. It finishes the work:
nothing lost, no stage committed twice, no worker left running, no staging left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from supervisor.db import Database
from supervisor.models import Artifact, Group, StageAttempt, Transition
from tests.conftest import add_pending_group, fake_pipeline_config
from tests.test_pipeline import fake_processes

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
GROUPS = ["2025-10-05T12:30:00", "2025-10-05T12:35:09", "2025-10-05T12:40:18"]


def start_daemon(workspace: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    log = (workspace / "daemon.log").open("ab")
    return subprocess.Popen(
        [
            SCRIPT,
            "--workspace",
            str(workspace),
            "--config",
            str(workspace / "fake.toml"),
            "run",
            "--until-idle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=False,
    )


def test_sigkill_and_restart_finishes_everything_exactly_once(
    workspace: Path, sqlite_db: Database
) -> None:
    slow = {"tiers": [{"name": "primary", "params": {"behaviour": "slow_success", "seconds": 0.6}}]}
    # The default crash budget: a daemon's death is never its groups' fault (issue 10).
    cfg = fake_pipeline_config(
        workspace, **{s: slow for s in ("preflight", "convert", "calibrate", "image", "register")}
    )
    for gid in GROUPS:
        add_pending_group(sqlite_db, gid)
    rng = random.Random(20261125)
    kills = 0
    try:
        for _ in range(5):
            proc = start_daemon(workspace)
            time.sleep(rng.uniform(1.2, 3.0))  # start-up ~1 s, then somewhere mid-stage
            if proc.poll() is not None:
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
        final = start_daemon(workspace)
        assert final.wait(timeout=240) == 0, (workspace / "daemon.log").read_text()[-3000:]
    finally:
        for p in fake_processes():
            p.kill()
    assert kills >= 3, "the chaos must actually interrupt the daemon"

    with sqlite_db.transaction() as s:
        states = dict(s.execute(select(Group.group_id, Group.state)).all())
        committed = s.execute(
            select(StageAttempt.group_id, StageAttempt.stage, func.count())
            .where(StageAttempt.outcome == "succeeded")
            .group_by(StageAttempt.group_id, StageAttempt.stage)
        ).all()
        artifacts = s.scalar(select(func.count()).select_from(Artifact))
        completions = s.scalar(
            select(func.count()).select_from(Transition).where(Transition.to_state == "completed")
        )
        stuck = s.scalar(
            select(func.count()).select_from(StageAttempt).where(StageAttempt.outcome == "running")
        )
    assert states == {gid: "completed" for gid in GROUPS}
    assert len(committed) == 15 and all(n == 1 for _g, _s, n in committed)
    assert artifacts == 15 and completions == 3 and stuck == 0
    assert fake_processes() == []
    staging = cfg.path("staging")
    assert not staging.exists() or list(staging.rglob("*")) == []
    for gid in GROUPS:
        for stage in ("preflight", "convert", "calibrate", "image", "register"):
            out = cfg.path("products") / gid / stage / f"{stage}.out"
            assert out.read_text().startswith(f"{gid} {stage}")
