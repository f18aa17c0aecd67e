"""check-state on workspaces damaged on purpose (dry run, then --repair, then the pipeline
finishes what was requeued); retention on a small night; retiring a calibration set."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from supervisor import calibration, reconcile, retention
from supervisor.config import Config
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import (
    Artifact,
    CalibrationSet,
    Group,
    Product,
    StageAttempt,
)
from supervisor.operator import calibration_sets
from supervisor.states import Actor, State, transition
from tests.conftest import add_pending_group, fake_pipeline_config

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
G1, G2, G3 = "2025-10-05T12:30:00", "2025-10-05T12:35:09", "2025-10-05T12:40:18"


def run_all(cfg: Config, db: Database) -> None:
    Daemon(cfg, db, ingest=False, rng=random.Random(0)).run(until_idle=True)


def cli(cfg: Config, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    return subprocess.run(
        [SCRIPT, "--workspace", cfg.workspace, "--config", f"{cfg.workspace}/fake.toml", *args],
        capture_output=True,
        text=True,
        env=env,
    )


def artifact_path(db: Database, gid: str, stage: str) -> Path:
    with db.transaction() as s:
        return Path(
            s.scalars(
                select(Artifact.path).where(Artifact.group_id == gid, Artifact.stage == stage)
            ).one()
        )


def test_check_state_finds_damage_repairs_it_and_the_pipeline_finishes(
    workspace: Path, sqlite_db: Database
) -> None:
    cfg = fake_pipeline_config(workspace)
    for gid in (G1, G2):
        add_pending_group(sqlite_db, gid)
    run_all(cfg, sqlite_db)
    assert cli(cfg, "check-state").returncode == 0  # a clean night agrees with its disk

    # Damage: a deleted convert output (G1), a calibration table gone, an orphan staging
    # area, an unowned product directory (the rename-before-commit window), a stale
    # 'running' attempt, and a group running under a lease that expired on another node.
    artifact_path(sqlite_db, G1, "convert").unlink()
    table = workspace / "products" / "cal" / "B.bcal"
    table.parent.mkdir(parents=True)
    table.write_text("x")
    now = datetime.now(UTC)
    with sqlite_db.transaction() as s:
        cal_set = calibration.register_solution(
            s, s.get(Group, G2), {"caltable_B": table}, {}, cfg, now
        )
        set_id = cal_set.id
    table.unlink()
    orphan_staging = cfg.path("staging") / G2 / "image-t99"
    orphan_staging.mkdir(parents=True)
    add_pending_group(sqlite_db, G3)
    orphan_product = cfg.path("products") / G3 / "preflight"
    orphan_product.mkdir(parents=True)
    (orphan_product / "preflight.out").write_text("renamed, never committed")
    with sqlite_db.transaction() as s:
        s.add(
            StageAttempt(
                group_id=G2,
                stage="image",
                attempt=1,
                fallback_tier=0,
                fencing_token=1,
                outcome="running",
                owner="elsewhere:1:1.0",
                workdir="/nowhere",
                started_at=now,
                correlation_id="c",
            )
        )
        g3 = s.get(Group, G3)
        transition(
            s,
            g3,
            State.RUNNING,
            now=now,
            actor=Actor("another-node:42:1.0"),
            set_fields={
                "lease_owner": "another-node:42:1.0",
                "lease_expires_at": now - timedelta(minutes=5),
                "fencing_token": 7,
            },
        )

    dry = cli(cfg, "check-state", "--json")
    assert dry.returncode == 1
    report = json.loads(dry.stdout)
    assert report["mode"] == "dry run" and report["repaired"] == 0
    assert report["by_kind"] == {
        "missing_output": 1,
        "missing_caltable": 1,
        "orphan_staging": 1,
        "orphan_product_dir": 1,
        "expired_lease": 1,
        "orphan_attempt": 1,
    }
    items = {i["kind"]: i for i in report["items"]}
    assert items["missing_output"]["group_id"] == G1
    assert items["missing_output"]["repair"] == "requeue the group from convert"
    assert orphan_staging.exists() and orphan_product.exists()  # a dry run changes nothing

    findings = reconcile.check_state(cfg, sqlite_db, repair=True)
    assert findings and all(f.repaired for f in findings), [f for f in findings if not f.repaired]
    assert not orphan_staging.exists() and not orphan_product.exists()
    # Never deleted: a product directory nothing accounts for goes to lost+found.
    kept = next((workspace / "lost+found").iterdir()) / G3 / "preflight" / "preflight.out"
    assert kept.read_text() == "renamed, never committed"
    with sqlite_db.transaction() as s:
        g1, g3 = s.get(Group, G1), s.get(Group, G3)
        assert (g1.state, g1.stage) == ("pending", "convert")
        assert "check-state" in g1.state_reason
        assert (g3.state, g3.stage) == ("pending", "preflight")
        assert s.get(CalibrationSet, set_id).status == "invalid"
        assert "tables missing" in s.get(CalibrationSet, set_id).status_reason
        assert not s.scalars(select(StageAttempt).where(StageAttempt.outcome == "running")).all()
    run_all(cfg, sqlite_db)
    with sqlite_db.transaction() as s:
        assert {g.group_id: g.state for g in s.scalars(select(Group))} == {
            G1: "completed",
            G2: "completed",
            G3: "completed",
        }
    assert artifact_path(sqlite_db, G1, "convert").exists()
    assert cli(cfg, "check-state").returncode == 0


def _completed_group(
    db: Database, cfg: Config, gid: str, *, calibrator: bool, age_days: float
) -> Path:
    """A completed group with an MS artifact and product row, completed ``age_days`` ago."""
    add_pending_group(db, gid, calibrator="3C48" if calibrator else None)
    ms = cfg.path("products") / gid / "convert" / f"{gid}.ms"
    ms.mkdir(parents=True)
    (ms / "table.dat").write_bytes(b"x" * 1000)
    image = cfg.path("products") / gid / "image" / "image.fits"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"y" * 100)
    done = datetime.now(UTC) - timedelta(days=age_days)
    with db.transaction() as s:
        for kind, path, stage in (("ms", ms, "convert"), ("image_fits", image, "image")):
            s.add(
                Artifact(
                    group_id=gid,
                    stage=stage,
                    kind=kind,
                    path=str(path),
                    bytes=reconcile.artifact_size(path),
                    created_at=done,
                )
            )
            s.add(Product(group_id=gid, kind=kind, path=str(path), created_at=done))
        g = s.get(Group, gid)
        for to in (State.RUNNING, State.COMPLETED):
            transition(s, g, to, now=done, actor=Actor("test"), set_fields={"completed_at": done})
    return ms


def test_retention_prunes_only_old_target_ms_and_records_it(
    workspace: Path, sqlite_db: Database
) -> None:
    cfg = fake_pipeline_config(workspace)
    old_target = _completed_group(sqlite_db, cfg, G1, calibrator=False, age_days=8)
    old_calibrator = _completed_group(sqlite_db, cfg, G2, calibrator=True, age_days=8)
    young_target = _completed_group(sqlite_db, cfg, G3, calibrator=False, age_days=1)
    running = "2025-10-05T12:45:27"
    add_pending_group(sqlite_db, running, calibrator=None)
    raw = workspace / "incoming" / "2025-10-05T12:30:00_sb00.hdf5"
    raw.write_bytes(b"raw")

    pruned = retention.apply_retention(cfg, sqlite_db)
    assert [(p.group_id, p.rule) for p in pruned] == [(G1, "target_ms_after_7d")]
    assert not old_target.exists()
    assert old_calibrator.exists() and young_target.exists() and raw.read_bytes() == b"raw"
    assert (cfg.path("products") / G1 / "image" / "image.fits").exists()  # images stay
    with sqlite_db.transaction() as s:
        art = s.scalars(select(Artifact).where(Artifact.path == str(old_target))).one()
        prod = s.scalars(select(Product).where(Product.path == str(old_target))).one()
        assert art.pruned_rule == prod.pruned_rule == "target_ms_after_7d"
        assert art.pruned_at is not None
    assert retention.apply_retention(cfg, sqlite_db) == []  # idempotent
    shown = cli(cfg, "show", G1)
    assert "pruned" in shown.stdout and "target_ms_after_7d" in shown.stdout
    # A pruned MS is not damage.
    assert not [f for f in reconcile.check_state(cfg, sqlite_db) if f.group_id == G1]


def test_retiring_a_set_changes_what_a_new_target_uses(
    workspace: Path, sqlite_db: Database
) -> None:
    cfg = fake_pipeline_config(workspace)
    older, newer, target = "2025-10-05T11:00:00", "2025-10-05T12:00:00", "2025-10-05T12:30:00"
    now = datetime.now(UTC)
    ids = {}
    for gid in (older, newer):
        add_pending_group(sqlite_db, gid)
        with sqlite_db.transaction() as s:
            g = s.get(Group, gid)
            ids[gid] = calibration.register_solution(
                s, g, {}, {"bandpass_snr_median": 40.0}, cfg, now
            ).id
            for to in (State.RUNNING, State.COMPLETED):
                transition(s, g, to, now=now, actor=Actor("test"))
    used_by = "2025-10-05T12:10:00"
    add_pending_group(sqlite_db, used_by, calibrator=None)
    with sqlite_db.transaction() as s:
        s.add(
            Product(
                group_id=used_by,
                kind="qa",
                calibration_set_id=ids[newer],
                calibration_tier="valid_window",
                created_at=now,
            )
        )
        g = s.get(Group, used_by)
        for to in (State.RUNNING, State.COMPLETED):
            transition(s, g, to, now=now, actor=Actor("test"))
    add_pending_group(sqlite_db, target, calibrator=None)
    with sqlite_db.transaction() as s:
        assert (
            calibration.plan_for(s, s.get(Group, target), cfg, "valid_window").set_id == ids[newer]
        )

    listed = {c["id"]: c for c in calibration_sets(sqlite_db)}
    assert listed[ids[newer]]["groups_using"] == 1 and listed[ids[newer]]["status"] == "valid"
    out = cli(cfg, "calibration", "retire", str(ids[newer]), "--reason", "bad bandpass at night")
    assert out.returncode == 0, out.stderr
    assert f"requeue {used_by} --from-stage calibrate" in out.stdout
    with sqlite_db.transaction() as s:
        plan = calibration.plan_for(s, s.get(Group, target), cfg, "valid_window")
        assert plan.set_id == ids[older]
        assert s.get(CalibrationSet, ids[newer]).status == "retired"
    shown = json.loads(cli(cfg, "calibration", "show", str(ids[newer]), "--json").stdout)
    assert shown["status"] == "retired" and "bad bandpass" in shown["status_reason"]
    assert json.loads(cli(cfg, "calibration", "list", "--json").stdout)[0]["id"] in ids.values()
    again = cli(cfg, "calibration", "retire", str(ids[newer]), "--reason", "twice")
    assert again.returncode == 1 and "already retired" in again.stderr
