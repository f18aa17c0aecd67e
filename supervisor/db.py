"""Engines and transactions: SQLite tuned for durability and one writer, or PostgreSQL.

SQLite: WAL, synchronous=FULL, a busy timeout, foreign keys on, and every transaction
begins IMMEDIATE so a read-then-write can never hit "database is locked" halfway through.
Connections come from a pool, one per thread at a time (never shared across threads).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import (
    Connection,
    Dialect,
    Engine,
    Table,
    Update,
    bindparam,
    create_engine,
    event,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(
    url: str,
    *,
    busy_timeout_ms: int = 30000,
    echo: bool = False,
    read_only: bool = False,
    must_exist: bool = False,
) -> Engine:
    """Create an engine for ``url`` with the pragmas and begin mode described above
    (``read_only``: SQLite transactions begin DEFERRED and never take the write lock;
    ``must_exist``: a SQLite file that is gone is an error, never silently created anew,
    e.g. when a pool opens a connection after someone removed the file)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            if must_exist:
                url = f"sqlite:///file:{quote(str(Path(database).absolute()))}?mode=rw&uri=true"
        engine = create_engine(url, echo=echo, connect_args={"timeout": busy_timeout_ms / 1000})
        _configure_sqlite(engine, busy_timeout_ms, "BEGIN" if read_only else "BEGIN IMMEDIATE")
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # psycopg 3 is the driver we ship; a bare postgresql:// would look for psycopg2.
        url = str(parsed.set(drivername="postgresql+psycopg").render_as_string(False))
    return create_engine(url, echo=echo, pool_pre_ping=True)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that we can BEGIN
        # IMMEDIATE ourselves (the SQLAlchemy-documented recipe for pysqlite).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


# The newest migration (migrations/versions). The daemon and CLI check a database against
# it without importing Alembic (11 MB and 0.17 s of a cold start); tests/test_migrations.py
# keeps it equal to Alembic's head.
SCHEMA_REVISION = "0008"


@functools.lru_cache(maxsize=256)
def prepared_update(table: Table, match: tuple[str, ...], columns: tuple[str, ...]) -> Update:
    """``UPDATE table SET columns WHERE match`` built once per shape, with bound parameters
    named ``m_<column>`` (match) and ``v_<column>`` (values). Executing a prepared statement
    skips building and hashing a new one: on the claim/commit path, that construction cost
    more than the SQL itself."""
    stmt = update(table).where(*(table.c[name] == bindparam(f"m_{name}") for name in match))
    return stmt.values({name: bindparam(f"v_{name}") for name in columns})


def update_params(match: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The parameters of a :func:`prepared_update` statement."""
    return {**{f"m_{k}": v for k, v in match.items()}, **{f"v_{k}": v for k, v in values.items()}}


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def dialect_of(s: Session | Connection) -> Dialect:
    """The dialect behind an ORM session or a Core connection."""
    return s.dialect if isinstance(s, Connection) else s.get_bind().dialect


class WritesRefused(Exception):
    """The daemon halted on a damaged database: nothing may write to it any more."""


class Database:
    """The state database: an engine plus a session factory with short transactions."""

    def __init__(self, url: str, *, busy_timeout_ms: int = 30000, must_exist: bool = False) -> None:
        self.url = url
        self.engine = make_engine(url, busy_timeout_ms=busy_timeout_ms, must_exist=must_exist)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: reads that must not queue behind (or hold up) a writer for the write
        # lock; in WAL mode a reader sees the last committed state and blocks nobody.
        self._read_engine = (
            make_engine(url, busy_timeout_ms=busy_timeout_ms, read_only=True, must_exist=must_exist)
            if is_sqlite(self.engine) and make_url(url).database not in (None, "", ":memory:")
            else self.engine
        )
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)
        self.refused: str | None = None

    def refuse_writes(self, reason: str) -> None:
        """From now on every transaction raises :class:`WritesRefused` (a damaged database
        is left exactly as it is for recovery); reads stay possible."""
        self.refused = reason

    def _writable(self) -> None:
        if self.refused is not None:
            raise WritesRefused(self.refused)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One short transaction: commit on success, roll back on any exception."""
        self._writable()
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def core(self) -> Iterator[Connection]:
        """One short transaction on a Core connection, for the per-stage hot path (claim,
        attempt row, commit): Core statements only, without the ORM session's unit of work,
        identity map and per-statement ORM dispatch (a one-statement transaction took
        0.22 ms this way and 0.63 ms in a session, measured here). Commits on success, rolls
        back on any exception."""
        self._writable()
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only snapshot (it must not write: SQLite would then need the lock it
        did not take, and fail rather than wait)."""
        with self._read_sessions() as session, session.begin():
            yield session

    def schema_revision(self) -> str | None:
        """The revision Alembic recorded (None: never migrated)."""
        from sqlalchemy import inspect, text

        with self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def dispose(self) -> None:
        self.engine.dispose()
        if self._read_engine is not self.engine:
            self._read_engine.dispose()
