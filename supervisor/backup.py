"""Verified online backups of the SQLite state database: taken with SQLite's backup API from
a read connection while the daemon runs, each copy checked (``integrity_check`` and the row
count of every table, read in the same snapshot the copy was taken from), kept in
generations (hourly for ``backup.keep_hourly_h``, daily for ``backup.keep_daily_d``), and
restored only after the same verification.

A backup is ``contimg-<UTC time>.sqlite3`` with a sidecar ``….json`` (time, source, schema
revision, row counts, integrity verdict, size, sha256): the sidecar is written last, so a
copy without one was never verified and is not a backup.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from supervisor import dbfile

log = structlog.get_logger(__name__)

NAME_RE = re.compile(r"^contimg-(\d{8}T\d{6}(?:\.\d{6})?Z)\.sqlite3$")
STAMP = "%Y%m%dT%H%M%S.%fZ"


class BackupError(Exception):
    """A backup could not be taken or verified; ``str`` names the file and the reason."""


@dataclass(frozen=True)
class Backup:
    """One verified backup.

    path: the copy. taken_at: when its snapshot was read (UTC). row_counts: rows per table
    in that snapshot. schema_revision: Alembic's revision in it. bytes: the copy's size.
    """

    path: Path
    taken_at: datetime
    row_counts: dict[str, int]
    schema_revision: str | None
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "taken_at": self.taken_at.isoformat(),
            "row_counts": self.row_counts,
            "schema_revision": self.schema_revision,
            "bytes": self.bytes,
        }


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name"
        )
    ]


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {
        t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in _tables(conn)
    }


def _revision(conn: sqlite3.Connection) -> str | None:
    with contextlib.suppress(sqlite3.DatabaseError):
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        return row[0] if row else None
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def take(
    source: Path | sqlite3.Connection,
    out: Path,
    *,
    now: datetime | None = None,
    source_name: str | None = None,
) -> Backup:
    """Copy the database (a file, opened read-only, or an open connection: the daemon's own
    when the file was unlinked under it) to ``out``, verify the copy, fsync it and write
    its sidecar. Raises :class:`BackupError`; a failed copy leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, Path):
        _require_room(source, out.parent)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    own = isinstance(source, Path)
    conn = dbfile.read_only_connection(source) if isinstance(source, Path) else source
    taken_at = now or datetime.now(UTC)
    try:
        # One read transaction: the counts and the copy see the same snapshot.
        conn.execute("BEGIN")
        try:
            counts = _counts(conn)
            revision = _revision(conn)
            with contextlib.closing(sqlite3.connect(tmp)) as dst:
                conn.backup(dst)
        finally:
            conn.execute("ROLLBACK")
        problems = verify_file(tmp, counts)
        if problems:
            raise BackupError(f"backup copy {tmp} failed verification: {problems}")
        dbfile.fsync_path(tmp)
        tmp.replace(out)
        dbfile.fsync_path(out.parent)
        meta = {
            "taken_at": taken_at.isoformat(),
            "source": source_name or (str(source) if isinstance(source, Path) else "connection"),
            "schema_revision": revision,
            "row_counts": counts,
            "integrity_check": "ok",
            "bytes": out.stat().st_size,
            "sha256": _sha256(out),
        }
        sidecar = _sidecar(out)
        sidecar_tmp = sidecar.with_name(f".{sidecar.name}.tmp")
        sidecar_tmp.write_text(json.dumps(meta, indent=1))
        dbfile.fsync_path(sidecar_tmp)
        sidecar_tmp.replace(sidecar)
        dbfile.fsync_path(out.parent)
    except (OSError, sqlite3.Error) as exc:
        for leftover in (tmp, out, _sidecar(out)):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if dbfile.is_corruption(exc):
            raise
        raise BackupError(f"backup to {out} failed: {type(exc).__name__}: {exc}") from exc
    except BackupError:
        for leftover in (tmp, out):
            with contextlib.suppress(OSError):
                leftover.unlink()
        raise
    finally:
        if own:
            conn.close()
    log.info("backup.taken", path=str(out), bytes=meta["bytes"], rows=sum(counts.values()))
    return Backup(out, taken_at, counts, revision, int(meta["bytes"]))


