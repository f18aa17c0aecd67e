"""Operator commands: show, retry, requeue, quarantine — allowed moves, refusals, audit."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.operator import (
    ForbiddenAction,
    GroupNotFound,
    quarantine_group,
    requeue_group,
    retry_group,
    show_group,
)
from supervisor.states import State
from tests.conftest import add_pending_group, fake_pipeline_config

GID = "2025-10-05T12:30:00"
SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")


def failing_then_fixed(workspace: Path, db: Database):  # noqa: ANN201
    cfg = fake_pipeline_config(
        workspace,
        image={
            "max_attempts": 1,
            "tiers": [{"name": "primary", "params": {"behaviour": "raise", "message": "weird"}}],
        },
    )
    add_pending_group(db, GID)
    Daemon(cfg, db, ingest=False, rng=random.Random(0)).run(until_idle=True)
    return cfg


def test_show_has_the_full_history(workspace: Path, sqlite_db: Database) -> None:
    failing_then_fixed(workspace, sqlite_db)
    info = show_group(sqlite_db, GID)
    assert info["state"] == "failed"
    assert [t["to"] for t in info["transitions"]][:3] == ["collecting", "pending", "running"]
    last = info["transitions"][-1]
    assert (last["to"], last["category"], last["code"]) == ("failed", "fatal", "unclassified")
    assert last["hint"] and last["stage"] == "image"
    assert [a["stage"] for a in info["attempts"]] == ["preflight", "convert", "calibrate", "image"]
    assert info["attempts"][-1]["error"]["message"].endswith("RuntimeError: weird")
    assert len(info["artifacts"]) == 3
    with pytest.raises(GroupNotFound):
        show_group(sqlite_db, "2000-01-01T00:00:00")


def test_retry_resumes_at_the_checkpoint_with_fresh_budgets(
    workspace: Path, sqlite_db: Database
) -> None:
    failing_then_fixed(workspace, sqlite_db)
    group = retry_group(sqlite_db, GID)
    assert (group.state, group.stage, group.attempt, group.crash_count) == (
        "pending",
        "image",
        0,
        0,
    )
    assert show_group(sqlite_db, GID)["transitions"][-1]["actor"].startswith("operator:")
    with pytest.raises(ForbiddenAction, match="is pending"):
        retry_group(sqlite_db, GID)


def test_requeue_only_to_committed_stages(workspace: Path, sqlite_db: Database) -> None:
    cfg = fake_pipeline_config(workspace)
    add_pending_group(sqlite_db, GID)
    Daemon(cfg, sqlite_db, ingest=False).run(until_idle=True)
    assert requeue_group(sqlite_db, GID, "calibrate").stage == "calibrate"
    with pytest.raises(ForbiddenAction, match="never committed"):
        requeue_group(sqlite_db, GID, "register")
    assert requeue_group(sqlite_db, GID, "convert").stage == "convert"
    with pytest.raises(ForbiddenAction, match="unknown stage"):
        requeue_group(sqlite_db, GID, "dance")
    Daemon(cfg, sqlite_db, ingest=False).run(until_idle=True)
    info = show_group(sqlite_db, GID)
    assert info["state"] == State.COMPLETED
    assert [a["stage"] for a in info["attempts"]].count("convert") == 2
    assert len(info["artifacts"]) == 5  # re-run stages replaced their rows, not duplicated


def test_quarantine(sqlite_db: Database) -> None:
    add_pending_group(sqlite_db, GID)
    group = quarantine_group(sqlite_db, GID, "RFI storm over OVRO")
    assert (group.state, group.error_code, group.state_reason) == (
        "quarantined",
        "operator_quarantine",
        "RFI storm over OVRO",
    )
    with pytest.raises(ForbiddenAction, match="already quarantined"):
        quarantine_group(sqlite_db, GID, "again")
    assert retry_group(sqlite_db, GID).state == "pending"


def test_cli_exit_codes(workspace: Path, sqlite_db: Database) -> None:
    failing_then_fixed(workspace, sqlite_db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [SCRIPT, "--workspace", str(workspace), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    shown = cli("show", GID, "--json")
    assert shown.returncode == 0
    assert {"group_id", "state", "transitions", "attempts"} <= set(json.loads(shown.stdout))
    assert "hint:" in cli("show", GID).stdout
    assert cli("show", "1999-01-01T00:00:00").returncode == 1
    assert cli("requeue", GID, "--from-stage", "register").returncode == 2
    assert cli("retry", GID).returncode == 0
    assert cli("retry", GID).returncode == 2
    assert cli("quarantine", GID, "--reason", "bad night").returncode == 0
    status = json.loads(cli("status", "--json").stdout)
    assert status["states"]["quarantined"] == 1
    assert status["recent_failures"][0]["code"] == "operator_quarantine"
