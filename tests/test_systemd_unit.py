"""The unit file in systemd/: `systemd-analyze verify` is clean and the offline security
review scores it <= 2.0; it runs the daemon the way the code expects (Type=notify with a
watchdog, KillMode=mixed, a stop timeout that covers the drain budget)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import load_config

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "contimg-supervisor.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def local_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's console script (verify
    checks that the command exists)."""
    script = Path(sys.executable).parent / "contimg-supervisor"
    text = UNIT.read_text().replace(
        "/opt/contimg-supervisor/venv/bin/contimg-supervisor", str(script)
    )
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    done = subprocess.run(
        [ANALYZE, "verify", str(local_copy(tmp_path))], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


@needs_analyze
def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(local_copy(tmp_path))],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout[-2000:] + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


def test_unit_matches_what_the_daemon_does() -> None:
    unit = settings()
    cfg = load_config(workspace="/tmp", environ={})
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["KillMode"] == ["mixed"] and unit["Restart"] == ["on-failure"]
    assert unit["User"] == ["contimg"] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"] and unit["ReadWritePaths"]
    assert float(unit["TimeoutStopSec"][0]) >= cfg.daemon.drain_budget_s + cfg.daemon.term_grace_s
    assert unit["ExecStart"][0].endswith("contimg-supervisor run --upgrade")
    # Exit 2 (corrupt database, refused start) must not restart-loop: RestartPreventExitStatus
    # covers ExecStart only, so nothing that can exit 2 runs as ExecStartPre.
    assert "ExecStartPre" not in unit and unit["RestartPreventExitStatus"] == ["2"]
    assert cfg.paths.backups.startswith("state/")  # default: inside the workspace
    production = load_config(
        Path(__file__).parents[1] / "config" / "production.example.toml", environ={}
    )
    assert production.path("backups").as_posix() in unit["ReadWritePaths"][0].split()
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # The watchdog must outlast a database busy wait and the loop's heartbeat period.
    watchdog = float(unit["WatchdogSec"][0])
    assert watchdog >= 2 * cfg.daemon.heartbeat_row_s
    assert watchdog * 1000 > cfg.database.busy_timeout_ms
    assert "StartLimitBurst" in unit and "StartLimitIntervalSec" in unit