def _require_room(database: Path, directory: Path) -> None:
    """Refuse a backup that would leave less free space than twice the database (with its
    WAL) where it goes: on the database's own filesystem, a backup must never be what fills
    it."""
    size = sum(
        Path(f"{database}{suffix}").stat().st_size
        for suffix in ("", "-wal")
        if Path(f"{database}{suffix}").exists()
    )
    free = shutil.disk_usage(directory).free
    if free < 3 * size:
        raise BackupError(
            f"backup to {directory} refused: {free} bytes free, a backup of {database} "
            f"({size} bytes) needs {size} and leaves {2 * size} for the database to grow "
            "(No space left for a backup: free space there, or set paths.backups to another disk)"
        )


def verify_file(path: Path, expected_counts: dict[str, int] | None = None) -> str:
    """'' when ``path`` passes ``integrity_check`` (and has ``expected_counts``), else why."""
    result = dbfile.check_integrity(path, full=True)
    if not result.exists:
        return f"{path}: no such file"
    if not result.ok:
        return f"integrity_check: {result.report}"
    if expected_counts is not None:
        with contextlib.closing(dbfile.read_only_connection(path)) as conn:
            counts = _counts(conn)
        if counts != expected_counts:
            diff = {
                t: (expected_counts.get(t), counts.get(t))
                for t in sorted(set(counts) | set(expected_counts))
                if counts.get(t) != expected_counts.get(t)
            }
            return f"row counts differ from the source (table: source, copy): {diff}"
    return ""


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def backup_name(now: datetime) -> str:
    return f"contimg-{now.astimezone(UTC).strftime(STAMP)}.sqlite3"


def read_backup(path: Path) -> Backup | None:
    """The backup at ``path`` as its sidecar describes it (None: not a verified backup)."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        return Backup(
            path,
            datetime.fromisoformat(meta["taken_at"]),
            {str(k): int(v) for k, v in meta["row_counts"].items()},
            meta.get("schema_revision"),
            int(meta["bytes"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_backups(directory: Path) -> list[Backup]:
    """Verified backups in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        if NAME_RE.match(path.name) and path.is_file():
            b = read_backup(path)
            if b is not None:
                found.append(b)
    return sorted(found, key=lambda b: b.taken_at, reverse=True)


def newest(directory: Path) -> Backup | None:
    backups = list_backups(directory)
    return backups[0] if backups else None


def prune(directory: Path, now: datetime, *, hourly_h: float, daily_d: float) -> list[Path]:
    """Keep the newest backup of each hour of the last ``hourly_h`` hours and of each day of
    the last ``daily_d`` days (and always the newest one); remove the other backups (only
    files this module made: named and verified backups, their sidecars). Returns what went."""
    backups = list_backups(directory)
    keep: set[Path] = {backups[0].path} if backups else set()
    hours: set[str] = set()
    days: set[str] = set()
    for b in backups:  # newest first: the first of each bucket is its newest
        age = now - b.taken_at
        hour, day = b.taken_at.strftime("%Y%m%d%H"), b.taken_at.strftime("%Y%m%d")
        if age <= timedelta(hours=hourly_h) and hour not in hours:
            hours.add(hour)
            keep.add(b.path)
        if age <= timedelta(days=daily_d) and day not in days:
            days.add(day)
            keep.add(b.path)
    removed = []
    for b in backups:
        if b.path in keep:
            continue
        for path in (_sidecar(b.path), b.path):  # the sidecar first: never a "verified" hole
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(b.path)
    return removed


def restore(backup_path: Path, database: Path, *, now: datetime | None = None) -> list[Path]:
    """Verify ``backup_path`` and put a copy of it at ``database``; the file there before
    (damaged or not) and its side files are renamed aside, never deleted. The caller holds
    the workspace's exclusive lock. Returns the names the old files were moved to."""
    meta = read_backup(backup_path)
    problems = verify_file(backup_path, meta.row_counts if meta else None)
    if problems:
        raise BackupError(f"{backup_path} is not a usable backup: {problems}")
    database.parent.mkdir(parents=True, exist_ok=True)
    tmp = database.with_name(f".{database.name}.restore.tmp")
    with backup_path.open("rb") as src, tmp.open("wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    moved = dbfile.set_aside(database, now=now, why="before-restore")
    tmp.replace(database)
    dbfile.fsync_path(database.parent)
    log.info("backup.restored", backup=str(backup_path), database=str(database), set_aside=moved)
    return [Path(p) for p in moved]


def age_seconds(directory: Path, now: datetime) -> float | None:
    """Age of the newest verified backup (None: there is none)."""
    b = newest(directory)
    return None if b is None else max(0.0, (now - b.taken_at).total_seconds())
