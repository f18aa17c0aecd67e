"""The daemon's Prometheus metrics (prometheus-client, default registry), served at
``/metrics`` on ``daemon.listen``. Names follow the conventions (``contimg_…_total``,
``…_seconds``, ``…_bytes``); labels are bounded sets (stage, state, result, category, code,
tier, verdict, job, resource), never group ids.

Counters count what this process did since it started (Prometheus' ``increase()`` copes with
restarts). Everything that describes the queue (groups per state, queue lag, throughput,
calibration age, stuck leases) is recomputed from the database at each scrape by
:class:`QueueCollector`, so it survives restarts and agrees across nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from supervisor import __version__

log = structlog.get_logger(__name__)

CADENCE_S = 309.0  # one group of 16 subbands every ~309 s
GB = 1024**3

BUILD = Info("contimg_build", "contimg-supervisor build")
BUILD.info({"version": __version__})

ATTEMPTS = Counter(
    "contimg_stage_attempts_total",
    "Stage attempts that ended, by stage and the group's resulting state",
    ["stage", "result"],
)
FAILURES = Counter(
    "contimg_stage_failures_total",
    "Failed stage attempts by stage, policy category and code",
    ["stage", "category", "code"],
)
DURATION = Histogram(
    "contimg_stage_duration_seconds",
    "Wall time of stage attempts (worker start to end)",
    ["stage"],
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600),
)
FALLBACK = Counter(
    "contimg_fallback_tier_total",
    "Committed stage attempts by the fallback tier that produced them",
    ["stage", "tier"],
)
GATE_VERDICTS = Counter(
    "contimg_gate_verdicts_total", "Quality-gate verdicts", ["stage", "verdict"]
)
GATE_SCORE = Histogram(
    "contimg_gate_score",
    "Quality-gate scores (0..1; <= 0.33 fails, > 0.66 passes)",
    ["stage"],
    buckets=(0.1, 0.2, 0.33, 0.5, 0.66, 0.8, 0.9, 1.0),
)
PEAK_RSS = Histogram(
    "contimg_worker_peak_rss_bytes",
    "Peak resident memory of a stage worker and its descendants",
    ["stage"],
    buckets=tuple(x * GB for x in (0.25, 0.5, 1, 2, 4, 6, 8, 12, 16, 24, 32)),
)
REAPED = Counter(
    "contimg_reaper_rescues_total",
    "Groups returned to their checkpoint by the lease reaper",
    ["reason"],
)
LEFTOVERS = Counter(
    "contimg_leftover_workers_killed_total",
    "Stage workers left by a dead daemon on this node and killed at start-up",
)
IN_FLIGHT = Gauge("contimg_attempts_in_flight", "Stage attempts running now", ["stage"])
INTAKE_PAUSED = Gauge(
    "contimg_intake_paused",
    "1 while a stage's intake is paused for lack of a resource",
    ["stage", "resource"],
)
DISK_FREE = Gauge("contimg_disk_free_bytes", "Free bytes where stages write", ["filesystem"])
DISK_RESERVE = Gauge(
    "contimg_disk_min_free_bytes", "Free space always kept (resources.min_free_disk_gb)"
)
MEMORY_AVAILABLE = Gauge("contimg_memory_available_bytes", "Memory available on the node")
MEMORY_RESERVED = Gauge(
    "contimg_memory_reserved_bytes", "Memory reserved by running stage attempts (estimates)"
)
JOB_RUNS = Counter("contimg_job_runs_total", "Periodic job runs that completed", ["job"])
JOB_FAILURES = Counter("contimg_job_failures_total", "Periodic job runs that raised", ["job"])
LOOP_HEARTBEAT = Gauge(
    "contimg_loop_heartbeat_timestamp_seconds",
    "Unix time of the scheduling loop's last proven progress (a database write)",
)
PRUNED = Counter(
    "contimg_retention_pruned_total", "Intermediate products removed by retention", ["rule"]
)
PRUNED_BYTES = Counter("contimg_retention_freed_bytes_total", "Bytes freed by retention", ["rule"])
CHECK_FINDINGS = Gauge(
    "contimg_state_check_findings",
    "Database/disk disagreements found by the last state check",
    ["kind"],
)
DATABASE_HALTED = Gauge(
    "contimg_database_halted",
    "1 while the daemon has stopped claiming because its SQLite database is corrupt or its "
    "file was removed under it (reason); the database is left untouched for recovery",
    ["reason"],
)
BACKUP_AGE = Gauge(
    "contimg_database_backup_age_seconds",
    "Age of the newest verified backup of the SQLite database (+Inf: none; 0 where the "
    "daemon takes none: PostgreSQL, or backup.enabled = false)",
)
BACKUPS = Counter(
    "contimg_database_backups_total", "Online backups taken by the backup job", ["result"]
)
DATABASE_HALT_REASONS = ("corrupt", "unlinked")
RESOURCE_RESOURCES = ("memory", "disk", "file descriptors", "incoming")
INCOMING_AVAILABLE = Gauge(
    "contimg_incoming_available",
    "1 while the incoming directory answers, is a directory, can be listed (and is a mount "
    "point when ingest.incoming_is_mount); 0 during an outage of the raw-data storage",
)


class QueueCollector(Collector):
    """Queue metrics computed from the database at scrape time (``source`` returns
    :func:`supervisor.status.queue_snapshot`'s dict; set by the daemon)."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, Any]] | None = None

    def describe(self) -> list[Any]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        if self.source is None:
            return
        ok = GaugeMetricFamily(
            "contimg_queue_scrape_ok", "1 if the queue could be read from the database"
        )
        try:
            snap = self.source()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even then
            log.warning("metrics.queue_unreadable", error=str(exc))
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        groups = GaugeMetricFamily("contimg_groups", "Groups per state", labels=["state"])
        for state, count in snap["states"].items():
            groups.add_metric([state], count)
        yield groups
        yield _gauge(
            "contimg_queue_lag_seconds",
            "Age of the oldest runnable group (pending, retrying or running)",
            snap["queue_lag_s"],
        )
        yield _gauge(
            "contimg_groups_completed_last_hour",
            "Groups completed in the last hour",
            snap["completed_last_hour"],
        )
        yield _gauge(
            "contimg_cadence_groups_per_hour",
            "Groups the telescope writes per hour (one per 309 s)",
            3600.0 / CADENCE_S,
        )
        if snap["calibration_age_s"] is not None:
            yield _gauge(
                "contimg_calibration_age_seconds",
                "Time since the newest usable calibration set was registered",
                snap["calibration_age_s"],
            )
        yield _gauge(
            "contimg_leases_expired",
            "Running groups whose lease expired (the reaper should take them)",
            snap["leases_expired"],
        )
        if snap.get("seconds_since_last_file") is not None:
            yield _gauge(
                "contimg_seconds_since_last_file",
                "Time since the newest raw subband file was first seen, or since the newest "
                "daemon started when none ever was (the telescope writes a group every 309 s, "
                "around the clock)",
                snap["seconds_since_last_file"],
            )
        missing = GaugeMetricFamily(
            "contimg_subband_missing_groups",
            "Newest groups in a row (of the last 24 that stopped collecting) without a ready "
            "file of this subband",
            labels=["subband"],
        )
        for subband, count in sorted(snap.get("subband_missing_groups", {}).items()):
            missing.add_metric([f"{subband:02d}"], count)
        yield missing


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


QUEUE = QueueCollector()
REGISTRY.register(QUEUE)
