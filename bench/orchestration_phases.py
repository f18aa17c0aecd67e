"""Where the daemon's time per stage goes: wall and thread-CPU of each phase of an attempt.

Runs N groups x 5 no-op stages (tests/fake_stage.py) through ``Daemon.run`` in this process,
with timers wrapped around the claim, the request, the worker's run, the commit and their
parts, and prints milliseconds per stage for each, biggest first. A profiling aid, not a
benchmark of record: the timers add their own small cost, and the daemon runs without its
HTTP listener. Last line: one JSON object of the same figures. Asserts nothing.

    python bench/orchestration_phases.py --groups 40
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor import executor, leases, migrate, runner  # noqa: E402
from supervisor.daemon import Daemon  # noqa: E402
from supervisor.db import Database  # noqa: E402
from supervisor.logs import configure_logging  # noqa: E402
from tests.conftest import add_pending_group, fake_pipeline_config  # noqa: E402

# (owner, attribute): the phases timed, as "owner.attribute".
PHASES: tuple[tuple[Any, str], ...] = (
    (leases.Leases, "claim_next"),
    (executor.StageExecutor, "execute"),
    (executor, "build_request"),
    (executor.StageExecutor, "_add_attempt_row"),
    (executor, "write_site_config"),
    (executor, "run_worker"),
    (runner._ExitWatch, "wait"),
    (subprocess.Popen, "__init__"),
    (runner, "terminate"),
    (runner, "read_result"),
    (executor.StageExecutor, "_evidence"),
    (executor.StageExecutor, "_commit_success"),
    (executor, "move_group"),
    (executor, "publish"),
    (executor, "_finish_attempt_row"),
    (executor.StageExecutor, "_on_commit"),
    (Daemon, "_start_attempt"),
)


def _wrap(owner: Any, name: str, totals: dict[str, list[float]]) -> None:
    original: Callable[..., Any] = getattr(owner, name)
    label = f"{getattr(owner, '__name__', str(owner))}.{name}"

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            entry = totals[label]
            entry[0] += 1
            entry[1] += time.perf_counter() - wall
            entry[2] += time.thread_time() - cpu

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=40)
    args = parser.parse_args()
    configure_logging("warning", "json", open("/dev/null", "w"))  # noqa: SIM115
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for owner, name in PHASES:
        _wrap(owner, name, totals)
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp)
        (ws / "incoming").mkdir()
        cfg = fake_pipeline_config(ws, settings={"daemon": {"max_parallel": 1}})
        db = Database(cfg.database_url)
        migrate.upgrade(db)
        start = datetime(2025, 10, 5, 12, tzinfo=UTC)
        for i in range(args.groups):
            gid = (start + timedelta(seconds=309 * i)).strftime("%Y-%m-%dT%H:%M:%S")
            add_pending_group(db, gid)
        daemon = Daemon(cfg, db, ingest=False, rng=random.Random(0))
        wall, cpu = time.perf_counter(), time.process_time()
        daemon.run(until_idle=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        db.dispose()
    stages = 5 * args.groups
    waited = totals["_ExitWatch.wait"][1]
    figures: dict[str, Any] = {
        "benchmark": "orchestration_phases",
        "stages": stages,
        "wall_ms_per_stage": round(1000 * wall / stages, 2),
        "process_cpu_ms_per_stage": round(1000 * cpu / stages, 2),
        "outside_worker_wait_ms_per_stage": round(1000 * (wall - waited) / stages, 2),
    }
    print(
        f"{stages} stages: wall {figures['wall_ms_per_stage']} ms per stage, of which "
        f"{figures['outside_worker_wait_ms_per_stage']} ms outside the wait for the worker's "
        f"exit; process CPU {figures['process_cpu_ms_per_stage']} ms per stage"
    )
    print(f"{'phase':40s} {'calls':>6s} {'wall ms/stage':>14s} {'CPU ms/stage':>13s}")
    phases = {}
    for label, (calls, w, c) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"{label:40s} {int(calls):6d} {1000 * w / stages:14.2f} {1000 * c / stages:13.2f}")
        phases[label] = round(1000 * w / stages, 3)
    figures["phase_wall_ms_per_stage"] = phases
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
