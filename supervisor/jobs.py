"""The daemon's periodic work on APScheduler: ingest scan, lease reaper, waiting-calibration
expiry, resource monitor and state check, each at its own interval.

A job never overlaps itself (``max_instances=1``, plus a lock that a direct ``run_now`` call
shares with the scheduled runs); a job that raises is logged, counted and retried at its
next interval: it never takes the daemon down. Stage attempts are not jobs: the daemon's
loop claims them when a slot frees (see :mod:`supervisor.daemon`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from supervisor import metrics

log = structlog.get_logger(__name__)


@dataclass
class Job:
    """One periodic job and its bookkeeping."""

    name: str
    func: Callable[[], object]
    interval_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    runs: int = 0
    failures: int = 0
    last_error: str | None = None
    last_run_at: float | None = None  # time.monotonic()


class PeriodicJobs:
    """A BackgroundScheduler holding the daemon's jobs."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
        )

    def add(self, name: str, func: Callable[[], object], interval_s: float) -> None:
        job = Job(name, func, interval_s)
        self.jobs[name] = job
        self.scheduler.add_job(
            self._run,
            "interval",
            seconds=interval_s,
            args=(job, False),
            id=name,
            name=name,
            next_run_time=datetime.now(UTC),
        )

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def run_now(self, name: str) -> None:
        """Run ``name`` in the caller's thread, waiting for a scheduled run to finish first."""
        self._run(self.jobs[name], True)

    def reschedule(self, name: str, interval_s: float) -> None:
        job = self.jobs[name]
        if job.interval_s != interval_s:
            job.interval_s = interval_s
            self.scheduler.reschedule_job(name, trigger="interval", seconds=interval_s)
            log.info("job.rescheduled", job=name, interval_s=interval_s)

    def _run(self, job: Job, wait: bool) -> None:
        if not job.lock.acquire(blocking=wait):
            return  # the previous run is still going: never overlap
        try:
            job.func()
            job.runs += 1
            metrics.JOB_RUNS.labels(job.name).inc()
        except Exception as exc:  # noqa: BLE001 - a job must never kill the daemon
            job.failures += 1
            job.last_error = f"{type(exc).__name__}: {exc}"
            metrics.JOB_FAILURES.labels(job.name).inc()
            log.exception("job.failed", job=job.name, failures=job.failures)
        finally:
            job.last_run_at = time.monotonic()
            job.lock.release()

    def summary(self) -> dict[str, dict[str, object]]:
        return {
            name: {
                "interval_s": job.interval_s,
                "runs": job.runs,
                "failures": job.failures,
                "last_error": job.last_error,
            }
            for name, job in self.jobs.items()
        }
