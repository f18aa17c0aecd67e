"""Two daemons (two "nodes") share one real PostgreSQL queue: every group completes, every
stage is committed exactly once, and each group is claimed by one node at a time."""

from __future__ import annotations

import dataclasses
import random
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from supervisor import migrate
from supervisor.daemon import Daemon
from supervisor.db import Database
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
