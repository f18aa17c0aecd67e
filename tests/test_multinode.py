"""Two daemons (two "nodes") share one real PostgreSQL queue: every group completes, every
stage is committed exactly once, and each group is claimed by one node at a time."""

from __future__ import annotations

import dataclasses
import random
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from supervisor import migrate
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.leases import database_now
from supervisor.models import Group, StageAttempt
from tests.conftest import add_pending_group, fake_pipeline_config
from tests.test_pipeline import fake_processes

pytestmark = pytest.mark.postgres

GROUPS = [f"2025-10-05T13:{m:02d}:00" for m in range(0, 30, 5)]


def test_two_nodes_share_one_queue(workspace: Path, postgres_url: str) -> None:
    slow = {"tiers": [{"name": "primary", "params": {"behaviour": "slow_success", "seconds": 0.2}}]}
    base = fake_pipeline_config(workspace, preflight=slow, image=slow)
    db = Database(postgres_url)
    migrate.upgrade(db)
    for gid in GROUPS:
        add_pending_group(db, gid)
    daemons = [
        Daemon(
            dataclasses.replace(base, daemon=dataclasses.replace(base.daemon, node_name=node)),
            db,
            ingest=False,
            rng=random.Random(n),
        )
        for n, node in enumerate(("node-a", "node-b"))
    ]
    errors: list[BaseException] = []

    def run(d: Daemon) -> None:
        try:
            d.run(until_idle=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert errors == [] and not any(t.is_alive() for t in threads)
    with db.transaction() as s:
        states = dict(s.execute(select(Group.group_id, Group.state)).all())
        per_stage = s.execute(
            select(StageAttempt.group_id, StageAttempt.stage, func.count())
            .where(StageAttempt.outcome == "succeeded")
            .group_by(StageAttempt.group_id, StageAttempt.stage)
        ).all()
        owners = {o.split(":")[0] for o in s.scalars(select(StageAttempt.owner))}
        others = s.scalar(
            select(func.count())
            .select_from(StageAttempt)
            .where(StageAttempt.outcome != "succeeded")
        )
    assert states == {gid: "completed" for gid in GROUPS}
    assert len(per_stage) == 5 * len(GROUPS) and all(n == 1 for *_k, n in per_stage)
    assert owners == {"node-a", "node-b"}, "both nodes should have done work"
    assert others == 0
    assert fake_processes() == []
    db.dispose()


def test_a_node_killed_mid_stage_has_its_groups_finished_by_the_others(
    workspace: Path, postgres_url: str
) -> None:
    """Three daemon processes ("nodes") on one PostgreSQL queue; one is SIGKILLed while it
    runs stages. Its leases expire, the other nodes reap its groups back to their
    checkpoints and finish them: every group completes, every stage commits once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    slow = {"tiers": [{"name": "primary", "params": {"behaviour": "slow_success", "seconds": 1.0}}]}
    fake_pipeline_config(
        workspace,
        settings={
            "database": {"url": postgres_url},
            "daemon": {"lease_s": 6.0, "heartbeat_s": 1.0, "reap_interval_s": 1.0},
        },
        convert=slow,
        image=slow,
    )
    db = Database(postgres_url)
    migrate.upgrade(db)
    for gid in GROUPS:
        add_pending_group(db, gid)
    script = str(Path(sys.executable).parent / "contimg-supervisor")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}

    def node(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                script,
                "--workspace",
                str(workspace),
                "--config",
                str(workspace / "fake.toml"),
                "run",
                "--until-idle",
                "--listen",
                "",
            ],
            env={**env, "CONTIMG_DAEMON__NODE_NAME": name},
            stdout=(workspace / f"{name}.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    nodes = {name: node(name) for name in ("node-a", "node-b", "node-c")}
    try:
        # Kill node-a while one of its workers is mid-stage: an attempt row of a slow (1 s)
        # stage that began under 0.4 s ago. A group merely claimed (its attempt row not yet
        # written) or a fast stage about to commit would test a different moment.
        victim = None
        deadline = time.monotonic() + 60
        while victim is None and time.monotonic() < deadline:
            with db.transaction() as s:
                now = database_now(s)
                victim = s.scalars(
                    select(StageAttempt.group_id).where(
                        StageAttempt.outcome == "running",
                        StageAttempt.owner.like("node-a:%"),
                        StageAttempt.stage.in_(("convert", "image")),
                        StageAttempt.started_at > now - timedelta(seconds=0.4),
                    )
                ).first()
            if victim is None:
                time.sleep(0.05)
        assert victim is not None, "node-a never ran a slow stage"
        os.kill(nodes["node-a"].pid, signal.SIGKILL)
        nodes["node-a"].wait()
        for name in ("node-b", "node-c"):
            assert nodes[name].wait(timeout=180) == 0, (workspace / f"{name}.log").read_text()[
                -2000:
            ]
    finally:
        for p in nodes.values():
            if p.poll() is None:
                p.kill()
        for p in fake_processes():
            p.kill()
    with db.transaction() as s:
        states = dict(s.execute(select(Group.group_id, Group.state)).all())
        per_stage = s.execute(
            select(StageAttempt.group_id, StageAttempt.stage, func.count())
            .where(StageAttempt.outcome == "succeeded")
            .group_by(StageAttempt.group_id, StageAttempt.stage)
        ).all()
        abandoned_by_a = s.scalars(
            select(StageAttempt.group_id).where(
                StageAttempt.owner.like("node-a:%"), StageAttempt.outcome == "abandoned"
            )
        ).all()
    assert states == {gid: "completed" for gid in GROUPS}
    assert len(per_stage) == 5 * len(GROUPS) and all(n == 1 for *_k, n in per_stage)
    assert victim in abandoned_by_a
    db.dispose()
