"""The daemon as systemd runs it: a real process, a real notify socket (``NOTIFY_SOCKET``,
``WATCHDOG_USEC``), real signals, JSON log lines on stdout, /healthz and /metrics over HTTP,
and ``health --json``. Stage workers are the fake stage."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import select

from supervisor.db import Database
from supervisor.models import Group, StageAttempt
from supervisor.runner import read_worker_identity
from tests.conftest import add_pending_group, fake_pipeline_config
from tests.test_pipeline import fake_processes

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
GID = "2025-10-05T12:30:00"


@dataclass
class NotifySocket:
    """A datagram socket standing in for systemd's; records (monotonic time, message)."""

    path: Path
    messages: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
        self.sock.close()

    def times_of(self, key: str) -> list[float]:
        return [t for t, m in self.messages if key in m.split("\n")]

    def wait_for(self, key: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.times_of(key)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@dataclass
class Service:
    proc: subprocess.Popen
    log_path: Path

    def lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def events(self, name: str) -> list[dict]:
        return [e for e in self.lines() if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} log line; log tail: {self.log_path.read_text()[-3000:]}")


def start_service(
    workspace: Path,
    notify: NotifySocket | None,
    *extra: str,
    watchdog_usec: int = 2_000_000,
) -> Service:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTIMG_", "NOTIFY_"))}
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    log_path = workspace / "daemon.log"
    cmd = [SCRIPT, "--workspace", str(workspace), "--config", str(workspace / "fake.toml")]
    proc = subprocess.Popen(
        [*cmd, "run", "--listen", "127.0.0.1:0", *extra],
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    return Service(proc, log_path)


def stop(service: Service) -> None:
    if service.proc.poll() is None:
        service.proc.kill()
        service.proc.wait()
    for p in fake_processes():
        p.kill()


def attempt_rows(db: Database) -> list[StageAttempt]:
    with db.transaction() as s:
        return list(s.scalars(select(StageAttempt).order_by(StageAttempt.id)))


def wait_running(db: Database, stage: str, timeout: float = 30.0) -> StageAttempt:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for a in attempt_rows(db):
            started = a.outcome == "running" and read_worker_identity(Path(a.workdir))
            if a.stage == stage and started:
                return a
        time.sleep(0.05)
    raise AssertionError(f"no running {stage} attempt")


def slow(seconds: float) -> dict:
    return {
        "tiers": [{"name": "primary", "params": {"behaviour": "slow_success", "seconds": seconds}}]
    }


HANG = {"tiers": [{"name": "primary", "params": {"behaviour": "hang"}}]}


def test_ready_watchdog_stopping_and_a_drain_that_lets_the_stage_finish(
    workspace: Path, sqlite_db: Database, notify: NotifySocket
) -> None:
    fake_pipeline_config(workspace, settings={"daemon": {"drain_budget_s": 60.0}}, convert=slow(3))
    add_pending_group(sqlite_db, GID)
    service = start_service(workspace, notify)
    try:
        ready = notify.wait_for("READY=1")
        running = wait_running(sqlite_db, "convert")
        notify.wait_for("WATCHDOG=1")
        sent = time.monotonic()
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=60) == 0
    finally:
        stop(service)
    stopping = notify.wait_for("STOPPING=1")
    watchdogs = notify.times_of("WATCHDOG=1")
    assert ready < watchdogs[0] < stopping and stopping >= sent
    # The stage that was running finished within the budget and committed; the group is
    # resumable at the next stage.
    (done,) = [a for a in attempt_rows(sqlite_db) if a.id == running.id]
    assert done.outcome == "succeeded"
    with sqlite_db.transaction() as s:
        g = s.get(Group, GID)
        assert (g.state, g.stage) == ("pending", "calibrate")
    assert service.events("daemon.drain_requested") and service.events("daemon.stopped")
    assert service.events("run.finished")[-1]["drained"] is True
    assert any("EXTEND_TIMEOUT_USEC=" in m for t, m in notify.messages if t >= sent)


def test_drain_budget_spent_stops_the_worker_and_leaves_the_group_resumable(
    workspace: Path, sqlite_db: Database, notify: NotifySocket
) -> None:
    fake_pipeline_config(workspace, settings={"daemon": {"drain_budget_s": 1.0}}, convert=HANG)
    add_pending_group(sqlite_db, GID)
    service = start_service(workspace, notify)
    try:
        notify.wait_for("READY=1")
        running = wait_running(sqlite_db, "convert")
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=60) == 0
    finally:
        stop(service)
    (ended,) = [a for a in attempt_rows(sqlite_db) if a.id == running.id]
    assert ended.outcome == "abandoned" and "shutdown" in (ended.error_message or "")
    with sqlite_db.transaction() as s:
        g = s.get(Group, GID)
        assert (g.state, g.stage, g.attempt) == ("pending", "convert", 0)
    assert service.events("daemon.drain_budget_spent")
    assert fake_processes() == []


