"""CASA runs offline with our site config, and its log goes where we say, not into the cwd."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.casaenv import casa_environment, write_site_config

pytestmark = pytest.mark.casa

PROBE = """
import casatasks, casatools
casatasks.casalog.post("contimg probe line")
ms = casatools.measures()
print(ms.observatory("OVRO_MMA")["refer"])
"""


def test_casatasks_imports_offline_and_logs_into_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "attempt-1"
    site = write_site_config(run_dir)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = casa_environment(site, base={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ITRF")  # the measures data (casadata) were found
    assert list(cwd.iterdir()) == [], "CASA must not write casa-*.log into the cwd"
    assert "contimg probe line" in (run_dir / "casa.log").read_text()


def test_without_a_site_config_casa_refuses_offline(tmp_path: Path) -> None:
    """The failure our site config prevents (REPORT.md §5): kept as a canary."""
    proc = subprocess.run(
        [sys.executable, "-c", "import casatasks"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert "AutoUpdatesNotAllowed" in proc.stderr or "measurespath" in proc.stderr
