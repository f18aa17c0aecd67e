"""Resource admission: before a stage attempt is claimed, do its estimated memory, disk and
file descriptors fit? A stage that does not fit pauses its intake (with the reason) instead of
failing mid-write, and resumes by itself once the resources are back.

Estimates scale with the group's UVH5 input (``[stages.X] memory_per_input``,
``disk_per_input``, ``memory_floor_mb``); memory is reserved against a budget while an
attempt runs, so two big workers are never admitted into room for one. Readings come from a
:class:`Probe` (psutil and ``statvfs``; tests pass their own).

Threads are granted the same way (:meth:`Admission.reserve`): an attempt gets the CPUs the
attempts already running leave free, so a worker alone (the real-time case, or the last
group of a backlog) uses every core, and one that starts beside others takes its share.
"""

from __future__ import annotations

import os
import resource
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

from supervisor.config import Config

log = structlog.get_logger(__name__)

GB = 1024**3


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at the node: bytes free where stages write, memory, file descriptors."""

    disk_free_bytes: int  # products/staging filesystem
    tmpfs_free_bytes: int | None  # tmpfs staging, when configured
    memory_available_bytes: int
    memory_total_bytes: int
    fds_free: int


class Probe:
    """Reads the real node."""

    def read(self, cfg: Config) -> Reading:
        products = existing_ancestor(cfg.path("products"))
        tmpfs = None
        if cfg.paths.tmpfs_staging:
            tmpfs = shutil.disk_usage(existing_ancestor(cfg.path("tmpfs_staging"))).free
        vm = psutil.virtual_memory()
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            used = len(os.listdir("/proc/self/fd"))
        except OSError:
            used = 0
        limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
        return Reading(
            disk_free_bytes=shutil.disk_usage(products).free,
            tmpfs_free_bytes=tmpfs,
            memory_available_bytes=vm.available,
            memory_total_bytes=vm.total,
            fds_free=limit - used,
        )


# Stages whose workers read the raw files in incoming (paused while the mount is out).
RAW_READERS = ("preflight", "convert")


def existing_ancestor(path: Path) -> Path:
    """The nearest existing ancestor (a fresh workspace has no products directory yet)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


@dataclass(frozen=True, slots=True)
class Estimate:
    """What one attempt of a stage is expected to need."""

    memory_bytes: int
    disk_bytes: int


def estimate(cfg: Config, stage: str, input_bytes: int) -> Estimate:
    sc = cfg.stages[stage]
    memory = max(sc.memory_floor_mb * 1024**2, sc.memory_per_input * input_bytes)
    return Estimate(int(memory), int(sc.disk_per_input * input_bytes))


