"""Installable as a package, the way the unit runs it: the wheel (not an editable install)
in a fresh virtual environment, used from outside the repository, finds its embedded default
configuration, the calibrator catalogue and the migrations, and runs a group."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import fake_pipeline_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the built wheel; the dependencies come from the test
    environment through a .pth file (a network install of CASA would take minutes)."""
    root = tmp_path_factory.mktemp("pkg")
    dist = root / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            dist,
            REPO,
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch directory
    (wheel,) = dist.glob("contimg_supervisor-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], check=True
    )
    return venv


def run(venv: Path, cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [venv / "bin" / "contimg-supervisor", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
    return done.stdout


def test_the_installed_wheel_runs_a_group_from_outside_the_repository(
    installed: Path, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    (workspace / "incoming").mkdir(parents=True)
    fake_pipeline_config(workspace)
    # The fake stage module lives outside the repository too (it imports stages.protocol,
    # which must now come from the installed wheel).
    modules = tmp_path / "modules"
    modules.mkdir()
    shutil.copy(REPO / "tests" / "fake_stage.py", modules / "fake_stage.py")
    config = workspace / "fake.toml"
    config.write_text(config.read_text().replace('"tests.fake_stage"', '"fake_stage"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    env["PYTHONPATH"] = str(modules)
    common = ("--workspace", str(workspace), "--config", str(config))
    out = run(installed, tmp_path, *common, "config", "check", env=env)
    assert "configuration OK" in out
    assert "at revision 0008" in run(installed, tmp_path, *common, "db", "upgrade", env=env)
    from supervisor.config import load_config
    from supervisor.db import Database
    from tests.conftest import add_pending_group

    # A calibrator group: its calibrate stage reads the shipped calibrator catalogue.
    db = Database(load_config(config, workspace=workspace, environ={}).database_url)
    add_pending_group(db, "2025-10-05T12:30:00")
    db.dispose()
    out = run(installed, tmp_path, *common, "run", "--until-idle", "--listen", "", env=env)
    assert '"event": "run.finished"' in out and '"completed": 1' in out, out[-3000:]
    # It really ran the installed code, not the repository's.
    where = subprocess.run(
        [
            installed / "bin" / "python",
            "-c",
            "import supervisor, stages; print(supervisor.__file__, stages.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=True,
    ).stdout
    assert str(REPO) not in where and "site-packages" in where
