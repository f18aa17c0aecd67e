"""Every way a stage worker can end, through the real runner and daemon (fake stage code):
the group ends in the right state with the right category, no process survives, and no
partial output is left behind."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select, update

from supervisor.config import Config
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Artifact, Group, StageAttempt, Transition
from supervisor.runner import read_worker_identity
from supervisor.states import State
from tests.conftest import add_pending_group, fake_pipeline_config

GID = "2025-10-05T12:30:00"


def tier(**params: object) -> dict:
    return {"tiers": [{"name": "primary", "params": params}]}


def run_until_idle(cfg: Config, db: Database) -> Daemon:
    daemon = Daemon(cfg, db, rng=random.Random(0), ingest=False)
    daemon.run(until_idle=True)
    return daemon


def group(db: Database, gid: str = GID) -> Group:
    with db.transaction() as s:
        g = s.get(Group, gid)
        assert g is not None
        return g


def attempts(db: Database, gid: str = GID) -> list[StageAttempt]:
    with db.transaction() as s:
        return list(
            s.scalars(
                select(StageAttempt).where(StageAttempt.group_id == gid).order_by(StageAttempt.id)
            )
        )


def fake_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "tests.fake_stage" in cmd or "time.sleep(3600)" in cmd:
            out.append(p)
    return out


def assert_clean(cfg: Config) -> None:
    assert fake_processes() == [], "a worker or grandchild survived"
    staging = cfg.path("staging")
    leftovers = [p for p in staging.rglob("*")] if staging.exists() else []
    assert leftovers == [], f"staging not rolled back: {leftovers}"


@pytest.fixture
def pipeline(workspace: Path, sqlite_db: Database):  # noqa: ANN201
    def make(**stages: dict) -> tuple[Config, Database]:
        cfg = fake_pipeline_config(workspace, **stages)
        add_pending_group(sqlite_db, GID)
        return cfg, sqlite_db

    yield make
    for p in fake_processes():  # never leak into other tests, even on failure
        p.kill()


def test_happy_path_commits_every_stage_once(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline()
    run_until_idle(cfg, db)
    g = group(db)
    assert g.state == State.COMPLETED and g.completed_at is not None
    assert [(a.stage, a.outcome) for a in attempts(db)] == [
        (s, "succeeded") for s in ("preflight", "convert", "calibrate", "image", "register")
    ]
    with db.transaction() as s:
        arts = s.scalars(select(Artifact).where(Artifact.group_id == GID)).all()
    assert len(arts) == 5 and all(Path(a.path).is_file() and a.bytes > 0 for a in arts)
    assert all(Path(a.workdir, "result.json").exists() for a in attempts(db))
    # Each row records its worker's own wall time (spawn to exit) and peak memory, and the
    # attempt (claim to commit) took at least as long as its worker.
    for a in attempts(db):
        assert a.worker_seconds is not None and 0 < a.worker_seconds < 20
        assert a.worker_cpu_seconds is not None and 0 < a.worker_cpu_seconds < 20
        assert a.peak_rss_bytes and a.peak_rss_bytes > 1e6
        assert (a.finished_at - a.started_at).total_seconds() >= a.worker_seconds - 0.01
    assert not list(Path(cfg.workspace).rglob("casa-*.log"))
    assert_clean(cfg)


def test_unclassified_exception_fails_the_group_and_rolls_back(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(convert=tier(behaviour="raise", message="KeyError somewhere odd"))
    run_until_idle(cfg, db)
    g = group(db)
    assert (g.state, g.stage, g.error_category, g.error_code) == (
        "failed",
        "convert",
        "fatal",
        "unclassified",
    )
    last = attempts(db)[-1]
    assert last.error_type == "RuntimeError" and "KeyError somewhere odd" in last.error_message
    assert "no policy rule matches" in last.hint
    assert not (cfg.path("products") / GID / "convert").exists()
    assert (cfg.path("products") / GID / "preflight").exists()  # the checkpoint stays
    assert_clean(cfg)


def test_worker_classified_validation_quarantines(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(
        calibrate=tier(
            behaviour="classified",
            category="validation",
            code="all_flagged",
            message="every visibility flagged",
        )
    )
    run_until_idle(cfg, db)
    g = group(db)
    assert (g.state, g.error_category, g.error_code) == ("quarantined", "validation", "all_flagged")
    assert "every visibility flagged" in g.state_reason
    assert_clean(cfg)


def test_transient_failure_is_retried_then_succeeds(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(image={**tier(sequence="no_result,succeed"), "max_attempts": 3})
    run_until_idle(cfg, db)
    assert group(db).state == State.COMPLETED
    image = [(a.attempt, a.outcome, a.error_code) for a in attempts(db) if a.stage == "image"]
    assert image == [(1, "failed", "invalid_result"), (2, "succeeded", None)]
    with db.transaction() as s:
        states = [
            t.to_state
            for t in s.scalars(
                select(Transition).where(Transition.group_id == GID).order_by(Transition.id)
            )
        ]
    assert "retry_wait" in states
    assert_clean(cfg)


@pytest.mark.parametrize("behaviour", ["hang", "ignore_sigterm", "grandchild"])
def test_hung_workers_are_killed_with_everything_they_started(
    pipeline,
    behaviour: str,  # noqa: ANN001
) -> None:
    cfg, db = pipeline(convert={**tier(behaviour=behaviour), "timeout_s": 1.5, "max_attempts": 1})
    run_until_idle(cfg, db)
    g = group(db)
    assert (g.state, g.error_code) == ("failed", "stage_timeout_budget_exhausted")
    assert "timed out" in g.state_reason
    assert_clean(cfg)


def test_grandchild_left_behind_by_a_successful_worker_is_killed(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(preflight=tier(behaviour="grandchild", then="exit"))
    run_until_idle(cfg, db)
    assert group(db).state == State.COMPLETED
    assert_clean(cfg)


def test_crashes_have_their_own_budget(pipeline) -> None:  # noqa: ANN001
    # FAST config: crash_budget 1, so the second SIGSEGV ends it despite attempts left.
    cfg, db = pipeline(image={**tier(behaviour="signal", signum=11), "max_attempts": 5})
    run_until_idle(cfg, db)
    g = group(db)
    assert (g.state, g.error_category, g.error_code) == (
        "failed",
        "fatal",
        "worker_crash_budget_exhausted",
    )
    assert "killed by SIGSEGV" in g.state_reason
    assert [a.exit_code for a in attempts(db) if a.stage == "image"] == [-11, -11]
    assert_clean(cfg)


def test_garbage_result_is_never_a_success(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(register={**tier(behaviour="garbage"), "max_attempts": 2})
    run_until_idle(cfg, db)
    g = group(db)
    assert (g.state, g.error_code) == ("failed", "invalid_result_budget_exhausted")
    assert [a.exit_code for a in attempts(db) if a.stage == "register"] == [0, 0]
    assert_clean(cfg)


def test_success_claimed_without_outputs_fails_its_postconditions(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(convert={**tier(behaviour="bad_artifact"), "max_attempts": 1})
    run_until_idle(cfg, db)
    g = group(db)
    assert (g.state, g.error_code) == ("failed", "postcondition_failed_budget_exhausted")
    assert "never-written.ms was not written" in g.state_reason
    assert_clean(cfg)


def test_recoverable_failure_moves_to_the_next_fallback_tier(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(
        calibrate={
            "tiers": [
                {
                    "name": "primary",
                    "params": {
                        "behaviour": "classified",
                        "category": "recoverable",
                        "code": "low_snr",
                    },
                },
                {"name": "relaxed", "params": {"behaviour": "succeed"}},
            ]
        }
    )
    run_until_idle(cfg, db)
    assert group(db).state == State.COMPLETED
    cal = [
        (a.fallback_tier, a.outcome, a.error_code) for a in attempts(db) if a.stage == "calibrate"
    ]
    assert cal == [(0, "failed", "low_snr"), (1, "succeeded", None)]


def test_a_writer_that_lost_its_claim_cannot_commit(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(preflight=tier(behaviour="slow_success", seconds=3.0))
    daemon = Daemon(cfg, db, ingest=False)

    def steal() -> None:  # another node reaped and re-claimed the group meanwhile
        time.sleep(1.0)
        with db.transaction() as s:
            s.execute(
                update(Group)
                .where(Group.group_id == GID)
                .values(fencing_token=Group.fencing_token + 100)
            )

    thief = threading.Thread(target=steal)
    thief.start()
    daemon.run(max_attempts=1)
    thief.join()
    (attempt,) = attempts(db)
    assert attempt.outcome == "abandoned" and "lease lost" in attempt.error_message
    assert group(db).state == State.RUNNING  # untouched: it belongs to the thief now
    assert not (cfg.path("products") / GID / "preflight").exists()
    assert_clean(cfg)


def test_shutdown_stops_the_worker_and_leaves_the_group_resumable(pipeline) -> None:  # noqa: ANN001
    cfg, db = pipeline(convert=tier(behaviour="hang"))
    daemon = Daemon(cfg, db, ingest=False)
    threading.Timer(2.0, daemon.stop).start()
    daemon.run()
    g = group(db)
    assert (g.state, g.stage, g.attempt) == ("pending", "convert", 0)
    assert attempts(db)[-1].outcome == "abandoned"
    assert_clean(cfg)


def test_calibrator_groups_first_then_observation_time(
    workspace: Path, sqlite_db: Database
) -> None:
    cfg = fake_pipeline_config(workspace)
    add_pending_group(sqlite_db, "2025-10-05T12:40:00", calibrator=None)
    add_pending_group(sqlite_db, "2025-10-05T12:30:00", calibrator=None)
    add_pending_group(sqlite_db, "2025-10-05T12:50:00", priority=0, calibrator="3C48")
    daemon = Daemon(cfg, sqlite_db, ingest=False)
    order = [daemon.leases.claim_next().group_id for _ in range(3)]
    assert order == ["2025-10-05T12:50:00", "2025-10-05T12:30:00", "2025-10-05T12:40:00"]
    assert daemon.leases.claim_next() is None


def test_a_segfault_after_a_written_result_is_not_a_crash(pipeline) -> None:  # noqa: ANN001
    """CASA segfaults at interpreter teardown even after success (REPORT.md §5)."""
    cfg, db = pipeline(calibrate=tier(behaviour="result_then_segv"))
    run_until_idle(cfg, db)
    assert group(db).state == State.COMPLETED
    cal = [a for a in attempts(db) if a.stage == "calibrate"]
    assert [(a.outcome, a.exit_code) for a in cal] == [("succeeded", -11)]
    assert_clean(cfg)


def test_restart_kills_the_worker_a_dead_daemon_left_running(pipeline) -> None:  # noqa: ANN001
    import os
    import signal
    import subprocess
    import sys

    cfg, db = pipeline(convert=tier(sequence="hang,succeed"))
    script = str(Path(sys.executable).parent / "contimg-supervisor")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    cmd = [
        script,
        "--workspace",
        cfg.workspace,
        "--config",
        f"{cfg.workspace}/fake.toml",
        "run",
        "--until-idle",
    ]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not [
        a for a in attempts(db) if a.stage == "convert" and read_worker_identity(Path(a.workdir))
    ]:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(0.5)
    (hung,) = [p for p in fake_processes()]  # the orphaned worker still hangs
    assert hung.is_running()
    daemon = Daemon(cfg, db, ingest=False)
    daemon.run(until_idle=True)
    assert daemon.summary.leftovers_killed == 1
    # Dead (a zombie until this sandbox's init reaps it: it is no longer our child).
    assert not hung.is_running() or hung.status() == psutil.STATUS_ZOMBIE
    g = group(db)
    assert g.state == State.COMPLETED
    convert = [(a.attempt, a.outcome) for a in attempts(db) if a.stage == "convert"]
    assert convert == [(1, "abandoned"), (2, "succeeded")]
    assert_clean(cfg)


def test_an_artifact_declared_as_a_measurement_set_must_be_one(pipeline) -> None:  # noqa: ANN001
    """The supervisor checks artifacts by kind itself: a worker's word is not enough."""
    from supervisor.postconditions import check_artifacts_by_kind

    cfg, _db = pipeline()
    out = Path(cfg.workspace) / "fake-out"
    (out / "x.ms").mkdir(parents=True)
    (out / "x.ms" / "table.dat").write_bytes(b"\0" * 64)
    (out / "img.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    problems = check_artifacts_by_kind(
        {
            "artifacts": [
                {"path": "x.ms", "kind": "ms"},
                {"path": "img.fits", "kind": "image_fits"},
                {"path": "other", "kind": "notes"},
            ]
        },
        out,
    )
    assert len(problems) == 2
    assert "does not open as a Measurement Set" in problems[0]
    assert "img.fits" in problems[1]