@dataclass
class Admission:
    """Decides admissions and remembers reservations and paused stages (thread-safe)."""

    cfg: Config
    probe: Probe = field(default_factory=Probe)
    on_change: Callable[[str, list[str]], None] = lambda stage, reasons: None
    _reserved: dict[tuple[str, int], int] = field(default_factory=dict)  # claim key -> bytes
    _threads: dict[tuple[str, int], int] = field(default_factory=dict)  # claim key -> threads
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    _paused: dict[str, list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    last: Reading | None = None
    # Resources the daemon found unavailable (resource -> why), e.g. the incoming mount:
    # stages that read from them are refused like a full disk until it is back.
    unavailable: dict[str, str] = field(default_factory=dict)

    def set_unavailable(self, resource: str, why: str | None) -> None:
        with self._lock:
            if why:
                self.unavailable[resource] = why
            else:
                self.unavailable.pop(resource, None)

    def memory_budget_bytes(self, reading: Reading) -> int:
        budget = self.cfg.resources.memory_budget_gb * GB
        return int(budget or 0.85 * reading.memory_total_bytes)

    def refusals(self, stage: str, input_bytes: int, reading: Reading) -> list[str]:
        """Why an attempt of ``stage`` on ``input_bytes`` of input cannot start now ([] if
        it can). Each reason names the resource, what is needed and what there is."""
        need = estimate(self.cfg, stage, input_bytes)
        res = self.cfg.resources
        out = []
        with self._lock:
            reserved = sum(self._reserved.values())
        budget = self.memory_budget_bytes(reading)
        if reserved + need.memory_bytes > budget:
            out.append(
                f"memory: needs {need.memory_bytes / GB:.1f} GB, {reserved / GB:.1f} GB of the "
                f"{budget / GB:.1f} GB budget already reserved"
            )
        elif need.memory_bytes > reading.memory_available_bytes:
            out.append(
                f"memory: needs {need.memory_bytes / GB:.1f} GB, "
                f"{reading.memory_available_bytes / GB:.1f} GB available"
            )
        disk_need = need.disk_bytes * (1 + res.disk_margin_fraction) + res.min_free_disk_gb * GB
        if reading.disk_free_bytes < disk_need:
            out.append(
                f"disk: needs {disk_need / GB:.2f} GB free (estimate + "
                f"{res.disk_margin_fraction:.0%} + {res.min_free_disk_gb:g} GB reserve) on "
                f"{self.cfg.path('products')}, {reading.disk_free_bytes / GB:.2f} GB free"
            )
        if reading.fds_free < res.min_free_fds:
            out.append(f"file descriptors: {reading.fds_free} free, {res.min_free_fds} required")
        with self._lock:
            incoming = self.unavailable.get("incoming")
        if incoming and stage in RAW_READERS:
            out.append(f"incoming: {incoming}")
        return out

    def check(self, stage: str, input_bytes: int) -> list[str]:
        """Read the node and decide; record the stage as paused or running (logged on change)."""
        reading = self.probe.read(self.cfg)
        self.last = reading
        reasons = self.refusals(stage, input_bytes, reading)
        self._set_paused(stage, reasons)
        return reasons

    def reserve(self, key: tuple[str, int], stage: str, input_bytes: int) -> int:
        """Reserve the attempt's memory; return the threads granted to its worker.

        ``daemon.worker_threads`` when set; else the CPUs the running attempts' grants leave
        free, at least the fixed share (CPUs / max_parallel) and at most the stage's
        ``max_threads``. A grant is kept for the attempt's life, so a worker that started
        alone keeps its cores when another starts beside it: the node is then briefly
        oversubscribed, by at most (max_parallel - 1) x the fixed share (3 threads on 2
        cores), which costs less than leaving a core idle for a whole image.
        """
        daemon = self.cfg.daemon
        cap = self.cfg.stages[stage].max_threads
        with self._lock:
            self._reserved[key] = estimate(self.cfg, stage, input_bytes).memory_bytes
            threads = daemon.threads_per_worker(self.cpus)
            if not daemon.worker_threads:  # granted: what the running attempts leave free
                threads = max(threads, self.cpus - sum(self._threads.values()))
            if cap:
                threads = min(threads, cap)
            self._threads[key] = threads
        return threads

    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    def release(self, key: tuple[str, int]) -> None:
        with self._lock:
            self._reserved.pop(key, None)
            self._threads.pop(key, None)

    def paused(self) -> dict[str, list[str]]:
        with self._lock:
            return {k: list(v) for k, v in self._paused.items()}

    def clear(self, stage: str) -> None:
        """Nothing of ``stage`` waits any more: it is not paused (e.g. its queue emptied)."""
        self._set_paused(stage, [])

    def _set_paused(self, stage: str, reasons: list[str]) -> None:
        with self._lock:
            before = self._paused.get(stage)
            if reasons:
                self._paused[stage] = reasons
            else:
                self._paused.pop(stage, None)
        if _kinds(before or []) != _kinds(reasons):  # not on every change of a number
            if reasons:
                log.warning("intake.paused", stage=stage, reasons=reasons)
            else:
                log.info("intake.resumed", stage=stage)
            self.on_change(stage, reasons)


def _kinds(reasons: list[str]) -> list[str]:
    return [r.split(":", 1)[0] for r in reasons]
