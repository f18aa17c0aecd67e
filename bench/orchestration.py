"""Benchmark: what orchestration costs, beside the physical floor and Prefect 3.

Prints one line per figure and, last, one JSON object with the keys
overhead_ms_per_stage, wall_ms_per_stage, worker_in_daemon_ms_per_stage,
overhead_vs_worker_alone_ms_per_stage, daemon_cpu_ms_per_stage, worker_ms_per_stage,
floor_ms_per_stage, prefect_ms_per_stage, prefect_beyond_spawn_ms_per_stage, cold_start_s,
daemon_rss_mb, claim_ms_at_1m_rows, status_ms_at_1m_rows, claim_ms_hot, claim_ms_after_idle,
raw_claim_ms_hot, raw_claim_ms_after_idle (and the parameters). Asserts nothing.

- wall_ms_per_stage: N groups x 5 no-op stages (tests/fake_stage.py, "succeed") through the
  real daemon path (`contimg-supervisor run --until-idle`, SQLite WAL, every transition
  committed), wall time divided by 5N.
- worker_in_daemon_ms_per_stage: the workers' own wall time in that run, spawn to exit as
  the daemon saw it (``stage_attempts.worker_seconds``), per stage.
- overhead_ms_per_stage: wall - worker_in_daemon: the time per stage during which no worker
  of ours existed (claim, request, commit, the loop's turn), measured in the same run.
- worker_ms_per_stage: the same worker command spawned directly on a prepared request, N x 5
  times: the worker's own cost (interpreter, imports, result file), and
  overhead_vs_worker_alone_ms_per_stage = wall - that (the first method; it carries the
  noise of two separate ~50 ms measurements on a busy 2-core machine).
- daemon_cpu_ms_per_stage: the daemon process's CPU time (user + system, all threads) from
  READY=1 to the last commit, per stage: the cost that does not depend on scheduling.
- floor_ms_per_stage: spawning `python -c pass` plus one fsync'd SQLite commit (WAL,
  synchronous=FULL) per transition (two per stage), measured in the same run
  (shared/reference/orchbench method).
- prefect_ms_per_stage: Prefect 3 running the same no-op subprocess stages, local
  (ephemeral) mode, one flow over all groups, in its own venv (created under the work
  directory with pip; null with the reason when that is impossible, or with --no-prefect).
  prefect_beyond_spawn_ms_per_stage: that less the same `python -c pass` spawned bare, in
  the same process right after (the figure to set beside overhead_ms_per_stage).
- cold_start_s: `contimg-supervisor run` start to READY=1 on a real notify socket.
- daemon_rss_mb: the daemon's resident memory after draining the N groups.
- claim_ms_at_1m_rows / status_ms_at_1m_rows: one claim, and one `status` snapshot, with
  1,000,000 completed groups in the database (median of repeats).
- claim_ms_hot / claim_ms_after_idle: the same claim (Leases.claim_next, a few hundred
  groups) run back to back, and run after 50 ms of sleep, as the daemon's claim runs after
  waiting on a worker (medians). raw_claim_ms_after_idle: that claim's statements (BEGIN
  IMMEDIATE, the claim SELECT, the guarded UPDATE ... RETURNING, the audit INSERT, COMMIT)
  through the sqlite3 module alone (raw_claim_ms_hot: back to back): what the claim would
  cost with no SQLAlchemy at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor import migrate  # noqa: E402
from supervisor.db import Database  # noqa: E402
from tests.conftest import add_pending_group, fake_pipeline_config  # noqa: E402

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
STAGES = ("preflight", "convert", "calibrate", "image", "register")


def _group_ids(n: int, start: datetime) -> list[str]:
    return [(start + timedelta(seconds=309 * i)).strftime("%Y-%m-%dT%H:%M:%S") for i in range(n)]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CONTIMG_", "NOTIFY_"))}


def daemon_path(workdir: Path, n_groups: int) -> dict[str, float]:
    """Wall per stage through the real daemon, its cold start and RSS."""
    ws = workdir / "daemon"
    (ws / "incoming").mkdir(parents=True)
    cfg = fake_pipeline_config(
        ws, settings={"daemon": {"max_parallel": 1, "listen": "127.0.0.1:0"}}
    )
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    for gid in _group_ids(n_groups, datetime(2025, 10, 5, 12, 0, tzinfo=UTC)):
        add_pending_group(db, gid)
    db.dispose()
    notify = workdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(60)
    env = dict(_clean_env(), NOTIFY_SOCKET=str(notify))
    cmd = [SCRIPT, "--workspace", str(ws), "--config", str(ws / "fake.toml"), "run"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cold = None
    while cold is None:
        if b"READY=1" in sock.recv(4096):
            cold = time.perf_counter() - t0
    sock.settimeout(None)
    threading.Thread(target=_drain, args=(sock,), daemon=True).start()  # as systemd reads
    daemon = psutil.Process(proc.pid)
    cpu_ready = daemon.cpu_times()
    # Done when every group is completed; the daemon keeps running (idle) for the RSS.
    url = cfg.database_url.removeprefix("sqlite:///")
    while True:
        with sqlite3.connect(url) as conn:
            done = conn.execute("select count(*) from groups where state='completed'").fetchone()
        if done[0] >= n_groups:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}; see {ws}")
        time.sleep(0.05)
    cpu_done = daemon.cpu_times()
    with sqlite3.connect(url) as conn:
        first, last, worker_s, n = conn.execute(
            "select min(started_at), max(finished_at), sum(worker_seconds), count(*) "
            "from stage_attempts"
        ).fetchone()
    span = (datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds()
    rss = daemon.memory_info().rss
    proc.terminate()
    proc.wait(timeout=60)
    stages = 5 * n_groups
    assert n == stages, f"{n} attempts for {stages} stages"
    cpu_s = (cpu_done.user + cpu_done.system) - (cpu_ready.user + cpu_ready.system)
    return {
        "wall_ms_per_stage": 1000 * span / stages,
        "worker_in_daemon_ms_per_stage": 1000 * worker_s / stages,
        "daemon_cpu_ms_per_stage": 1000 * cpu_s / stages,
        "cold_start_s": cold,
        "daemon_rss_mb": rss / 1024**2,
    }


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


def worker_alone(workdir: Path, n: int) -> float:
    """ms per direct spawn of the fake worker on a prepared request."""
    work = workdir / "worker"
    out = work / "out"
    out.mkdir(parents=True)
    request = {
        "group_id": "2025-10-05T12:00:00",
        "stage": "preflight",
        "attempt": 1,
        "tier": {"index": 0, "name": "primary", "params": {}},
        "output_dir": str(out),
        "result_path": str(work / "result.json"),
    }
    path = work / "request.json"
    path.write_text(json.dumps(request))
    env = dict(_clean_env(), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "tests.fake_stage", "--request", str(path)]
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run(cmd, env=env, cwd=work, check=True, stdout=subprocess.DEVNULL)
    return 1000 * (time.perf_counter() - t0) / n


def floor(workdir: Path, n: int) -> float:
    """ms per stage: spawn `python -c pass` + two fsync'd WAL commits (FULL)."""
    conn = sqlite3.connect(workdir / "floor.sqlite3", isolation_level=None)
    conn.execute("pragma journal_mode=wal")
    conn.execute("pragma synchronous=full")
    conn.execute("create table t (id integer primary key, state text)")
    conn.execute("insert into t values (1, 'x')")
    t0 = time.perf_counter()
    for i in range(n):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        for _ in range(2):
            conn.execute("begin immediate")
            conn.execute("update t set state = ? where id = 1", (str(i),))
            conn.execute("commit")
    conn.close()
    return 1000 * (time.perf_counter() - t0) / n


