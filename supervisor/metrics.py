"""The daemon's Prometheus metrics (prometheus-client, default registry), served at
``/metrics`` on ``daemon.listen``. Names follow the conventions (``contimg_…_total``,
``…_seconds``); labels are bounded sets (stage, outcome, job, reason kind), never group ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Info

from supervisor import __version__

BUILD = Info("contimg_build", "contimg-supervisor build")
BUILD.info({"version": __version__})

ATTEMPTS = Counter(
    "contimg_stage_attempts_total",
    "Stage attempts that ended, by stage and the group's resulting state",
    ["stage", "result"],
)
IN_FLIGHT = Gauge("contimg_attempts_in_flight", "Stage attempts running now", ["stage"])
INTAKE_PAUSED = Gauge(
    "contimg_intake_paused",
    "1 while a stage's intake is paused for lack of a resource",
    ["stage", "resource"],
)
JOB_RUNS = Counter("contimg_job_runs_total", "Periodic job runs that completed", ["job"])
JOB_FAILURES = Counter("contimg_job_failures_total", "Periodic job runs that raised", ["job"])
LOOP_HEARTBEAT = Gauge(
    "contimg_loop_heartbeat_timestamp_seconds",
    "Unix time of the scheduling loop's last proven progress (a database write)",
)
RESOURCE_RESOURCES = ("memory", "disk", "file descriptors")
