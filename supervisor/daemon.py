"""The daemon: one supervisor process on one node, its whole lifecycle in this file.

Start-up: kill stage workers that a dead daemon on this node left running (recognised by
pid + start time and their attempt mark), return their groups to their checkpoint at once,
remove staging areas no live attempt owns, record this daemon in the ``daemons`` table (a
database write), start the periodic jobs (:mod:`supervisor.jobs`) and the HTTP listener,
then tell systemd READY=1.

The loop: whenever a slot is free (``daemon.max_parallel`` in all, ``stages.X.slots`` per
stage) claim the next runnable group whose stage has a slot and whose resource estimate is
admitted (:mod:`supervisor.resources`), and run the attempt in a thread of its own; each
attempt's worker wait and lease heartbeat live in that thread, so nothing blocks anything
else. Every turn of the loop that reaches the database is "progress": the watchdog thread
pings systemd (WATCHDOG=1) only while progress is recent, so a wedged loop or a stuck
database gets the daemon restarted, while a long stage does not.

Signals (installed by the CLI): SIGTERM/SIGINT → :meth:`Daemon.drain` (stop claiming; let
running attempts finish within ``daemon.drain_budget_s``; then stop their workers, which
leaves their groups pending at the stage that was running); a second SIGTERM →
:meth:`Daemon.stop` (stop the workers now). SIGHUP → :meth:`Daemon.request_reload`.
Raw incoming files are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

import structlog
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from supervisor import (
    __version__,
    backup,
    calibration,
    dbfile,
    faults,
    health,
    incoming,
    metrics,
    reconcile,
    retention,
    writable,
)
from supervisor.config import Config, load_config
from supervisor.db import Database, WritesRefused
from supervisor.errors import Category, ConfigError, Failure
from supervisor.executor import StageExecutor
from supervisor.ingest import Ingestor
from supervisor.jobs import PeriodicJobs
from supervisor.leases import Candidate, Claim, Leases, Owner, database_now
from supervisor.listener import Listener
from supervisor.models import CLAIMABLE_SQL, DaemonRecord, Group, StageAttempt, utcnow
from supervisor.notify import Notifier
from supervisor.policy import Classifier
from supervisor.resources import Admission, Probe
from supervisor.runner import kill_leftover, read_worker_identity
from supervisor.states import State, transition
from supervisor.status import queue_snapshot

log = structlog.get_logger(__name__)

ACTIVE_STATES = (State.PENDING.value, State.RETRY_WAIT.value, State.RUNNING.value)
# Settings a running daemon cannot take over on SIGHUP: they name what it already holds.
RESTART_ONLY = ("workspace", "paths", "database", "daemon.node_name", "daemon.listen")


@dataclass
class RunSummary:
    attempts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    leftovers_killed: int = 0
    reaped: list[str] = field(default_factory=list)
    staging_removed: int = 0
    drained: bool = True  # False when running attempts had to be stopped
    # run --until-idle gave up: work remained, nothing ran, and admission refused it
    # (stage -> reasons) for daemon.stall_exit_s
    stalled: dict[str, list[str]] = field(default_factory=dict)
    # Why the daemon stopped claiming for good: its database is corrupt or was removed
    # (run exits 2: restarting cannot fix it; the operator restores or rebuilds).
    halted: str | None = None


@dataclass
class InFlight:
    """An attempt running in its own thread."""

    claim: Claim
    thread: threading.Thread
    started: float  # time.monotonic()


@dataclass(frozen=True)
class ConfigSource:
    """Where the configuration came from, so that SIGHUP reads the same place again."""

    path: str | None = None
    workspace: str | None = None


class Daemon:
    """One supervisor process on one node (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        db: Database,
        *,
        clock: Callable[[], datetime] | None = None,
        rng: random.Random | None = None,
        ingest: bool = True,
        probe: Probe | None = None,
        notifier: Notifier | None = None,
        source: ConfigSource | None = None,
        listen: str = "",
        log_stream: TextIO | None = None,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.owner = Owner.this_process(cfg.daemon.node_name)
        self.leases = Leases(db, self.owner, lease_s=cfg.daemon.lease_s, clock=clock)
        self.draining = threading.Event()  # stop claiming
        self.stop_workers = threading.Event()  # stop running workers now
        self.wake = threading.Event()
        self.executor = StageExecutor(
            cfg, db, self.leases, rng=rng, should_stop=self.stop_workers.is_set
        )
        self.ingestor = Ingestor(cfg, db, clock=clock or utcnow) if ingest else None
        self.admission = Admission(cfg, probe or Probe(), on_change=self._on_pause_change)
        self.notifier = notifier or Notifier({})
        self.source = source
        self.listen = listen  # HOST:PORT of /healthz and /metrics; "" (library use): none
        self.log_stream = log_stream  # where logging goes when SIGHUP reconfigures it
        self.listener: Listener | None = None
        self.jobs = PeriodicJobs()
        self.summary = RunSummary()
        self.running: dict[tuple[str, int], InFlight] = {}  # Claim.key -> attempt
        self._lock = threading.Lock()
        self._ingest_lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._reload_requested = False
        self._progress_at = time.monotonic()
        self._stalled_since: float | None = None  # run --until-idle: admission refusing since
        self._row_written_at = 0.0
        self._state = "starting"
        self._last_status = ""
        self._waiting = 0  # pending + retry_wait groups, refreshed with the liveness row
        # The SQLite file this daemon opened (None: PostgreSQL), and its (device, inode):
        # a file removed or replaced under the daemon is noticed at the next loop turn.
        self._db_path = dbfile.sqlite_file(db.url)
        self._db_identity = dbfile.file_identity(self._db_path) if self._db_path else None
        self._backup_lock = threading.Lock()
        self._incoming_problem: str | None = None  # why the incoming mount is unusable
        for reason in metrics.DATABASE_HALT_REASONS:  # exported from the start, at 0
            metrics.DATABASE_HALTED.labels(reason).set(0)
        for result in ("ok", "failed"):
            metrics.BACKUPS.labels(result)

    # Start-up -------------------------------------------------------------------------
    def recover(self) -> None:
        """Clean up after a previous life of a daemon on this node (module docstring)."""
        node = self.owner.node
        with self.db.transaction() as s:
            orphans = [
                (a.id, a.group_id, a.pid, a.proc_start_time, a.owner, a.workdir)
                for a in s.scalars(select(StageAttempt).where(StageAttempt.outcome == "running"))
            ]
        for _id, group_id, pid, start_time, owner_text, workdir in orphans:
            owner = Owner.parse(owner_text)
            if owner is None or not owner.provably_dead_here(node):
                continue
            if not pid:  # a running attempt's pid is in its workdir (executor._on_worker_start)
                pid, start_time = read_worker_identity(Path(workdir)) or (None, None)
            if kill_leftover(
                pid or -1, start_time or 0.0, self.cfg.daemon.term_grace_s, mark=workdir
            ):
                self.summary.leftovers_killed += 1
                metrics.LEFTOVERS.inc()
                log.warning("recover.killed_leftover_worker", group_id=group_id, pid=pid)
        self.summary.reaped += self.leases.reap(
            crash_budget=self.cfg.retry.crash_budget, only_dead_here=True
        )
        self.summary.staging_removed += self.remove_orphan_staging()

    def remove_orphan_staging(self) -> int:
        """Delete staging areas, on disk and in tmpfs, that no running attempt owns
        (rollback after a crash)."""
        with self.db.transaction() as s:
            live = reconcile.live_staging_areas(s)
        removed = 0
        for area in reconcile.orphan_tmpfs_areas(self.cfg, live):
            shutil.rmtree(area, ignore_errors=True)
            removed += 1
            log.info("recover.tmpfs_staging_removed", path=str(area))
        staging = self.cfg.path("staging")
        if not staging.is_dir():
            return removed
        for group_dir in staging.iterdir():
            if not group_dir.is_dir():
                continue
            for area in group_dir.iterdir():
                if (group_dir.name, area.name) not in live:
                    shutil.rmtree(area, ignore_errors=True)
                    removed += 1
                    log.info("recover.staging_removed", path=str(area))
            with contextlib.suppress(OSError):
                group_dir.rmdir()
        return removed

    # The whole run --------------------------------------------------------------------
    def run(self, *, until_idle: bool = False, max_attempts: int | None = None) -> RunSummary:
        """Recover, start the jobs and the listener, loop until drained (or idle), stop."""
        self.recover()
        self._write_row("starting")  # READY below needs a database that takes writes
        self.jobs = PeriodicJobs()
        self._start_jobs()
        if self.listen:
            metrics.QUEUE.source = lambda: queue_snapshot(self.db)
            self.listener = Listener(self.listen, self.health_report)
            self.listener.start()
        self._state = "running"
        self._write_row("running")
        self._progress_at = time.monotonic()
        self.notifier.ready(self._status_text())
        watchdog = self._start_watchdog()  # after READY=1: systemd expects that order
        log.info(
            "daemon.ready",
            owner=str(self.owner),
            max_parallel=self.cfg.daemon.max_parallel,
            listen=self.listener.address if self.listener else None,
            watchdog_s=self.notifier.watchdog_usec / 1e6 or None,
        )
        try:
            self._loop(until_idle=until_idle, max_attempts=max_attempts)
        finally:
            self._finish_running()
            self.jobs.shutdown()
            if self.listener is not None:
                self.listener.close()
            self._state = "stopped"
            with contextlib.suppress(Exception):
                self._write_row("stopped")  # (refused when halted: the file stays as it is)
            if watchdog is not None:
                watchdog.join(timeout=5)
            log.info(
                "daemon.stopped",
                attempts=self.summary.attempts,
                drained=self.summary.drained,
            )
        return self.summary

    def _loop(self, *, until_idle: bool, max_attempts: int | None) -> None:
        while not self.draining.is_set():
            if self._reload_requested:
                self._reload()
            self._collect_finished()
            if self.summary.halted is None:
                self._check_database_file()
            if self.summary.halted is not None:
                if until_idle:
                    break
                # The service stays up, claiming nothing, so /healthz and /metrics say why
                # (the watchdog keeps being fed: the loop is alive and doing what it must).
                self._progress_at = time.monotonic()
                self.wake.wait(self.cfg.daemon.idle_poll_s)
                self.wake.clear()
                continue
            try:
                self._heartbeat_row()
                claimed = self._fill_slots(max_attempts)
            except Exception as exc:  # noqa: BLE001 - a database outage: no progress, keep trying
                if dbfile.is_corruption(exc):
                    self.halt("corrupt", f"database {self._db_path} is corrupt: {exc}")
                    continue
                log.exception("loop.database_error")
                self.wake.wait(1.0)
                continue
            self._progress_at = time.monotonic()
            metrics.LOOP_HEARTBEAT.set_to_current_time()
            self._update_status()
            limit_reached = max_attempts is not None and self.summary.attempts >= max_attempts
            if limit_reached and not self.running:
                break
            if until_idle and not claimed and not self.running:
                if not self._work_remains():
                    break
                if self._stalled():
                    break
            else:
                self._stalled_since = None
            if not claimed:
                self.wake.wait(self._idle_wait_s())
                self.wake.clear()

    # Slots and attempts -----------------------------------------------------------------
    def _fill_slots(self, max_attempts: int | None) -> bool:
        """Claim attempts while slots are free; True if any was claimed."""
        claimed = False
        while not self.draining.is_set():
            if max_attempts is not None and self.summary.attempts >= max_attempts:
                break
            if len(self.running) >= self.cfg.daemon.max_parallel:
                break
            busy: dict[str, int] = {}
            for item in self.running.values():
                busy[item.claim.stage] = busy.get(item.claim.stage, 0) + 1
            open_stages = [
                name for name, sc in self.cfg.stages.items() if busy.get(name, 0) < sc.slots
            ]
            checked: set[str] = set()
            with self._claim_lock:  # the reaper must see a claim and its registration at once
                claim = self.leases.claim_next(
                    stages=open_stages, admit=functools.partial(self._admit, checked)
                )
                if claim is not None:
                    self._start_attempt(claim)
            for stage in set(self.admission.paused()) - checked:
                if stage in open_stages:
                    self.admission.clear(stage)  # nothing of it is waiting any more
            if claim is None:
                break
            claimed = True
        return claimed

    def _admit(self, checked: set[str], candidate: Candidate) -> list[str]:
        """Why ``candidate``'s next stage cannot start now ([] when it can)."""
        checked.add(candidate.stage)
        return self.admission.check(candidate.stage, candidate.input_bytes)

    def _start_attempt(self, claim: Claim) -> None:
        threads = self.admission.reserve(claim.key, claim.stage, claim.input_bytes)
        thread = threading.Thread(
            target=self._attempt,
            args=(claim, threads),
            name=f"attempt-{claim.group_id}-{claim.stage}",
            daemon=True,
        )
        with self._lock:
            self.running[claim.key] = InFlight(claim, thread, time.monotonic())
            self.summary.attempts += 1
        metrics.IN_FLIGHT.labels(claim.stage).inc()
        faults.point("after_claim")
        thread.start()

    def _attempt(self, claim: Claim, threads: int) -> None:
        """One attempt, in its own thread (its worker granted ``threads`` CPU threads);
        every log line of it carries its identity."""
        with structlog.contextvars.bound_contextvars(
            group_id=claim.group_id,
            stage=claim.stage,
            attempt=claim.attempt,
            correlation_id=claim.correlation_id,
        ):
            try:
                state = self.executor.execute(claim, threads=threads)
            except WritesRefused:
                # Halted on a damaged database: the group resumes at its checkpoint once
                # the database is recovered (its worker was stopped).
                log.warning("attempt.not_recorded_database_halted")
                state = "lost"
            except DBAPIError as exc:
                # The database failed (locked past its timeout, gone): not the group's
                # fault. The group stays claimed under a token no attempt holds any more;
                # the reaper hands it back to its checkpoint.
                log.warning("attempt.database_error", error=str(exc)[:500])
                if dbfile.is_corruption(exc):
                    self.halt("corrupt", f"database {self._db_path} is corrupt: {exc}")
                state = "lost"
            except Exception as exc:  # noqa: BLE001 - one group must not stop the daemon
                state = self._supervisor_error(claim, exc)
        with self._lock:
            self.summary.outcomes[state] = self.summary.outcomes.get(state, 0) + 1
        metrics.ATTEMPTS.labels(claim.stage, state).inc()
        metrics.IN_FLIGHT.labels(claim.stage).dec()
        self.admission.release(claim.key)
        self.wake.set()

    def _collect_finished(self) -> None:
        with self._lock:
            done = [k for k, item in self.running.items() if not item.thread.is_alive()]
            for key in done:
                self.running.pop(key).thread.join()

    def _finish_running(self) -> None:
        """Drain: let running attempts finish within the budget, then stop their workers
        (their groups go back to pending at the stage that was running)."""
        self._collect_finished()
        if not self.running:
            return
        budget = self.cfg.daemon.drain_budget_s
        deadline = time.monotonic() + budget
        log.info("daemon.draining", running=len(self.running), budget_s=budget)
        while self.running and not self.stop_workers.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("daemon.drain_budget_spent", stopping=len(self.running))
                break
            self.notifier.extend_timeout(left + self._stop_margin_s(), self._status_text())
            faults.point("during_drain")
            with contextlib.suppress(Exception):
                self._heartbeat_row()
            self._progress_at = time.monotonic()
            self.wake.wait(min(1.0, left))
            self.wake.clear()
            self._collect_finished()
        if self.running:
            self.summary.drained = False
            self.stop_workers.set()
            self.notifier.extend_timeout(self._stop_margin_s(), "stopping running attempts")
        for item in list(self.running.values()):
            item.thread.join(timeout=self._stop_margin_s())
        self._collect_finished()

    def _stop_margin_s(self) -> float:
        """Time to stop workers: SIGTERM grace, SIGKILL wait, and the hand-back commit."""
        return self.cfg.daemon.term_grace_s + 30.0

    def _supervisor_error(self, claim: Claim, exc: Exception) -> str:
        """A bug or an environment fault in the supervisor itself while handling ``claim``:
        fail the group (fatal, with the traceback in the log), keep the daemon alive."""
        log.exception("supervisor.error", group_id=claim.group_id, stage=claim.stage)
        if isinstance(exc, PermissionError):
            # A directory of this group made by another user (a command run as root): the
            # node's fault, not the data's; it needs a human, and `retry` resumes the stage.
            failure = Failure(
                Category.FATAL,
                "permission_denied",
                f"{claim.stage}: this daemon ({writable.process_user()}) cannot write "
                f"{exc.filename}: {exc.strerror}",
                f"another user (often root) made it: {writable.chown_hint([exc.filename])}, "
                "then `retry` the group",
                path=str(exc.filename) if exc.filename else None,
            )
        else:
            failure = Failure(
                Category.FATAL,
                "supervisor_error",
                f"{claim.stage}: supervisor error {type(exc).__name__}: {exc}",
                "a bug in contimg-supervisor or its environment: see the daemon log, "
                "fix, then `retry` the group",
            )
        try:
            with self.db.transaction() as s:
                group = s.get(Group, claim.group_id)
                if group is not None:
                    now = self.leases.now(s)
                    transition(
                        s,
                        group,
                        State.FAILED,
                        now=now,
                        actor=self.leases.actor,
                        fencing_token=claim.fencing_token,
                        failure=failure,
                        set_fields={"lease_owner": None, "lease_expires_at": None},
                    )
                    # The attempt ends with its group (else it stays `running`, an orphan
                    # that only check-state would close).
                    for attempt in s.scalars(
                        select(StageAttempt).where(
                            StageAttempt.group_id == claim.group_id,
                            StageAttempt.fencing_token == claim.fencing_token,
                            StageAttempt.outcome == "running",
                        )
                    ):
                        attempt.outcome = "failed"
                        attempt.finished_at = now
                        attempt.error_category = str(failure.category)
                        attempt.error_code = failure.code
                        attempt.error_message = failure.message
                        attempt.hint = failure.hint
        except Exception:  # noqa: BLE001 - the lease will expire and the reaper takes over
            log.exception("supervisor.error_not_recorded", group_id=claim.group_id)
            return "lost"
        return State.FAILED.value

    # The database file ---------------------------------------------------------------------
    def halt(self, reason: str, message: str) -> None:
        """Stop claiming for good (the database is corrupt or gone): running workers are
        stopped (their groups resume at their checkpoint once the database is recovered),
        nothing more is written, and health, metrics and the log say what to run."""
        if self.summary.halted is not None:
            return
        self.summary.halted = message
        self.db.refuse_writes(message)
        self.stop_workers.set()
        metrics.DATABASE_HALTED.labels(reason).set(1)
        log.critical(
            "database.halted",
            reason=reason,
            message=message,
            recover="stop the service, then `contimg-supervisor db restore BACKUP` (newest in "
            f"{self.cfg.path('backups')}) or `contimg-supervisor db rebuild`",
        )
        self.notifier.status(f"halted: {message}")
        self.wake.set()

    def _check_database_file(self) -> None:
        """The SQLite file removed or replaced under the running daemon (someone `rm`'d it):
        save what the open connections still see into a backup, then halt."""
        if self._db_path is None or self._db_identity is None:
            return
        if dbfile.file_identity(self._db_path) == self._db_identity:
            return
        saved = self._backup_from_open_connection()
        self.halt(
            "unlinked",
            f"database {self._db_path} was removed or replaced while the daemon ran"
            + (f"; its last state was saved to {saved}" if saved else "; it could not be saved"),
        )

    def _backup_from_open_connection(self) -> Path | None:
        now = utcnow()
        out = self.cfg.path("backups") / backup.backup_name(now)
        try:
            raw = self.db.engine.raw_connection()
            try:
                conn = raw.driver_connection
                with self._backup_lock:
                    backup.take(conn, out, now=now, source_name=f"{self._db_path} (unlinked)")
            finally:
                raw.close()
        except Exception:  # noqa: BLE001 - the halt must happen whatever the backup does
            log.exception("database.unlinked_backup_failed")
            return None
        return out

    def _backup(self) -> None:
        """The periodic online backup (SQLite): verified, pruned to its generations; a copy
        that fails integrity_check means the live database is corrupt."""
        if self._db_path is None or self.summary.halted is not None:
            return
        now = utcnow()
        out = self.cfg.path("backups") / backup.backup_name(now)
        try:
            with self._backup_lock:
                backup.take(self._db_path, out, now=now)
        except backup.BackupError as exc:
            metrics.BACKUPS.labels("failed").inc()
            if "integrity_check" in str(exc):
                self.halt("corrupt", f"database {self._db_path} is corrupt: {exc}")
            log.error("backup.failed", error=str(exc)[:1000])
            self._set_backup_age(now)
            raise
        except Exception as exc:
            metrics.BACKUPS.labels("failed").inc()
            if dbfile.is_corruption(exc):
                self.halt("corrupt", f"database {self._db_path} is corrupt: {exc}")
            self._set_backup_age(now)
            raise
        metrics.BACKUPS.labels("ok").inc()
        removed = backup.prune(
            out.parent,
            now,
            hourly_h=self.cfg.backup.keep_hourly_h,
            daily_d=self.cfg.backup.keep_daily_d,
        )
        if removed:
            log.info("backup.pruned", removed=[str(p) for p in removed])
        self._set_backup_age(now)

    def _set_backup_age(self, now: datetime) -> None:
        age = backup.age_seconds(self.cfg.path("backups"), now)
        metrics.BACKUP_AGE.set(float("inf") if age is None else age)

    # Signals ----------------------------------------------------------------------------
    def drain(self) -> None:
        """Stop claiming; running attempts get ``daemon.drain_budget_s`` to finish."""
        if not self.draining.is_set():
            self.draining.set()
            self._state = "draining"
            log.info("daemon.drain_requested", running=len(self.running))
            self.notifier.stopping(
                "draining: " + self._status_text(),
                self.cfg.daemon.drain_budget_s + self._stop_margin_s(),
            )
        self.wake.set()

    def stop(self) -> None:
        """Stop now: no more claims, and running workers are stopped (groups resumable)."""
        self.draining.set()
        self.stop_workers.set()
        self._state = "draining"
        self.wake.set()

    def request_reload(self) -> None:
        self._reload_requested = True
        self.wake.set()

    def _reload(self) -> None:
        """Read the configuration again. An invalid file keeps the old configuration (every
        problem logged); settings that need a restart are reported and kept as they were."""
        self._reload_requested = False
        faults.point("during_reload")
        source = self.source or ConfigSource()
        try:
            new = load_config(source.path, workspace=source.workspace)
        except ConfigError as exc:
            log.error("config.reload_rejected", problems=exc.problems, kept="previous config")
            return
        old = self.cfg
        needs_restart = [key for key in RESTART_ONLY if _get(new, key) != _get(old, key)]
        new = dataclasses.replace(
            new,
            workspace=old.workspace,
            paths=old.paths,
            database=old.database,
            daemon=dataclasses.replace(
                new.daemon, node_name=old.daemon.node_name, listen=old.daemon.listen
            ),
        )
        before, after = _flatten(old.as_dict()), _flatten(new.as_dict())
        changed = sorted(k for k, v in after.items() if before.get(k) != v)
        self._apply_config(new)
        if needs_restart:
            log.warning("config.reload_needs_restart", keys=needs_restart, kept="running values")
        log.info("config.reloaded", changed=changed)

    def _apply_config(self, cfg: Config) -> None:
        from supervisor.logs import configure_logging

        self.cfg = cfg
        self.executor.cfg = cfg
        self.executor.classifier = Classifier(cfg.policy)
        self.admission.cfg = cfg
        self.leases.lease = timedelta(seconds=cfg.daemon.lease_s)
        if self.ingestor is not None:
            self.ingestor.cfg = cfg
        if self.log_stream is not None:
            configure_logging(cfg.logging.level, cfg.logging.format, stream=self.log_stream)
        for name, interval in self._job_intervals().items():
            if name in self.jobs.jobs:
                self.jobs.reschedule(name, interval)

    # Periodic jobs ----------------------------------------------------------------------
    def _job_intervals(self) -> dict[str, float]:
        return {
            "ingest": self.cfg.ingest.poll_interval_s,
            "reaper": self.cfg.daemon.reap_interval_s,
            "calibration_expiry": 60.0,
            "resource_monitor": self.cfg.resources.monitor_interval_s,
            "state_check": self.cfg.health.state_check_interval_s,
            "retention": self.cfg.retention.interval_s,
            "backup": self.cfg.backup.interval_s,
        }

    def _start_jobs(self) -> None:
        funcs: dict[str, Callable[[], object]] = {
            "reaper": self._reap,
            "calibration_expiry": self._expire_waiting,
            "resource_monitor": self._monitor_resources,
            "state_check": self._state_check,
            "retention": self._retention,
        }
        if self._db_path is not None and self.cfg.backup.enabled:
            funcs["backup"] = self._backup
            self._set_backup_age(utcnow())
        if self.ingestor is not None:
            funcs["ingest"] = self._ingest
        for name, interval in self._job_intervals().items():
            if name in funcs:
                self.jobs.add(name, funcs[name], interval)
        self.jobs.start()

    def _ingest(self) -> None:
        assert self.ingestor is not None
        if not self._incoming_ok():
            return  # an outage of the raw-data storage: nothing to scan, nothing to blame
        with self._ingest_lock:  # the idle check scans too; never two scans at once
            report = self.ingestor.scan()
        if report.groups_pending:
            self.wake.set()

    def _incoming_ok(self) -> bool:
        """Look at the incoming mount (bounded by ingest.io_timeout_s); while it is out,
        stages that read raw files are refused by admission (intake paused, resource
        "incoming") and health is unhealthy; said once when it goes and when it is back."""
        state = incoming.look(self.cfg)
        before = self._incoming_problem
        self._incoming_problem = None if state.ok else state.detail
        self.admission.set_unavailable("incoming", self._incoming_problem)
        metrics.INCOMING_AVAILABLE.set(1 if state.ok else 0)
        if state.ok and before is not None:
            log.info("ingest.incoming_back", path=str(state.path))
            self.wake.set()
        elif not state.ok and before is None:
            log.error("ingest.incoming_unavailable", path=str(state.path), reason=state.detail)
        return state.ok

    def _reap(self) -> None:
        with self._claim_lock:
            with self._lock:
                held = set(self.running)
            reaped = self.leases.reap(crash_budget=self.cfg.retry.crash_budget, held_claims=held)
        if reaped:
            self.summary.reaped += reaped
            self.wake.set()

    def _expire_waiting(self) -> None:
        with self.db.transaction() as s:
            now = self.leases.now(s)
            released = calibration.recheck_waiting(s, self.cfg, now, self.leases.actor)
            expired = calibration.expire_waiting(s, self.cfg, now, self.leases.actor)
        for group_id in released:
            log.info("calibration.wait_released", group_id=group_id)
        if released:
            self.wake.set()
        for group_id in expired:
            log.warning("calibration.wait_expired", group_id=group_id)

    def _monitor_resources(self) -> None:
        reading = self.admission.probe.read(self.cfg)
        self.admission.last = reading
        metrics.DISK_FREE.labels("products").set(reading.disk_free_bytes)
        if reading.tmpfs_free_bytes is not None:
            metrics.DISK_FREE.labels("tmpfs").set(reading.tmpfs_free_bytes)
        metrics.DISK_RESERVE.set(self.cfg.resources.min_free_disk_gb * 1024**3)
        metrics.MEMORY_AVAILABLE.set(reading.memory_available_bytes)
        metrics.MEMORY_RESERVED.set(self.admission.reserved_bytes())
        if self.admission.paused():
            self.wake.set()  # a paused stage may fit again: let the loop look

    def _state_check(self) -> None:
        """check-state, report only (an operator runs ``check-state --repair``)."""
        findings = reconcile.check_state(self.cfg, self.db, repair=False)
        counts: dict[str, int] = {}
        for f in findings:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        for kind in reconcile.FINDING_KINDS:
            metrics.CHECK_FINDINGS.labels(kind).set(counts.get(kind, 0))

    def _retention(self) -> None:
        retention.apply_retention(self.cfg, self.db)

    # Liveness, status, health -----------------------------------------------------------
    def _heartbeat_row(self) -> None:
        if time.monotonic() - self._row_written_at >= self.cfg.daemon.heartbeat_row_s:
            self._write_row(self._state)

    def _write_row(self, state: str) -> None:
        with self.db.transaction() as s:
            now = database_now(s)
            self._waiting = int(
                s.scalar(
                    select(func.count())
                    .select_from(Group)
                    .where(Group.state.in_((State.PENDING.value, State.RETRY_WAIT.value)))
                )
                or 0
            )
            row = s.get(DaemonRecord, str(self.owner))
            status = self._status_dict()
            if row is None:
                s.add(
                    DaemonRecord(
                        owner=str(self.owner),
                        node=self.owner.node,
                        pid=self.owner.pid,
                        version=__version__,
                        started_at=now,
                        heartbeat_at=now,
                        state=state,
                        status=status,
                    )
                )
            else:
                row.heartbeat_at, row.state, row.status = now, state, status
        self._row_written_at = time.monotonic()

    def _status_dict(self) -> dict[str, object]:
        with self._lock:
            in_flight = [
                {
                    "group_id": item.claim.group_id,
                    "stage": item.claim.stage,
                    "attempt": item.claim.attempt,
                    "seconds": round(time.monotonic() - item.started, 1),
                }
                for item in self.running.values()
            ]
        return {
            "in_flight": in_flight,
            "waiting_to_run": self._waiting,
            "paused": self.admission.paused(),
            "listen": self.listener.address if self.listener else None,
        }

    def _status_text(self) -> str:
        with self._lock:
            flying = ", ".join(f"{i.claim.stage} {i.claim.group_id}" for i in self.running.values())
        paused = self.admission.paused()
        text = (
            f"{self._state}; in flight {len(self.running)}/{self.cfg.daemon.max_parallel}"
            f"; {self._waiting} waiting to run"
        )
        if flying:
            text += f" ({flying})"
        if paused:
            text += "; paused " + "; ".join(f"{k}: {v[0]}" for k, v in paused.items())
        return text

    def _update_status(self) -> None:
        text = self._status_text()
        if text != self._last_status:
            self._last_status = text
            self.notifier.status(text)

    def _on_pause_change(self, stage: str, reasons: list[str]) -> None:
        kinds = {r.split(":", 1)[0] for r in reasons}
        for resource in metrics.RESOURCE_RESOURCES:
            metrics.INTAKE_PAUSED.labels(stage, resource).set(1 if resource in kinds else 0)

    def live_loop(self) -> health.LiveLoop:
        return health.LiveLoop(
            seconds_since_progress=time.monotonic() - self._progress_at,
            paused=self.admission.paused(),
            in_flight=len(self.running),
            state=self._state,
            halted=self.summary.halted,
        )

    def health_report(self) -> dict[str, object]:
        if self.summary.halted is not None:  # the health report writes: not to this database
            return health.corrupt_report(self.cfg, self.summary.halted)
        return health.report(self.cfg, self.db, self.live_loop())

    def _start_watchdog(self) -> threading.Thread | None:
        """Ping systemd's watchdog only while the loop makes progress (module docstring)."""
        interval = self.notifier.watchdog_interval_s
        if interval <= 0:
            return None
        limit = self.notifier.watchdog_usec / 1e6

        def ping() -> None:
            while self._state != "stopped":
                if time.monotonic() - self._progress_at < limit:
                    self.notifier.watchdog()
                else:
                    log.error(
                        "watchdog.withheld",
                        seconds_since_progress=round(time.monotonic() - self._progress_at, 1),
                    )
                time.sleep(interval)

        thread = threading.Thread(target=ping, name="watchdog", daemon=True)
        thread.start()
        return thread

    # Idle -------------------------------------------------------------------------------
    def _work_remains(self) -> bool:
        """Anything runnable, running or waiting to retry (ingest settling counts too).
        Runs the housekeeping jobs first, so that an idle decision is never stale."""
        if self.ingestor is not None and self._incoming_ok():
            with self._ingest_lock:
                settling = self.ingestor.run_once().settling
            if settling:
                return True
        self.jobs.run_now("reaper")
        self.jobs.run_now("calibration_expiry")
        with self.db.read() as s:
            active = s.scalar(
                select(func.count()).select_from(Group).where(Group.state.in_(ACTIVE_STATES))
            )
        return bool(active)

    def _stalled(self) -> bool:
        """run --until-idle with nothing running and work left: True once admission has
        refused that work for ``daemon.stall_exit_s`` (nothing will free the disk or memory
        it waits for, so a batch run says so and stops instead of waiting for ever; the
        service waits, its health and metrics showing the pause)."""
        paused = self.admission.paused()
        if not paused:
            self._stalled_since = None
            return False
        now = time.monotonic()
        if self._stalled_since is None:
            self._stalled_since = now
        if now - self._stalled_since < self.cfg.daemon.stall_exit_s:
            return False
        self.summary.stalled = {stage: list(reasons) for stage, reasons in paused.items()}
        log.error("daemon.stalled", paused=self.summary.stalled)
        return True

    def _idle_wait_s(self) -> float:
        """Sleep until the next retry is due, but at most the idle poll period."""
        wait = min(self.cfg.daemon.idle_poll_s, self.cfg.daemon.heartbeat_row_s)
        if len(self.running) >= self.cfg.daemon.max_parallel:
            return wait  # every slot busy: only an attempt's end (it wakes us) frees one
        with self.db.read() as s:
            due = s.scalar(
                select(func.min(Group.next_attempt_at)).where(
                    text(CLAIMABLE_SQL), Group.state == State.RETRY_WAIT.value
                )
            )
            now = self.leases.now(s)
        if due is not None:
            wait = min(wait, max(0.05, (due - now).total_seconds()))
        return wait


def _get(cfg: Config, dotted: str) -> object:
    value: object = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "params":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