def test_target_waits_for_calibration_then_resumes_when_tables_register(
    workspace: Path, sqlite_db: Database
) -> None:
    from datetime import UTC, datetime

    from supervisor import calibration
    from supervisor.leases import Owner
    from supervisor.states import Actor

    cfg = fake_pipeline_config(workspace)
    target, cal = "2025-10-05T12:35:00", "2025-10-05T12:30:00"
    add_pending_group(sqlite_db, target, calibrator=None)
    run_until_idle(cfg, sqlite_db)
    g = group(sqlite_db, target)
    assert (g.state, g.stage, g.attempt) == ("waiting_calibration", "calibrate", 0)
    assert not any(a.stage == "calibrate" for a in attempts(sqlite_db, target))

    add_pending_group(sqlite_db, cal)  # a calibrator group's tables get registered
    with sqlite_db.transaction() as s:
        cal_set = calibration.register_solution(
            s, s.get(Group, cal), {}, {"mode": "solve"}, cfg, datetime.now(UTC)
        )
        released = calibration.release_waiting(
            s, cal_set, datetime.now(UTC), Actor(str(Owner.this_process()))
        )
    assert released == [target]
    run_until_idle(cfg, sqlite_db)
    assert group(sqlite_db, target).state == State.COMPLETED
    assert_clean(cfg)