def test_a_second_sigterm_stops_at_once(
    workspace: Path, sqlite_db: Database, notify: NotifySocket
) -> None:
    fake_pipeline_config(workspace, settings={"daemon": {"drain_budget_s": 600.0}}, convert=HANG)
    add_pending_group(sqlite_db, GID)
    service = start_service(workspace, notify)
    try:
        notify.wait_for("READY=1")
        wait_running(sqlite_db, "convert")
        service.proc.send_signal(signal.SIGTERM)
        service.wait_event("daemon.drain_requested")
        time.sleep(0.5)
        assert service.proc.poll() is None  # still draining: the budget is 10 minutes
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=60) == 0  # long before the budget
    finally:
        stop(service)
    with sqlite_db.transaction() as s:
        g = s.get(Group, GID)
        assert (g.state, g.stage) == ("pending", "convert")
    assert fake_processes() == []


def test_watchdog_is_withheld_while_the_database_is_stuck(
    workspace: Path, sqlite_db: Database, notify: NotifySocket
) -> None:
    """An exclusive lock on the SQLite file wedges every transaction of the loop: no
    WATCHDOG=1 goes out while it lasts (systemd would restart the daemon), and pings come
    back once the database answers again. A long-running stage alone never stops them."""
    fake_pipeline_config(workspace, settings={"daemon": {"heartbeat_row_s": 0.2}}, convert=slow(30))
    add_pending_group(sqlite_db, GID)
    service = start_service(workspace, notify, watchdog_usec=1_000_000)
    db_path = workspace / "state" / "contimg.sqlite3"
    try:
        notify.wait_for("READY=1")
        wait_running(sqlite_db, "convert")
        time.sleep(2.0)  # a stage is running: pings continue
        before_lock = time.monotonic()
        assert [t for t in notify.times_of("WATCHDOG=1") if t > before_lock - 1.5]
        conn = sqlite3.connect(db_path, timeout=1, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked = time.monotonic()
        time.sleep(4.0)
        conn.execute("ROLLBACK")
        conn.close()
        released = time.monotonic()
        time.sleep(3.0)
        pings = notify.times_of("WATCHDOG=1")
        assert not [t for t in pings if locked + 1.6 < t < released], "pinged while wedged"
        assert [t for t in pings if t > released], "pings did not resume"
        assert service.proc.poll() is None
    finally:
        stop(service)
    assert service.events("watchdog.withheld")


def test_sighup_reloads_a_valid_file_and_keeps_the_old_config_on_an_invalid_one(
    workspace: Path, sqlite_db: Database, notify: NotifySocket
) -> None:
    fake_pipeline_config(workspace)
    config = workspace / "fake.toml"
    original = config.read_text()
    service = start_service(workspace, notify)
    try:
        notify.wait_for("READY=1")
        config.write_text(original.replace("[daemon]", "[daemon]\nmax_parallel = 1"))
        service.proc.send_signal(signal.SIGHUP)
        reloaded = service.wait_event("config.reloaded")
        assert "daemon.max_parallel" in reloaded["changed"]
        config.write_text(original + "\n[daemon]\nmax_parallel = 'many'\n[nonsense]\nx = 1\n")
        service.proc.send_signal(signal.SIGHUP)
        rejected = service.wait_event("config.reload_rejected")
        assert len(rejected["problems"]) >= 1
        config.write_text(original.replace("[daemon]", '[paths]\nproducts = "elsewhere"\n[daemon]'))
        service.proc.send_signal(signal.SIGHUP)
        restart = service.wait_event("config.reload_needs_restart")
        assert restart["keys"] == ["paths"]
        assert service.proc.poll() is None
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=30) == 0
    finally:
        stop(service)