PREFECT_FLOW = """
import subprocess, sys, time
from prefect import flow, task

@task
def stage(name: str, group: int) -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)

@flow
def night(n: int) -> None:
    for g in range(n):
        for s in ("preflight", "convert", "calibrate", "image", "register"):
            stage(s, g)

if __name__ == "__main__":
    n = int(sys.argv[1])
    night(1)  # warm: the ephemeral server is up, the database migrated
    t = time.perf_counter()
    night(n)
    per_task = (time.perf_counter() - t) * 1000 / (5 * n)
    t = time.perf_counter()  # the same spawns without Prefect, in the same process
    for _ in range(5 * n):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    print(per_task, (time.perf_counter() - t) * 1000 / (5 * n))
"""


def prefect(workdir: Path, n: int, venv: Path | None) -> tuple[float | None, float | None, str]:
    """(ms per task, ms per bare spawn of the same command in the same process, note)."""
    venv = venv or workdir / "prefect-venv"
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "prefect>=3,<4"],
                check=True,
                timeout=900,
            )
        script = workdir / "prefect_flow.py"
        script.write_text(PREFECT_FLOW)
        home = workdir / "prefect-home"
        env = dict(
            _clean_env(),
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_LOGGING_LEVEL="WARNING",
        )
        env.pop("PREFECT_API_URL", None)
        done = subprocess.run(
            [str(python), str(script), str(n)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        )
        version = subprocess.run(
            [str(python), "-c", "import prefect; print(prefect.__version__)"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        per_task, spawn = (float(x) for x in done.stdout.strip().splitlines()[-1].split())
        return per_task, spawn, f"prefect {version}"
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
        return None, None, f"not measured: {str(exc)[:200]}"


def at_one_million(workdir: Path, rows: int, repeats: int) -> dict[str, float]:
    """One claim and one status snapshot with ``rows`` completed groups in SQLite."""
    from supervisor.config import load_config
    from supervisor.leases import Leases, Owner
    from supervisor.status import collect_status, queue_snapshot

    ws = workdir / "million"
    (ws / "incoming").mkdir(parents=True)
    cfg = load_config(workspace=ws, environ={})
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    db.dispose()
    url = cfg.database_url.removeprefix("sqlite:///")
    t0 = time.perf_counter()
    conn = sqlite3.connect(url)
    conn.execute("pragma synchronous=off")
    start = datetime(2020, 1, 1, tzinfo=UTC)
    cols = [r[1] for r in conn.execute("pragma table_info(groups)")]

    def row(i: int) -> tuple:
        when = (start + timedelta(seconds=309 * i)).replace(tzinfo=None)
        stamp = when.strftime("%Y-%m-%d %H:%M:%S.%f")
        values = {
            "group_id": when.strftime("%Y-%m-%dT%H:%M:%S"),
            "obs_start": stamp,
            "state": "completed",
            "stage": "register",
            "is_calibrator": 0,
            "priority": 1,
            "attempt": 1,
            "crash_count": 0,
            "fallback_tier": 0,
            "fencing_token": 5,
            "correlation_id": f"{i:036d}",
            "first_seen_at": stamp,
            "updated_at": stamp,
            "completed_at": stamp,
        }
        return tuple(values.get(c) for c in cols)

    marks = ",".join("?" * len(cols))
    batch = 50_000
    for b in range(0, rows, batch):
        conn.executemany(
            f"insert into groups ({','.join(cols)}) values ({marks})",
            (row(i) for i in range(b, min(rows, b + batch))),
        )
        conn.commit()
    conn.execute("analyze")
    conn.commit()
    conn.close()
    fill_s = time.perf_counter() - t0
    db = Database(cfg.database_url)
    leases = Leases(db, Owner.this_process("bench"), lease_s=120.0)
    later = start + timedelta(seconds=309 * (rows + 10))
    claim_ms, status_ms = [], []
    for r in range(repeats):
        add_pending_group(db, (later + timedelta(seconds=309 * r)).strftime("%Y-%m-%dT%H:%M:%S"))
        t = time.perf_counter()
        claim = leases.claim_next()
        claim_ms.append(1000 * (time.perf_counter() - t))
        assert claim is not None
        t = time.perf_counter()
        collect_status(db)  # what `status` shows
        queue_snapshot(db)  # what /metrics and `health` read
        status_ms.append(1000 * (time.perf_counter() - t))
    db.dispose()
    return {
        "claim_ms_at_1m_rows": statistics.median(claim_ms),
        "status_ms_at_1m_rows": statistics.median(status_ms),
        "rows": rows,
        "fill_s": fill_s,
    }


RAW_CLAIM = """
SELECT g.group_id, g.state, g.attempt, g.fencing_token,
       (SELECT coalesce(sum(f.size_bytes), 0) FROM subband_files f
         WHERE f.group_id = g.group_id AND f.status = 'ready') AS input_bytes
  FROM groups g
 WHERE g.state IN ('pending', 'retry_wait')
   AND (g.state = 'pending' OR g.next_attempt_at <= ?)
 ORDER BY g.priority, g.obs_start
 LIMIT 32
"""
RAW_MOVE = """
UPDATE groups SET state = 'running', updated_at = ?, state_reason = 'claimed',
       fencing_token = ?, lease_owner = 'bench', lease_expires_at = ?, attempt = ?,
       next_attempt_at = NULL
 WHERE group_id = ? AND state = ? AND fencing_token = ?
RETURNING stage, attempt, fallback_tier, fencing_token, correlation_id
"""
RAW_AUDIT = """
INSERT INTO transitions (group_id, from_state, to_state, stage, at, attempt, fencing_token,
                         actor, correlation_id, message)
VALUES (?, ?, 'running', ?, ?, ?, ?, 'bench', ?, 'claimed')
"""


def idle_penalty(workdir: Path, n: int, idle_s: float = 0.05) -> dict[str, float]:
    """One claim hot (back to back) and after ``idle_s`` of sleep; medians in ms."""
    from supervisor.leases import Leases, Owner

    ws = workdir / "idle"
    (ws / "incoming").mkdir(parents=True)
    cfg = fake_pipeline_config(ws)
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    for gid in _group_ids(4 * n + 10, datetime(2025, 10, 6, tzinfo=UTC)):
        add_pending_group(db, gid)
    leases = Leases(db, Owner.this_process("bench"), lease_s=120.0)

    def timed_claim() -> float:
        t = time.perf_counter()
        assert leases.claim_next() is not None
        return 1000 * (time.perf_counter() - t)

    for _ in range(10):
        timed_claim()  # warm: statements compiled, connections open
    hot = [timed_claim() for _ in range(n)]
    idle = []
    for _ in range(n):
        time.sleep(idle_s)
        idle.append(timed_claim())
    db.dispose()
    conn = sqlite3.connect(cfg.database_url.removeprefix("sqlite:///"), isolation_level=None)
    conn.execute("pragma synchronous=full")
    conn.execute("pragma foreign_keys=on")
    raw_hot, raw = [], []
    for i in range(2 * n):
        if i >= n:
            time.sleep(idle_s)
        t = time.perf_counter()
        now = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
        conn.execute("BEGIN IMMEDIATE")
        gid, state, attempt, token, _bytes = conn.execute(RAW_CLAIM, (now,)).fetchone()
        stage, attempt, _tier, token, corr = conn.execute(
            RAW_MOVE, (now, token + 1, now, attempt + 1, gid, state, token)
        ).fetchone()
        conn.execute(RAW_AUDIT, (gid, state, stage, now, attempt, token, corr))
        conn.execute("COMMIT")
        (raw if i >= n else raw_hot).append(1000 * (time.perf_counter() - t))
    conn.close()
    return {
        "claim_ms_hot": statistics.median(hot),
        "claim_ms_after_idle": statistics.median(idle),
        "raw_claim_ms_hot": statistics.median(raw_hot),
        "raw_claim_ms_after_idle": statistics.median(raw),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=40)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-prefect", action="store_true")
    parser.add_argument("--prefect-venv", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        d = daemon_path(work, args.groups)
        print(
            f"daemon path: {d['wall_ms_per_stage']:.1f} ms/stage wall, of which the workers "
            f"{d['worker_in_daemon_ms_per_stage']:.1f} ms (spawn to exit); daemon CPU "
            f"{d['daemon_cpu_ms_per_stage']:.1f} ms/stage; cold start "
            f"{d['cold_start_s']:.2f} s, RSS {d['daemon_rss_mb']:.0f} MB",
            flush=True,
        )
        worker = worker_alone(work, 5 * args.groups)
        print(f"worker alone: {worker:.1f} ms/spawn", flush=True)
        floor_ms = floor(work, 5 * args.groups)
        print(f"floor (spawn + 2 fsync'd commits): {floor_ms:.1f} ms/stage", flush=True)
        if args.no_prefect:
            prefect_ms, prefect_spawn, prefect_note = None, None, "not measured (--no-prefect)"
        else:
            prefect_ms, prefect_spawn, prefect_note = prefect(work, args.groups, args.prefect_venv)
        print(
            f"prefect: {prefect_ms} ms/stage, the bare spawn {prefect_spawn} ms ({prefect_note})",
            flush=True,
        )
        idle = idle_penalty(work, 100)
        print(
            f"one claim: {idle['claim_ms_hot']:.2f} ms back to back, "
            f"{idle['claim_ms_after_idle']:.2f} ms after 50 ms idle; its SQL through sqlite3 "
            f"alone: {idle['raw_claim_ms_hot']:.2f} ms back to back, "
            f"{idle['raw_claim_ms_after_idle']:.2f} ms after 50 ms idle",
            flush=True,
        )
        million = at_one_million(work, args.rows, args.repeats)
        print(
            f"{million['rows']} rows (filled in {million['fill_s']:.0f} s): claim "
            f"{million['claim_ms_at_1m_rows']:.2f} ms, status "
            f"{million['status_ms_at_1m_rows']:.1f} ms",
            flush=True,
        )
    figures = {
        **{k: round(v, 3) for k, v in idle.items()},
        "benchmark": "orchestration",
        "groups": args.groups,
        "stages": 5 * args.groups,
        "wall_ms_per_stage": round(d["wall_ms_per_stage"], 2),
        "worker_ms_per_stage": round(worker, 2),
        "worker_in_daemon_ms_per_stage": round(d["worker_in_daemon_ms_per_stage"], 2),
        "overhead_ms_per_stage": round(
            d["wall_ms_per_stage"] - d["worker_in_daemon_ms_per_stage"], 2
        ),
        "overhead_vs_worker_alone_ms_per_stage": round(d["wall_ms_per_stage"] - worker, 2),
        "daemon_cpu_ms_per_stage": round(d["daemon_cpu_ms_per_stage"], 2),
        "floor_ms_per_stage": round(floor_ms, 2),
        "prefect_ms_per_stage": round(prefect_ms, 2) if prefect_ms is not None else None,
        "prefect_beyond_spawn_ms_per_stage": (
            round(prefect_ms - prefect_spawn, 2)
            if prefect_ms is not None and prefect_spawn is not None
            else None
        ),
        "prefect": prefect_note,
        "cold_start_s": round(d["cold_start_s"], 3),
        "daemon_rss_mb": round(d["daemon_rss_mb"], 1),
        "claim_ms_at_1m_rows": round(million["claim_ms_at_1m_rows"], 3),
        "status_ms_at_1m_rows": round(million["status_ms_at_1m_rows"], 2),
        "rows": million["rows"],
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
