"""Can this process write every place the daemon writes? A command once run as root leaves
root-owned directories and database files that the service user cannot write (DOMAIN.md,
failure mode 8); found here at start-up, each named with its owner and the fix, instead of
failing the groups that reach them one by one.

Checked: the workspace directories (products, staging, logs, state, tmpfs staging; a missing
one needs a writable parent to be made), the SQLite database and its ``-wal``/``-shm``/
``-journal`` files, and the per-group directories of every group that still has work
(``products/<group>``, ``staging/<group>``, ``logs/<group>`` and their stage directories).
Completed groups' directories are not walked: the daemon does not write them again, and a
year of them is ~100 000 directories.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import make_url, select

from supervisor.config import Config
from supervisor.db import Database
from supervisor.models import Group
from supervisor.resources import existing_ancestor
from supervisor.states import TERMINAL

WORKSPACE_DIRS = ("products", "staging", "logs", "state", "tmpfs_staging")
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


@dataclass(frozen=True)
class Unwritable:
    """A path this process needs to write and cannot.

    path: the directory or file. owner: ``user:group`` owning it. mode: its permission bits
    as ``ls -l`` prints them. missing: the path does not exist and this is the existing
    parent it would be made in.
    """

    path: Path
    owner: str
    mode: str
    missing: Path | None = None

    def __str__(self) -> str:
        what = f"{self.path} ({self.owner}, {self.mode})"
        if self.missing is not None:
            return f"cannot create {self.missing}: its parent {what} is not writable"
        return f"{what} is not writable"


def process_user() -> str:
    """``user (uid N)`` of this process's effective uid, for messages."""
    uid = os.geteuid()
    return f"{_user_name(uid)} (uid {uid})"


def chown_hint(paths: Iterable[object]) -> str:
    """The command that gives ``paths`` back to this process's user."""
    listed = " ".join(sorted({str(p) for p in paths}))
    return f"chown -R {_user_name(os.geteuid())}: {listed}"


def foreign_owner_of_workspace(cfg: Config) -> str | None:
    """The owner of the workspace when this process is root and the workspace belongs to
    another user (None otherwise): root would leave files there that user cannot write."""
    if os.geteuid() != 0:
        return None
    try:
        uid = Path(cfg.workspace).stat().st_uid
    except OSError:
        return None
    return None if uid == 0 else _user_name(uid)


def sqlite_files(database_url: str) -> list[Path]:
    """The SQLite database file and its side files ([] for another database)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return []
    db = Path(url.database)
    return [db.with_name(db.name + suffix) for suffix in SQLITE_SUFFIXES]


def workspace_problems(cfg: Config) -> list[Unwritable]:
    """The workspace directories and the database files (no database query: this runs
    before the database is opened, which a root-owned ``-shm`` would already break)."""
    dirs = [cfg.path(name) for name in WORKSPACE_DIRS if getattr(cfg.paths, name)]
    files = sqlite_files(cfg.database_url)
    if files:
        dirs.append(files[0].parent)
    return _check(dirs, files)


def group_problems(cfg: Config, group_ids: Iterable[str]) -> list[Unwritable]:
    """The per-group directories (and their stage directories) of ``group_ids``."""
    dirs: list[Path] = []
    for group_id in group_ids:
        for top in ("products", "staging", "logs"):
            group_dir = cfg.path(top) / group_id
            if group_dir.is_dir():
                dirs.append(group_dir)
                dirs += [p for p in group_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    return _check(dirs, [])


def open_group_problems(cfg: Config, db: Database) -> list[Unwritable]:
    """:func:`group_problems` of every group not yet completed, failed or quarantined."""
    terminal = [state.value for state in TERMINAL]
    with db.read() as s:
        open_ids = s.scalars(select(Group.group_id).where(Group.state.not_in(terminal))).all()
    return group_problems(cfg, open_ids)


def explain(problems: list[Unwritable]) -> str:
    """The operator's message: who this process is, every path it cannot write, the fix."""
    lines = [f"this process runs as {process_user()} and cannot write where the daemon writes:"]
    lines += [f"  {p}" for p in problems]
    lines.append(
        f"  (a command run as another user, often root, made them) fix: "
        f"{chown_hint(p.path for p in problems)}, or run as the user who owns the workspace"
    )
    return "\n".join(lines)


def _check(dirs: Iterable[Path], files: Iterable[Path]) -> list[Unwritable]:
    problems: list[Unwritable] = []
    seen: set[Path] = set()
    for d in dirs:
        if d in seen:
            continue
        seen.add(d)
        if d.exists():
            if not os.access(d, os.W_OK | os.X_OK):
                problems.append(_describe(d))
            continue
        parent = existing_ancestor(d)
        if not os.access(parent, os.W_OK | os.X_OK):
            problems.append(_describe(parent, missing=d))
    for f in files:
        if f.exists() and not os.access(f, os.W_OK):
            problems.append(_describe(f))
    return problems


def _describe(path: Path, missing: Path | None = None) -> Unwritable:
    st = path.stat()
    owner = f"{_user_name(st.st_uid)}:{_group_name(st.st_gid)}"
    return Unwritable(path, owner, stat.filemode(st.st_mode), missing)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
