"""Files a root-run command left behind (DOMAIN.md, failure mode 8): the daemon, run as the
service user, names every directory and database file it cannot write and does not start;
root is refused in a workspace another user owns; a group whose own directory cannot be
written fails with its own code and the fix, not as a supervisor bug."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

# What `run` imports lazily, imported before a fork drops to uid 65534 (see as_nobody).
import supervisor.listener  # noqa: F401
import supervisor.logs  # noqa: F401
import supervisor.notify  # noqa: F401
from supervisor import cli, health, migrate, writable
from supervisor import executor as executor_module
from supervisor.daemon import Daemon
from supervisor.db import Database
from supervisor.models import Group, StageAttempt, Transition
from supervisor.reconcile import check_state
from tests.conftest import add_pending_group, fake_pipeline_config

NOBODY = 65534
GID = "2025-10-05T12:30:00"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="changes owners and drops to uid 65534: needs root"
)


@pytest.fixture
def open_workspace() -> Iterator[Path]:
    """A workspace another user can reach (pytest's own temporary tree is root's, 0700)."""
    top = Path(tempfile.mkdtemp(prefix="contimg-writable-", dir="/tmp"))
    top.chmod(0o755)
    ws = top / "ws"
    (ws / "incoming").mkdir(parents=True)
    try:
        yield ws
    finally:
        shutil.rmtree(top, ignore_errors=True)


def chown_tree(path: Path, uid: int) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid, follow_symlinks=False)


def as_nobody(work: Path, fn: Callable[[], int]) -> tuple[int, str, str]:
    """Run ``fn`` in a forked child that dropped to uid/gid 65534: its exit code, stdout and
    stderr. Only code already imported can run there: the interpreter's own files live
    under /root, which uid 65534 cannot read."""
    out_path, err_path = work / "child-stdout.txt", work / "child-stderr.txt"
    pid = os.fork()
    if pid == 0:  # the child
        code = 99
        try:
            sys.stdout, sys.stderr = out_path.open("w"), err_path.open("w")
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = fn()
        except BaseException as exc:  # noqa: BLE001 - report it to the parent
            print(f"child raised {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + 60
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:  # e.g. a lock another thread held at the fork
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the uid 65534 child hung; stderr: {err_path.read_text()}")
        time.sleep(0.02)
    return os.waitstatus_to_exitcode(waited[1]), out_path.read_text(), err_path.read_text()


@needs_root
def test_the_daemon_names_what_a_root_run_left_and_does_not_start(open_workspace: Path) -> None:
    ws = open_workspace
    cfg = fake_pipeline_config(ws)
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    add_pending_group(db, GID)
    db.dispose()
    chown_tree(ws, NOBODY)
    # What `sudo contimg-supervisor run` would have made: products/ and a SQLite side file.
    products = ws / "products"
    products.mkdir(mode=0o755)
    shm = Path(cfg.state_dir) / "contimg.sqlite3-shm"
    shm.write_bytes(b"")
    shm.chmod(0o644)
    argv = ["--workspace", str(ws), "--config", str(ws / "fake.toml"), "run", "--until-idle"]

    code, _out, err = as_nobody(ws.parent, lambda: cli.main([*argv, "--listen", ""]))

    assert code == 2, err
    assert "runs as nobody (uid 65534) and cannot write where the daemon writes" in err
    assert f"{products} (root:root, drwxr-xr-x) is not writable" in err
    assert f"{shm} (root:root, -rw-r--r--) is not writable" in err
    assert f"chown -R nobody: {products} {shm}" in err
    with Database(cfg.database_url).transaction() as s:  # nothing was claimed
        assert s.scalar(select(Group.state).where(Group.group_id == GID)) == "pending"

    # The same workspace given back to the service user: nothing to report.
    chown_tree(ws, NOBODY)
    code, _out, err = as_nobody(ws.parent, lambda: len(writable.workspace_problems(cfg)))
    assert (code, err) == (0, "")

    # One pending group's stage directory made by root: named at start, the rest runs.
    stage_dir = products / GID / "preflight"
    stage_dir.mkdir(parents=True)
    os.chown(products / GID, NOBODY, NOBODY)

    def group_check() -> int:
        db = Database(cfg.database_url)
        print("\n".join(str(p) for p in writable.open_group_problems(cfg, db)))
        db.dispose()
        return 0

    code, out, err = as_nobody(ws.parent, group_check)
    assert code == 0, err
    assert out.splitlines() == [f"{stage_dir} (root:root, drwxr-xr-x) is not writable"]


@needs_root
def test_a_missing_directory_needs_a_writable_parent_and_health_says_so(
    open_workspace: Path,
) -> None:
    ws = open_workspace
    cfg = fake_pipeline_config(ws)
    chown_tree(ws, NOBODY)
    os.chown(ws, 0, 0)  # root made the workspace itself; staging does not exist yet

    def child() -> int:
        problems = writable.workspace_problems(cfg)
        check = health._writable(cfg)
        print(json.dumps({"problems": [str(p) for p in problems], "check": check.as_dict()}))
        return 0

    code, out, err = as_nobody(ws.parent, child)
    assert code == 0, err
    report = json.loads(out)
    assert f"cannot create {ws / 'staging'}: its parent {ws} (root:root" in " ".join(
        report["problems"]
    )
    assert report["check"]["name"] == "writable" and report["check"]["status"] == "unhealthy"


@needs_root
def test_root_is_refused_in_a_workspace_the_service_user_owns(
    open_workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = open_workspace
    fake_pipeline_config(ws)
    chown_tree(ws, NOBODY)
    argv = ["--workspace", str(ws), "--config", str(ws / "fake.toml"), "status"]

    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"running as root in workspace {ws}, which nobody owns" in err
    assert f"sudo -u nobody contimg-supervisor --workspace {ws}" in err
    assert not (ws / "state").exists()  # it did not even create the database
    # Commands that touch neither the workspace nor the database still run.
    assert cli.main(["--workspace", str(ws), "config", "check"]) == 0


def test_a_group_directory_it_cannot_write_fails_the_group_with_the_fix(
    workspace: Path, sqlite_db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Classified (``permission_denied``, naming the path and the chown), not a
    ``supervisor_error``; root cannot be denied, so the rename's error is raised for it."""
    cfg = fake_pipeline_config(workspace)
    add_pending_group(sqlite_db, GID)
    denied = cfg.path("products") / GID / "preflight"

    def publish(staged: Path, final_dir: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(final_dir))

    monkeypatch.setattr(executor_module, "publish", publish)
    Daemon(cfg, sqlite_db, ingest=False, rng=random.Random(0)).run(until_idle=True)
    with sqlite_db.transaction() as s:
        g = s.get(Group, GID)
        assert (g.state, g.stage, g.error_code) == ("failed", "preflight", "permission_denied")
        assert f"cannot write {denied}: Permission denied" in g.state_reason
        last = s.scalars(select(Transition).order_by(Transition.id.desc())).first()
        assert last.hint.startswith("another user (often root) made it: chown -R ")
        assert f": {denied}, then `retry` the group" in last.hint
        # Its attempt ended with it (not left `running` for check-state to find).
        (attempt,) = s.scalars(select(StageAttempt)).all()
        assert (attempt.outcome, attempt.error_code) == ("failed", "permission_denied")
    assert check_state(cfg, sqlite_db) == []
