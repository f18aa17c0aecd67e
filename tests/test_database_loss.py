"""When the state database is lost: deleted, torn, truncated, emptied, rolled back to an older
backup, removed under a running daemon. In each case nothing registered is lost, replaced or
deleted, the operator is told what to run, and after it the night completes and check-state
agrees. The night runs the fake stages (real subprocesses, real commits and manifests)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from supervisor import backup, dbfile, manifest, migrate, rebuild, reconcile, retention
from supervisor.config import Config
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Artifact, Group, StageAttempt
from supervisor.operator import requeue_group
from tests.conftest import add_pending_group, fake_pipeline_config
from tests.test_disk_full import small_filesystem

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
GROUPS = ("2025-10-05T12:30:00", "2025-10-05T12:35:09", "2025-10-05T12:40:18")


def cli(cfg: Config, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    return subprocess.run(
        [SCRIPT, "--workspace", cfg.workspace, "--config", f"{cfg.workspace}/fake.toml", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=float(os.environ.get("CLI_TIMEOUT", 300)),
    )


def start_daemon(cfg: Config, **popen: Any) -> subprocess.Popen:
    """``run --until-idle`` as its own process (no listener), as systemd would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    return subprocess.Popen(
        [SCRIPT, "--workspace", cfg.workspace, "--config", f"{cfg.workspace}/fake.toml"]
        + ["run", "--until-idle", "--listen", ""],
        env=env,
        **popen,
    )


def run_all(cfg: Config, db: Database) -> Daemon:
    daemon = Daemon(cfg, db, ingest=False, rng=random.Random(0))
    daemon.run(until_idle=True)
    return daemon


def night(workspace: Path, groups: tuple[str, ...] = GROUPS) -> tuple[Config, Database]:
    """A completed night: the first group solves (3C48), the others apply its tables."""
    cfg = fake_pipeline_config(workspace)
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    for i, gid in enumerate(groups):
        add_pending_group(db, gid, calibrator="3C48" if i == 0 else None)
    run_all(cfg, db)
    return cfg, db


def snapshot(db: Database) -> dict[str, Any]:
    """What is registered: groups, artifacts, products, QA, calibration sets and tables, and
    each stage's committed result (not ids, attempt history or audit rows)."""
    with db.engine.connect() as c:

        def rows(sql: str) -> list[tuple]:
            return [tuple(r) for r in c.exec_driver_sql(sql).all()]

        committed: dict[tuple[str, str], tuple] = {}
        for gid, stage, token, result in rows(
            "SELECT group_id, stage, fencing_token, result FROM stage_attempts "
            "WHERE outcome = 'succeeded' ORDER BY id"
        ):
            committed[(gid, stage)] = (token, result)
        return {
            "groups": rows(
                "SELECT group_id, obs_start, state, stage, is_calibrator, calibrator_name, "
                "priority, correlation_id, completed_at FROM groups ORDER BY group_id"
            ),
            "artifacts": rows(
                "SELECT group_id, stage, kind, path, bytes, pruned_at, pruned_rule FROM "
                "artifacts ORDER BY path"
            ),
            "products": rows(
                "SELECT group_id, kind, path, calibration_tier, calibration_set_id, metrics, "
                "pruned_at FROM products ORDER BY group_id, kind"
            ),
            "qa": rows(
                "SELECT group_id, stage, score, verdict, metrics FROM quality_assessments "
                "ORDER BY group_id, stage"
            ),
            "sets": rows(
                "SELECT id, group_id, calibrator, solved_at, valid_from, valid_until, status, "
                "status_reason FROM calibration_sets ORDER BY id"
            ),
            "tables": rows(
                "SELECT set_id, kind, path, interp FROM calibration_tables ORDER BY set_id, kind"
            ),
            "committed": committed,
        }


def products_on_disk(cfg: Config) -> dict[str, str]:
    """Every file under products/ with its sha256 (manifests excluded: events append)."""
    root = cfg.path("products")
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != manifest.NAME
    }


def attempts_count(db: Database) -> int:
    with db.read() as s:
        return len(s.scalars(select(StageAttempt.id)).all())


def database_file(cfg: Config) -> Path:
    path = dbfile.sqlite_file(cfg.database_url)
    assert path is not None
    return path


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


