"""The command line as an operator uses it: a fresh workspace, exit codes, JSON shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):  # noqa: ANN201
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    return subprocess.run(
        [SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, **(env or {})},
        cwd=cwd,
    )


def test_from_nothing_simulate_upgrade_ingest_status(tmp_path: Path) -> None:
    ws = tmp_path / "W"
    sim = run(
        "--workspace",
        str(ws),
        "simulate",
        str(ws / "incoming"),
        "--groups",
        "2",
        "--calibrator",
        "3C48",
        "--json",
    )
    assert sim.returncode == 0, sim.stderr
    simulated = json.loads(sim.stdout)
    assert [g["files"] for g in simulated["groups"]] == [16, 16]
    assert simulated["groups"][0]["calibrator"] == "3C48"

    # Every command refuses a database that was never migrated, and says what to do.
    early = run("--workspace", str(ws), "status")
    assert early.returncode == 2 and "db upgrade" in early.stderr

    assert run("--workspace", str(ws), "db", "upgrade").returncode == 0
    ingest = run("--workspace", str(ws), "ingest", "--once", "--json")
    assert ingest.returncode == 0, ingest.stderr
    report = json.loads(ingest.stdout)
    assert sorted(report["groups_pending"]) == sorted(g["group_id"] for g in simulated["groups"])

    # The environment variable works as well as the flag; options may follow the command.
    status = run("status", "--json", env={"CONTIMG_WORKSPACE": str(ws)})
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["states"]["pending"] == 2
    assert [g["group_id"] for g in body["groups"]] == sorted(
        (g["group_id"] for g in simulated["groups"]), reverse=True
    )  # newest first
    assert {"group_id", "state"} <= set(body["groups"][0])
    assert run("status", "--workspace", str(ws)).returncode == 0
    assert run("--workspace", str(ws), "db", "check").returncode == 0


def test_fault_options_reach_ingest(tmp_path: Path) -> None:
    ws = tmp_path / "W"
    assert (
        run(
            "--workspace",
            str(ws),
            "simulate",
            str(ws / "incoming"),
            "--drop",
            "0:7",
            "--garbage",
            "3",
        ).returncode
        == 0
    )
    assert run("--workspace", str(ws), "db", "upgrade").returncode == 0
    out = run("--workspace", str(ws), "ingest", "--once")
    assert out.returncode == 0
    assert "rejected [validation/not_hdf5]" in out.stdout
    status = json.loads(run("--workspace", str(ws), "status", "--json").stdout)
    (group,) = status["groups"]
    assert group["state"] == "collecting" and group["files_ready"] == 14


def test_config_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[ingest]\ngroup_deadline_s = 600\n")
    ok = run("config", "check", str(good), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ingest"]["group_deadline_s"] == 600
    bad = tmp_path / "bad.toml"
    bad.write_text("[ingest]\ngroup_deadline_s = -1\ntypo = 3\n")
    out = run("config", "check", str(bad))
    assert out.returncode == 2
    assert "ingest.group_deadline_s = -1: must be > 0" in out.stderr
    assert "ingest.typo: unknown key" in out.stderr
    env_bad = run("config", "check", env={"CONTIMG_INGEST__POLL_INTERVAL_S": "x"})
    assert env_bad.returncode == 2 and "CONTIMG_INGEST__POLL_INTERVAL_S" in env_bad.stderr


@pytest.mark.parametrize(
    "args", [["simulate", "out", "--drop", "x:y"], ["simulate", "out", "--jitter", "99"]]
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    out = run("--workspace", str(tmp_path), *args, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error:")


def test_demo_refuses_a_workspace_that_is_not_a_demo_workspace(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("do not delete")
    out = run("--workspace", str(tmp_path), "demo")
    assert out.returncode == 2 and "not a demo workspace" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "do not delete"


def test_every_command_prints_its_help() -> None:
    """`--help` of each subcommand renders (a bare % in a help string broke `simulate`)."""
    import argparse

    from supervisor.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(commands.choices) >= 10
    for name, sub in commands.choices.items():
        text = sub.format_help()
        assert name in text and "usage:" in text


def test_a_batch_run_on_a_full_disk_exits_1_naming_the_reason(tmp_path: Path) -> None:
    # Nothing will free the disk: run --until-idle says so and stops (exit 1, "degraded")
    # instead of waiting for ever, and the group stays pending for the next run.
    ws = tmp_path / "W"
    assert run("--workspace", str(ws), "simulate", str(ws / "incoming")).returncode == 0
    assert run("--workspace", str(ws), "db", "upgrade").returncode == 0
    full_disk = {
        "CONTIMG_RESOURCES__MIN_FREE_DISK_GB": "1000000",
        "CONTIMG_DAEMON__STALL_EXIT_S": "0.5",
        "CONTIMG_DAEMON__IDLE_POLL_S": "0.2",
        "CONTIMG_INGEST__STABILITY_INTERVAL_S": "0",
    }
    done = run("--workspace", str(ws), "run", "--until-idle", "--listen", "", env=full_disk)
    assert done.returncode == 1, done.stderr
    assert "stalled: work remains but cannot start (preflight: disk: needs" in done.stderr
    finished = json.loads(done.stdout.strip().splitlines()[-1])
    assert finished["attempts"] == 0 and "preflight" in finished["stalled"]
    status = json.loads(run("--workspace", str(ws), "status", "--json").stdout)
    assert {k: v for k, v in status["states"].items() if v} == {"pending": 1}