def test_healthz_metrics_and_health_json(
    workspace: Path, sqlite_db: Database, notify: NotifySocket
) -> None:
    fake_pipeline_config(workspace, convert=slow(2))
    add_pending_group(sqlite_db, GID)
    service = start_service(workspace, notify)
    cli = [SCRIPT, "--workspace", str(workspace), "--config", str(workspace / "fake.toml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    try:
        address = service.wait_event("http.listening")["address"]
        wait_running(sqlite_db, "convert")
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=10) as resp:
            assert resp.status == 200
            report = json.loads(resp.read())
        checks = {c["name"]: c for c in report["checks"]}
        assert set(checks) >= {"database", "loop", "disk", "intake", "backlog", "calibration"}
        assert checks["loop"]["status"] == checks["database"]["status"] == "ok"
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        assert 'contimg_build_info{version="0.1.0"} 1.0' in text
        assert 'contimg_attempts_in_flight{stage="convert"} 1.0' in text
        done = subprocess.run([*cli, "health", "--json"], env=env, capture_output=True, text=True)
        rep = json.loads(done.stdout)
        assert done.returncode in (0, 1) and rep["status"] in ("ok", "degraded")
        assert {c["name"]: c["status"] for c in rep["checks"]}["loop"] == "ok"
        service.proc.send_signal(signal.SIGTERM)
        assert service.proc.wait(timeout=60) == 0
    finally:
        stop(service)
    after = subprocess.run([*cli, "health", "--json"], env=env, capture_output=True, text=True)
    assert after.returncode == 2
    loop = {c["name"]: c for c in json.loads(after.stdout)["checks"]}["loop"]
    assert loop["status"] == "unhealthy" and "stopped" in loop["detail"]


def test_every_line_of_an_attempt_carries_its_identity_and_the_worker_gets_it(
    workspace: Path, sqlite_db: Database, notify: NotifySocket
) -> None:
    fake_pipeline_config(workspace)
    add_pending_group(sqlite_db, GID)
    service = start_service(workspace, notify, "--until-idle")
    try:
        assert service.proc.wait(timeout=120) == 0
    finally:
        stop(service)
    with sqlite_db.transaction() as s:
        group = s.get(Group, GID)
        assert group.state == "completed"
        correlation = group.correlation_id
    attempt_lines = [e for e in service.lines() if e.get("event", "").startswith("stage.")]
    assert len(attempt_lines) >= 10  # started + committed for each of five stages
    for e in attempt_lines:
        assert e["group_id"] == GID and e["correlation_id"] == correlation
        assert e["stage"] in ("preflight", "convert", "calibrate", "image", "register")
        assert isinstance(e["attempt"], int)
    for a in attempt_rows(sqlite_db):
        request = json.loads(Path(a.workdir, "request.json").read_text())
        result = json.loads(Path(a.workdir, "result.json").read_text())
        assert request["correlation_id"] == result["correlation_id"] == correlation


def test_a_notify_socket_nobody_reads_never_blocks_the_daemon(tmp_path: Path) -> None:
    """A full datagram queue (a reader that stopped reading) drops the message instead of
    blocking the scheduling loop: found when a benchmark stopped reading after READY=1 and
    the daemon hung in sendto for ten minutes."""
    from supervisor.notify import Notifier

    path = tmp_path / "notify.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    results: list[bool] = []
    sender = threading.Thread(
        target=lambda: results.extend(notifier.status(f"{i:04d} " + "x" * 200) for i in range(5000))
    )
    sender.start()
    sender.join(timeout=30)
    assert not sender.is_alive(), "sd_notify blocked on a full queue"
    assert results[0] is True and results.count(False) > 0  # some got through, the rest dropped
    assert reader.recv(4096).startswith(b"STATUS=0000")
    reader.close()
    notifier.close()