# A deleted database -----------------------------------------------------------------------
def test_a_deleted_database_is_refused_then_rebuilt_from_the_manifests(workspace: Path) -> None:
    cfg, db = night(workspace)
    before, files = snapshot(db), products_on_disk(cfg)
    db.dispose()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database_file(cfg)}{suffix}").unlink(missing_ok=True)

    # The unit's start (db upgrade, then run) refuses before creating anything.
    for args in (("db", "upgrade"), ("run", "--until-idle", "--upgrade")):
        out = cli(cfg, *args)
        assert out.returncode == 2, out.stderr
        assert "does not know 15 committed stage(s) of 3 group(s)" in out.stderr
        assert "db rebuild" in out.stderr and "db restore" in out.stderr
        assert not database_file(cfg).exists()

    rebuilt = cli(cfg, "db", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "3 group(s) created" in rebuilt.stdout and "1 calibration set(s)" in rebuilt.stdout
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    assert snapshot(db) == before
    with db.read() as s:
        notes = s.scalars(select(Group.group_id)).all()
        assert len(notes) == 3
    assert cli(cfg, "check-state").returncode == 0
    # The pipeline carries on: nothing to do, nothing re-run, nothing replaced.
    attempts = attempts_count(db)
    run = cli(cfg, "run", "--until-idle")
    assert run.returncode == 0, run.stderr
    assert attempts_count(db) == attempts
    assert products_on_disk(cfg) == files


def test_start_fresh_moves_the_unknown_products_to_lost_and_found(workspace: Path) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    files = products_on_disk(cfg)
    db.dispose()
    database_file(cfg).unlink()
    out = cli(cfg, "db", "upgrade", "--start-fresh")
    assert out.returncode == 0, out.stderr
    assert "moved to" in out.stdout
    assert not any(cfg.path("products").iterdir())
    kept = Path(cfg.workspace) / "lost+found"
    moved = {
        str(p.relative_to(next(kept.iterdir()))): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(next(kept.iterdir()).rglob("*"))
        if p.is_file() and p.name != manifest.NAME
    }
    assert moved == files  # every product kept, byte for byte
    assert cli(cfg, "run", "--until-idle").returncode == 0  # nothing known, nothing refused


# A damaged file ---------------------------------------------------------------------------
def _tear_a_page(path: Path) -> None:
    """Overwrite one page in the middle of the file with random bytes (a torn write)."""
    page = 4096
    pages = path.stat().st_size // page
    assert pages >= 4
    with path.open("r+b") as fh:
        fh.seek(page * (pages // 2))
        fh.write(random.Random(7).randbytes(page))


@pytest.mark.parametrize("damage", ["torn_page", "truncated"])
def test_a_corrupt_database_is_named_left_untouched_and_rebuilt(
    workspace: Path, damage: str
) -> None:
    cfg, db = night(workspace)
    before = snapshot(db)
    db.dispose()
    path = database_file(cfg)
    if damage == "torn_page":
        _tear_a_page(path)
    else:
        os.truncate(path, path.stat().st_size // 2)
    assert not dbfile.check_integrity(path).ok
    checksum = sha(path)

    for args in (("run", "--until-idle", "--upgrade"), ("db", "upgrade")):
        out = cli(cfg, *args)
        assert out.returncode == 2, out.stderr
        assert f"database {path} is corrupt" in out.stderr
        assert "malformed" in out.stderr  # SQLite's own words
        assert "db restore" in out.stderr and "db rebuild" in out.stderr
        assert "Traceback" not in out.stderr
    health = cli(cfg, "health", "--json")
    assert health.returncode == 2
    assert "corrupt" in json.loads(health.stdout)["checks"][0]["detail"]
    status = cli(cfg, "status")  # reads what it can; where it meets the damage, the message
    assert status.returncode == 0 or "is corrupt" in status.stderr
    assert sha(path) == checksum  # never written, checkpointed or "repaired"
    assert not Path(f"{path}-wal").exists()

    rebuilt = cli(cfg, "db", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    kept = [p for p in path.parent.iterdir() if p.name.startswith(f"{path.name}.corrupt-")]
    assert [sha(p) for p in kept] == [checksum]  # the damaged file kept, as it was
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    assert snapshot(db) == before
    assert cli(cfg, "check-state").returncode == 0
    assert cli(cfg, "run", "--until-idle").returncode == 0


def test_a_zero_length_database_is_an_empty_one_and_refused(workspace: Path) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    db.dispose()
    database_file(cfg).write_bytes(b"")
    out = cli(cfg, "db", "upgrade")
    assert out.returncode == 2 and "does not know 5 committed stage(s)" in out.stderr
    assert database_file(cfg).stat().st_size == 0


# An older backup --------------------------------------------------------------------------
def test_a_restored_older_backup_is_brought_forward_from_the_disk(workspace: Path) -> None:
    cfg = fake_pipeline_config(workspace)
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    add_pending_group(db, GROUPS[0], calibrator="3C48")
    run_all(cfg, db)
    # "An hour ago": one group completed (--out: the hourly generations keep one an hour).
    old = cli(cfg, "db", "backup", "--json", "--out", str(workspace / "hour-old.sqlite3"))
    assert old.returncode == 0, old.stderr
    old_backup = Path(json.loads(old.stdout)["path"])
    for gid in GROUPS[1:]:
        add_pending_group(db, gid, calibrator=None)
    run_all(cfg, db)
    # A later change the older backup does not have: a retired calibration set.
    out = cli(cfg, "calibration", "retire", "1", "--reason", "bad solve")
    assert out.returncode == 0, out.stderr
    before, files = snapshot(db), products_on_disk(cfg)
    db.dispose()

    # The backup in place of the newer database: run refuses until it is brought forward.
    database_file(cfg).unlink()
    Path(f"{database_file(cfg)}-wal").unlink(missing_ok=True)
    restored = cli(cfg, "db", "restore", str(old_backup))
    assert restored.returncode == 0, restored.stderr
    assert "2 group(s) created" in restored.stdout, restored.stdout
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    after = snapshot(db)
    assert after["sets"] == before["sets"]  # retired, as the newer database said
    assert after == before
    attempts = attempts_count(db)
    assert cli(cfg, "check-state").returncode == 0
    assert cli(cfg, "run", "--until-idle").returncode == 0
    assert attempts_count(db) == attempts  # nothing that had committed ran again
    assert products_on_disk(cfg) == files


def test_run_refuses_a_database_older_than_the_disk(workspace: Path) -> None:
    cfg = fake_pipeline_config(workspace)
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    add_pending_group(db, GROUPS[0], calibrator="3C48")
    taken = backup.take(database_file(cfg), workspace / "old.sqlite3")
    run_all(cfg, db)
    db.dispose()
    for suffix in ("-wal", "-shm"):
        Path(f"{database_file(cfg)}{suffix}").unlink(missing_ok=True)
    database_file(cfg).write_bytes(taken.path.read_bytes())  # as a careless restore would
    out = cli(cfg, "run", "--until-idle")
    assert out.returncode == 2
    assert "does not know 5 committed stage(s) of 1 group(s)" in out.stderr
    assert "newer" in out.stderr


def test_restore_refuses_while_a_daemon_holds_the_workspace(workspace: Path) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    taken = backup.take(database_file(cfg), workspace / "b.sqlite3")
    with dbfile.daemon_lock(cfg.state_dir):
        out = cli(cfg, "db", "restore", str(taken.path))
        assert out.returncode == 2 and "a daemon is running on this workspace" in out.stderr
        assert cli(cfg, "db", "rebuild").returncode == 2


def test_a_backup_that_fails_verification_is_never_restored(workspace: Path) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    taken = backup.take(database_file(cfg), workspace / "b.sqlite3")
    _tear_a_page(taken.path)
    db.dispose()
    checksum = sha(database_file(cfg))
    out = cli(cfg, "db", "restore", str(taken.path))
    assert out.returncode == 1 and "not a usable backup" in out.stderr
    assert sha(database_file(cfg)) == checksum


# Backups ----------------------------------------------------------------------------------
def test_backups_taken_while_attempts_commit_are_consistent(workspace: Path) -> None:
    cfg = fake_pipeline_config(workspace)
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    for i in range(6):
        add_pending_group(db, f"2025-10-05T12:{30 + i:02d}:00", calibrator="3C48")
    daemon = threading.Thread(target=run_all, args=(cfg, db))
    daemon.start()
    taken = []
    while daemon.is_alive() or len(taken) < 3:
        taken.append(backup.take(database_file(cfg), workspace / "b" / f"{len(taken)}.sqlite3"))
        time.sleep(0.05)
    daemon.join()
    assert len({tuple(sorted(b.row_counts.items())) for b in taken}) > 1  # during commits
    for b in taken:
        assert backup.verify_file(b.path, b.row_counts) == ""
        with sqlite3.connect(b.path) as conn:
            # A snapshot: every artifact row's attempt row is there (one transaction).
            orphans = conn.execute(
                "SELECT count(*) FROM artifacts WHERE attempt_id NOT IN "
                "(SELECT id FROM stage_attempts)"
            ).fetchone()[0]
            assert orphans == 0


def test_the_backup_job_keeps_generations_and_reports_their_age(workspace: Path) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    backups = cfg.path("backups")
    found = backup.list_backups(backups)
    assert found, "the daemon's backup job runs at start"
    assert backup.verify_file(found[0].path, found[0].row_counts) == ""
    health = cli(cfg, "health", "--json")
    checks = {c["name"]: c for c in json.loads(health.stdout)["checks"]}
    assert checks["backup"]["status"] == "ok"


def test_a_full_backup_destination_loses_nothing(workspace: Path) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    path = database_file(cfg)
    checksum = sha(path)
    with small_filesystem(workspace / "full", 1) as full:
        (full / "ballast").write_bytes(b"x" * (1024 * 1024 - 8192))
        with pytest.raises(backup.BackupError, match="No space left"):
            backup.take(path, full / backup.backup_name(datetime.now(UTC)))  # refused first
        # From an open connection (the daemon's, the file removed) there is no room check:
        # the copy itself runs out of space.
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.isolation_level = None
            with pytest.raises(backup.BackupError, match="disk is full|No space left"):
                backup.take(conn, full / backup.backup_name(datetime.now(UTC)))
        assert sorted(p.name for p in full.iterdir()) == ["ballast"]  # nothing half-written
    assert sha(path) == checksum
    assert dbfile.check_integrity(path, full=True).ok


# Under a running daemon -------------------------------------------------------------------
def test_a_database_removed_under_the_daemon_halts_it_with_a_backup(workspace: Path) -> None:
    cfg = fake_pipeline_config(
        workspace,
        register={"tiers": [{"name": "primary", "params": {"behaviour": "slow_success"}}]},
    )
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    add_pending_group(db, GROUPS[0], calibrator="3C48")
    db.dispose()
    path = database_file(cfg)
    daemon = start_daemon(cfg, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        stage = None
        while stage != "register" and time.monotonic() < deadline:
            time.sleep(0.05)
            with contextlib.closing(dbfile.read_only_connection(path)) as conn:
                row = conn.execute("SELECT stage FROM groups").fetchone()
                stage = row[0] if row else None
        assert stage == "register"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)  # someone's `rm`
        out, err = daemon.communicate(timeout=60)
    finally:
        daemon.kill()
    assert daemon.returncode == 2, err
    assert "was removed or replaced while the daemon ran" in err
    assert '"event": "database.halted"' in out
    assert not path.exists()  # nothing re-created it
    saved = backup.newest(cfg.path("backups"))
    assert saved is not None and saved.row_counts["groups"] == 1
    # The operator restores the saved state; the disk brings it forward; the night ends.
    restored = cli(cfg, "db", "restore", str(saved.path))
    assert restored.returncode == 0, restored.stderr
    run = cli(cfg, "run", "--until-idle", "--listen", "")
    assert run.returncode == 0, run.stderr
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    with db.read() as s:
        assert s.get(Group, GROUPS[0]).state == "completed"
    assert cli(cfg, "check-state").returncode == 0


# Manifests: later changes, superseded stages, adoption -------------------------------------
def test_a_pruned_measurement_set_stays_pruned_after_a_rebuild(workspace: Path) -> None:
    cfg, db = night(workspace, GROUPS[:2])
    with db.transaction() as s:  # the fake convert's output stands in for a target's MS
        for art in s.scalars(select(Artifact).where(Artifact.stage == "convert")):
            art.kind = "ms"
    pruned = retention.apply_retention(cfg, db, now=datetime.now(UTC) + timedelta(days=30))
    assert [p.group_id for p in pruned] == [GROUPS[1]]  # the target, not the calibrator
    m = manifest.read(cfg.path("products") / GROUPS[1] / "convert")
    assert m is not None and list(m.pruned()) == ["convert.out"]
    db.dispose()
    database_file(cfg).unlink()
    assert cli(cfg, "db", "rebuild").returncode == 0
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    with db.read() as s:
        art = s.scalars(
            select(Artifact).where(Artifact.group_id == GROUPS[1], Artifact.stage == "convert")
        ).one()
        assert art.pruned_rule == pruned[0].rule and art.pruned_at is not None
        assert s.get(Group, GROUPS[1]).state == "completed"
    assert cli(cfg, "check-state").returncode == 0  # a pruned file is not a missing one


def test_a_requeued_stage_is_not_brought_back_by_a_rebuild(workspace: Path) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    requeue_group(db, GROUPS[0], "image", products=cfg.path("products"))
    for stage in ("image", "register"):
        m = manifest.read(cfg.path("products") / GROUPS[0] / stage)
        assert m is not None and m.superseded
    db.dispose()
    database_file(cfg).unlink()
    assert cli(cfg, "db", "rebuild").returncode == 0
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    with db.read() as s:
        g = s.get(Group, GROUPS[0])
        assert (g.state, g.stage) == ("pending", "image")


def test_check_state_repair_adopts_a_committed_orphan_and_never_deletes_the_rest(
    workspace: Path,
) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    products = cfg.path("products")
    # A daemon died between the rename and the commit of register: its directory is on
    # disk, the database still has the group at register (reaped since: from running).
    with db.transaction() as s:
        g = s.get(Group, GROUPS[0])
        art = s.scalars(select(Artifact).where(Artifact.stage == "register")).all()
        for a in art:
            s.delete(a)
        attempt = s.scalars(select(StageAttempt).where(StageAttempt.stage == "register")).one()
        attempt.outcome = "abandoned"
        g.state, g.stage, g.completed_at = "pending", "register", None
        from supervisor.models import Product, Transition

        for p in s.scalars(select(Product)):
            s.delete(p)
        s.add(
            Transition(
                group_id=g.group_id,
                from_state="running",
                to_state="pending",
                stage="register",
                at=g.updated_at,
                actor="reaper",
                correlation_id=g.correlation_id,
            )
        )
    stray = products / GROUPS[0] / "notes"
    stray.mkdir()
    (stray / "x.txt").write_text("nobody's")
    replaced = products / GROUPS[0] / ".image.replaced-image-t9"
    replaced.mkdir()
    (replaced / "image.out").write_text("an older image")

    dry = cli(cfg, "check-state", "--json")
    items = {Path(i["path"]).name: i for i in json.loads(dry.stdout)["items"]}
    assert "adopt it" in items["register"]["repair"]
    assert "lost+found" in items["notes"]["repair"] and "never deleted" in items["notes"]["repair"]
    findings = reconcile.check_state(cfg, db, repair=True)
    assert all(f.repaired for f in findings), findings
    with db.read() as s:
        g = s.get(Group, GROUPS[0])
        assert g.state == "completed"
    lost = next((Path(cfg.workspace) / "lost+found").iterdir()) / GROUPS[0]
    assert (lost / "notes" / "x.txt").read_text() == "nobody's"
    assert (lost / ".image.replaced-image-t9" / "image.out").read_text() == "an older image"
    assert cli(cfg, "check-state").returncode == 0


def test_the_survey_distrusts_broken_chains_and_foreign_directories(
    workspace: Path,
) -> None:
    cfg, db = night(workspace, GROUPS[:1])
    products = cfg.path("products")
    db.dispose()
    database_file(cfg).unlink()
    # A manifest whose token is not above the stage before it: the chain stops there.
    image = manifest.read(products / GROUPS[0] / "image")
    assert image is not None
    data = dict(image.data, fencing_token=1)
    manifest.write(products / GROUPS[0] / "image", data)
    found = rebuild.survey(cfg, None)
    assert [f.manifest.stage for f in found.all()] == ["preflight", "convert", "calibrate"]


# PostgreSQL -------------------------------------------------------------------------------
@pytest.mark.postgres
def test_on_postgresql_backup_names_pg_tools_and_rebuild_works(
    workspace: Path, postgres_url: str, postgres_server: str
) -> None:
    from tests.conftest import _pg_url

    cfg = fake_pipeline_config(workspace, settings={"database": {"url": postgres_url}})
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    for i, gid in enumerate(GROUPS):
        add_pending_group(db, gid, calibrator="3C48" if i == 0 else None)
    run_all(cfg, db)
    before = snapshot(db)
    for args in (("db", "backup"), ("db", "restore", "x.sqlite3")):
        out = cli(cfg, *args)
        assert out.returncode == 2 and "pg_dump" in out.stderr, out.stderr
    db.dispose()
    # The server lost the database: a new, empty one in its place, then db rebuild.
    from sqlalchemy import create_engine, text

    admin = create_engine(_pg_url(postgres_server, "postgres"), isolation_level="AUTOCOMMIT")
    from sqlalchemy.engine import make_url

    name = make_url(postgres_url).database
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    refused = cli(cfg, "run", "--until-idle", "--upgrade", "--listen", "")
    assert refused.returncode == 2 and "does not know 15 committed stage(s)" in refused.stderr
    rebuilt = cli(cfg, "db", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    assert snapshot(db) == before
    # The sequence moved past the sets kept with their ids: the next set gets a new id.
    add_pending_group(db, "2025-10-05T13:00:00", calibrator="3C48")
    run_all(cfg, db)
    with db.read() as s:
        from supervisor.models import CalibrationSet

        assert sorted(s.scalars(select(CalibrationSet.id)).all()) == [1, 2]
    db.dispose()


def test_a_backup_that_finds_the_live_database_corrupt_halts_the_daemon(
    workspace: Path,
) -> None:
    from prometheus_client import REGISTRY

    from supervisor.db import WritesRefused

    cfg, db = night(workspace)
    db.dispose()
    _tear_a_page(database_file(cfg))
    checksum = sha(database_file(cfg))
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    daemon = Daemon(cfg, db, ingest=False)
    with pytest.raises(backup.BackupError, match="integrity_check|malformed"):
        daemon._backup()
    assert daemon.summary.halted and "is corrupt" in daemon.summary.halted
    assert REGISTRY.get_sample_value("contimg_database_halted", {"reason": "corrupt"}) == 1
    report = daemon.health_report()
    assert report["status"] == "unhealthy" and "corrupt" in report["checks"][0]["detail"]
    with pytest.raises(WritesRefused), db.transaction():
        pass
    db.dispose()
    assert sha(database_file(cfg)) == checksum
    assert not list(cfg.path("backups").glob(".*tmp"))  # the failed copy left nothing


def test_a_backup_taken_mid_stage_is_brought_forward_without_rerunning_it(
    workspace: Path,
) -> None:
    """The backup holds a group running under a daemon that has since died, its lease not
    yet expired: the survey must not take that lease for a live one (it did: the group was
    reaped and its committed stages ran again, replacing their products)."""
    slow = {"tiers": [{"name": "primary", "params": {"behaviour": "slow_success"}}]}
    cfg = fake_pipeline_config(workspace, convert=slow)
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(db)
    add_pending_group(db, GROUPS[0], calibrator="3C48")
    db.dispose()
    path = database_file(cfg)
    daemon = start_daemon(cfg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    state = None
    while state != ("running", "convert") and time.monotonic() < deadline:
        time.sleep(0.05)
        with contextlib.closing(dbfile.read_only_connection(path)) as conn:
            state = conn.execute("SELECT state, stage FROM groups").fetchone()
    taken = backup.take(path, workspace / "mid-stage.sqlite3")
    assert daemon.wait(timeout=120) == 0
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    before, files = snapshot(db), products_on_disk(cfg)
    db.dispose()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(taken.path.read_bytes())  # a careless restore, seconds later
    refused = cli(cfg, "run", "--until-idle", "--listen", "")
    assert refused.returncode == 2 and "newer" in refused.stderr, refused.stderr
    assert cli(cfg, "db", "rebuild").returncode == 0
    db = Database(cfg.database_url, busy_timeout_ms=5000)
    attempts = attempts_count(db)
    assert cli(cfg, "run", "--until-idle", "--listen", "").returncode == 0
    assert attempts_count(db) == attempts  # nothing that had committed ran again
    assert products_on_disk(cfg) == files
    after = snapshot(db)
    assert after["committed"] == before["committed"] and after["products"] == before["products"]
