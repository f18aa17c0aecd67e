"""The SQLite state file itself: where it is, whether SQLite finds it intact, how a damaged
one is set aside (never written, never deleted), and the lock that says a daemon is using it.

Everything here works on the file without SQLAlchemy and without the pragmas the engine sets
at connect (``journal_mode=WAL`` is a write): a database that may be damaged is opened
read-only (``mode=ro``), so SQLite neither writes nor checkpoints it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from sqlalchemy.engine import make_url

# SQLite's primary result codes for "the file is damaged" (extended codes keep them in the
# low byte): https://www.sqlite.org/rescode.html
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
CORRUPTION_TEXT = ("database disk image is malformed", "file is not a database")
SIDE_FILES = ("-wal", "-shm", "-journal")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None: PostgreSQL, or an in-memory database)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def is_corruption(exc: BaseException) -> bool:
    """True when ``exc`` (a sqlite3 error, or SQLAlchemy's wrapper of one) says the file is
    damaged: SQLITE_CORRUPT or SQLITE_NOTADB. Busy, locked and unreachable are not."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(code, int) and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
            return True
        if isinstance(current, sqlite3.DatabaseError) and any(
            t in str(current) for t in CORRUPTION_TEXT
        ):
            return True
        current = getattr(current, "orig", None) or current.__cause__
    return False


@dataclass(frozen=True)
class Integrity:
    """What SQLite says of one database file.

    path: the file. exists: False when there is no file (nothing to check). ok: SQLite's
    check answered "ok" (a missing or zero-length file is ok: SQLite reads it as empty).
    report: SQLite's own words (the check's rows, or the error it raised). check: which
    check ran (``quick_check`` or ``integrity_check``).
    """

    path: Path
    exists: bool
    ok: bool
    report: str
    check: str


def check_integrity(path: Path, *, full: bool = False, max_errors: int = 10) -> Integrity:
    """Run ``PRAGMA quick_check`` (or ``integrity_check`` with ``full``) on ``path`` through
    a read-only connection. Raises sqlite3 errors that are not corruption (locked, cannot
    open): those are outages, not damage."""
    pragma = "integrity_check" if full else "quick_check"
    if not path.exists():
        return Integrity(path, False, True, "no database file", pragma)
    try:
        with contextlib.closing(read_only_connection(path)) as conn:
            rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}({int(max_errors)})")]
    except sqlite3.DatabaseError as exc:
        if not is_corruption(exc):
            raise
        return Integrity(path, True, False, f"{type(exc).__name__}: {exc}", pragma)
    ok = rows == ["ok"]
    return Integrity(path, True, ok, "ok" if ok else "; ".join(map(str, rows)), pragma)


def read_only_connection(path: Path, *, timeout_s: float = 30.0) -> sqlite3.Connection:
    """A connection that cannot write ``path`` nor checkpoint its WAL. Without a ``-wal``
    file nobody has the database open (this program's databases are WAL), so it is read as
    immutable: no lock taken, no ``-wal``/``-shm`` created. With one, read-only mode (SQLite
    may then rebuild the ``-shm``, its shared-memory index, but never writes the others)."""
    mode = "mode=ro" if Path(f"{path}-wal").exists() else "mode=ro&immutable=1"
    uri = f"file:{quote(str(path.resolve()))}?{mode}"
    return sqlite3.connect(uri, uri=True, timeout=timeout_s, isolation_level=None)


class DatabaseCorrupt(Exception):
    """The state database is damaged: the program stops and leaves it exactly as it is."""

    def __init__(self, path: Path, report: str, backups: Path | None = None) -> None:
        self.path = path
        self.report = report
        self.backups = backups
        super().__init__(self.explain())

    def explain(self) -> str:
        where = f" (verified backups: {self.backups})" if self.backups else ""
        return (
            f"database {self.path} is corrupt: SQLite reports {self.report!r}. Nothing was "
            f"written to it or to its -wal/-shm. Recover with one of (the service stopped, as "
            f"the service user):\n"
            f"  contimg-supervisor db restore BACKUP   # the newest verified backup{where}, "
            f"brought forward from the products' manifests\n"
            f"  contimg-supervisor db rebuild          # a new database from the products' "
            f"manifests and the incoming files\n"
            f"Either keeps the damaged file and its -wal/-shm under a dated name beside it."
        )


def require_intact(path: Path | None, *, backups: Path | None = None) -> Integrity | None:
    """``quick_check`` the SQLite file at ``path`` before anything opens it for writing;
    raise :class:`DatabaseCorrupt` when SQLite says it is damaged."""
    if path is None:
        return None
    result = check_integrity(path)
    if not result.ok:
        raise DatabaseCorrupt(path, result.report, backups)
    return result


def set_aside(path: Path, *, now: datetime | None = None, why: str = "damaged") -> list[Path]:
    """Move ``path`` and its side files to ``<name>.<why>-<UTC time><suffix>`` beside it
    (a rename, never a copy or a delete); returns the new names."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    moved = []
    for suffix in ("", *SIDE_FILES):
        src = Path(f"{path}{suffix}")
        if not src.exists():
            continue
        dst = Path(f"{path}.{why}-{stamp}{suffix}")
        n = 1
        while dst.exists():
            dst = Path(f"{path}.{why}-{stamp}.{n}{suffix}")
            n += 1
        src.rename(dst)
        moved.append(dst)
    fsync_path(path.parent)
    return moved


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


# The daemon's lock on its workspace -------------------------------------------------------
class WorkspaceBusy(Exception):
    """A daemon holds the workspace's lock (``db restore`` and ``db rebuild`` refuse)."""


def lock_path(state_dir: Path) -> Path:
    return state_dir / "daemon.lock"


def hold_daemon_lock(state_dir: Path) -> int:
    """Take the workspace's lock shared (several daemons may share a workspace's database)
    and return its descriptor: held until it is closed, or the process ends. A file lock,
    not a database row: the database may be the thing that is broken."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(state_dir), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


@contextlib.contextmanager
def daemon_lock(state_dir: Path) -> Iterator[None]:
    """:func:`hold_daemon_lock` for the length of a ``with`` block."""
    fd = hold_daemon_lock(state_dir)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def exclusive_lock(state_dir: Path, command: str) -> Iterator[None]:
    """Held by a command that replaces the database; refuses while any daemon runs here."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(state_dir), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise WorkspaceBusy(
                f"{command}: a daemon is running on this workspace (it holds "
                f"{lock_path(state_dir)}); stop it first: systemctl stop contimg-supervisor"
            ) from None
        yield
    finally:
        os.close(fd)
