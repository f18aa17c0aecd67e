"""Faults with their classification: a hung worker (no CPU, no output) caught long before
the stage timeout; a busy silent worker left alone; a worker that runs out of its memory
limit (RLIMIT_AS); a locked database; a commit that raises after or before it held; a
calibration set whose write fails inside the commit; an exception of the supervisor's own."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from supervisor import executor as executor_module
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import CalibrationSet, Group, StageAttempt, Transition
from supervisor.reconcile import check_state
from tests.conftest import add_pending_group, fake_pipeline_config
from tests.test_pipeline import assert_clean

GID = "2025-10-05T12:30:00"


def run(cfg, db: Database) -> None:  # noqa: ANN001
    Daemon(cfg, db, ingest=False, rng=random.Random(0)).run(until_idle=True)


def attempts(db: Database, stage: str) -> list[tuple[str, str | None, float | None]]:
    with db.transaction() as s:
        return [
            (a.outcome, a.error_code, (a.finished_at - a.started_at).total_seconds())
            for a in s.scalars(
                select(StageAttempt).where(StageAttempt.stage == stage).order_by(StageAttempt.id)
            )
        ]


def state(db: Database) -> str:
    with db.transaction() as s:
        return s.get(Group, GID).state


def test_a_hung_worker_is_caught_long_before_the_stage_timeout(
    workspace: Path, sqlite_db: Database
) -> None:
    convert = {
        "timeout_s": 120.0,
        "stall_timeout_s": 1.5,
        "tiers": [{"name": "primary", "params": {"sequence": "hang,succeed"}}],
    }
    cfg = fake_pipeline_config(workspace, convert=convert)
    add_pending_group(sqlite_db, GID)
    run(cfg, sqlite_db)
    (first, second) = attempts(sqlite_db, "convert")
    assert first[:2] == ("failed", "worker_hung") and first[2] < 30
    assert second[:2] == ("succeeded", None)
    assert state(sqlite_db) == "completed"
    assert_clean(cfg)


def test_a_busy_but_silent_worker_is_not_hung(workspace: Path, sqlite_db: Database) -> None:
    convert = {
        "stall_timeout_s": 1.0,
        "tiers": [{"name": "primary", "params": {"behaviour": "spin", "seconds": 3.0}}],
    }
    cfg = fake_pipeline_config(workspace, convert=convert)
    add_pending_group(sqlite_db, GID)
    run(cfg, sqlite_db)
    assert [a[:2] for a in attempts(sqlite_db, "convert")] == [("succeeded", None)]
    # Its row records the CPU it burnt (3 s of spinning), not just its wall time.
    with sqlite_db.transaction() as s:
        cpu = s.scalar(
            select(StageAttempt.worker_cpu_seconds).where(StageAttempt.stage == "convert")
        )
    assert cpu is not None and cpu >= 1.0


def test_out_of_memory_is_its_own_code_and_takes_the_next_tier(
    workspace: Path, sqlite_db: Database
) -> None:
    image = {
        "memory_limit_gb": 1.0,
        "tiers": [
            {"name": "primary", "params": {"behaviour": "allocate", "gb": 4}},
            {"name": "smaller", "params": {}},
        ],
    }
    cfg = fake_pipeline_config(workspace, image=image)
    add_pending_group(sqlite_db, GID)
    run(cfg, sqlite_db)
    assert [a[:2] for a in attempts(sqlite_db, "image")] == [
        ("failed", "out_of_memory"),
        ("succeeded", None),
    ]
    assert state(sqlite_db) == "completed"


def test_a_locked_database_delays_the_daemon_but_loses_nothing(
    workspace: Path, sqlite_db: Database
) -> None:
    """Another process holds the SQLite write lock longer than the busy timeout: the loop
    logs the error and carries on; nothing is lost or doubled."""
    slow = {"tiers": [{"name": "primary", "params": {"behaviour": "slow_success", "seconds": 0.5}}]}
    cfg = fake_pipeline_config(
        workspace, settings={"database": {"busy_timeout_ms": 500}}, convert=slow
    )
    add_pending_group(sqlite_db, GID)
    db = Database(cfg.database_url, busy_timeout_ms=500)
    daemon = Daemon(cfg, db, ingest=False, rng=random.Random(0))
    runner = threading.Thread(target=daemon.run, kwargs={"until_idle": True})
    runner.start()
    time.sleep(0.8)
    conn = sqlite3.connect(cfg.database_url.removeprefix("sqlite:///"), isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    time.sleep(3.0)
    conn.execute("ROLLBACK")
    conn.close()
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert state(sqlite_db) == "completed"
    with sqlite_db.transaction() as s:
        per_stage = s.execute(
            select(StageAttempt.stage, func.count())
            .where(StageAttempt.outcome == "succeeded")
            .group_by(StageAttempt.stage)
        ).all()
    assert sorted(n for _s, n in per_stage) == [1, 1, 1, 1, 1]
    db.dispose()


@pytest.mark.parametrize("when", ["after", "before"])
def test_a_commit_that_raises_is_read_back_never_applied_twice(
    workspace: Path, sqlite_db: Database, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """'after': the commit held but the caller got an error (a connection lost after
    COMMIT); 'before': the transaction failed. Either way: one committed calibrate
    attempt, and the group completes."""
    real = executor_module.StageExecutor._commit_success
    fired = {"n": 0}

    def flaky(self, claim, attempt_id, paths, outcome, bound):  # noqa: ANN001, ANN202
        if claim.stage != "calibrate" or fired["n"]:
            return real(self, claim, attempt_id, paths, outcome, bound)
        fired["n"] += 1
        if when == "after":
            real(self, claim, attempt_id, paths, outcome, bound)
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(executor_module.StageExecutor, "_commit_success", flaky)
    cfg = fake_pipeline_config(workspace)
    add_pending_group(sqlite_db, GID)
    run(cfg, sqlite_db)
    assert fired["n"] == 1 and state(sqlite_db) == "completed"
    cal = attempts(sqlite_db, "calibrate")
    if when == "after":
        assert [a[:2] for a in cal] == [("succeeded", None)]
    else:
        assert [a[:2] for a in cal] == [("failed", "database_unavailable"), ("succeeded", None)]
    assert_clean(cfg)


def test_a_calibration_set_that_fails_to_register_undoes_the_whole_commit(
    workspace: Path, sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calibration set is written by ORM objects in a session joined to the commit's
    Core transaction. When that write fails (after the outputs were moved into place and
    the group's row was moved on), nothing of the commit holds: the group is still at
    calibrate, the outputs are back in staging and then removed, no set is registered; the
    retry commits once."""
    real = executor_module.calibration.register_solution
    fired = {"n": 0}

    def failing(s, group, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        cal_set = real(s, group, *args, **kwargs)
        if not fired["n"]:
            fired["n"] += 1
            s.flush()  # the set's row is written in the transaction, then the write fails
            raise OperationalError("INSERT INTO calibration_tables", {}, Exception("disk I/O"))
        return cal_set

    monkeypatch.setattr(executor_module.calibration, "register_solution", failing)
    cfg = fake_pipeline_config(workspace)
    add_pending_group(sqlite_db, GID)
    run(cfg, sqlite_db)
    assert fired["n"] == 1 and state(sqlite_db) == "completed"
    cal = attempts(sqlite_db, "calibrate")
    assert [a[:2] for a in cal] == [("failed", "database_unavailable"), ("succeeded", None)]
    with sqlite_db.transaction() as s:
        sets = s.execute(select(CalibrationSet.group_id)).scalars().all()
        moves = s.execute(
            select(func.count())
            .select_from(Transition)
            .where(Transition.group_id == GID, Transition.message == "calibrate committed")
        ).scalar_one()
    assert sets == [GID]  # one set: the failed commit's row was rolled back with it
    assert moves == 1
    assert_clean(cfg)


def test_a_supervisor_bug_fails_its_group_ends_its_attempt_and_the_night_goes_on(
    workspace: Path, sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception of the supervisor's own (here: in publishing one group's convert
    outputs) fails that group (fatal, ``supervisor_error``) and closes its attempt in the
    same transaction; the daemon lives on and the next group completes."""
    other = "2025-10-05T12:35:00"
    real = executor_module.publish

    def publish(staged: Path, final_dir: Path):  # noqa: ANN202
        if GID in str(final_dir) and final_dir.name == "convert":
            raise RuntimeError("a bug")
        return real(staged, final_dir)

    monkeypatch.setattr(executor_module, "publish", publish)
    cfg = fake_pipeline_config(workspace)
    add_pending_group(sqlite_db, GID)
    add_pending_group(sqlite_db, other)
    run(cfg, sqlite_db)
    with sqlite_db.transaction() as s:
        states = dict(s.execute(select(Group.group_id, Group.state)).all())
        ended = s.scalars(
            select(StageAttempt).where(
                StageAttempt.group_id == GID, StageAttempt.stage == "convert"
            )
        ).one()
        assert (ended.outcome, ended.error_code) == ("failed", "supervisor_error")
        assert ended.finished_at is not None and "RuntimeError: a bug" in ended.error_message
    assert states == {GID: "failed", other: "completed"}
    assert check_state(cfg, sqlite_db) == []
