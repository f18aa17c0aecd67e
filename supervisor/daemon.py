"""The daemon's main loop: recover from a previous life, then ingest, reap, claim and execute
until told to stop (or, with ``until_idle``, until nothing is runnable or waiting).

Start-up recovery, in order: kill stage workers that a dead daemon on this node left
running (recognised by pid + start time), return their groups to their checkpoint at once
(no need to wait for the lease: the owner is provably dead), and remove staging areas that
no live attempt owns. Raw incoming files are never touched.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from sqlalchemy import func, select

from supervisor import calibration
from supervisor.config import Config
from supervisor.db import Database
from supervisor.errors import Category, Failure
from supervisor.executor import StageExecutor
from supervisor.ingest import Ingestor
from supervisor.leases import Claim, Leases, Owner
from supervisor.models import Group, StageAttempt, utcnow
from supervisor.runner import kill_leftover
from supervisor.states import State, transition

log = structlog.get_logger(__name__)

ACTIVE_STATES = (State.PENDING.value, State.RUNNING.value, State.RETRY_WAIT.value)


@dataclass
class RunSummary:
    attempts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    leftovers_killed: int = 0
    reaped: list[str] = field(default_factory=list)
    staging_removed: int = 0


class Daemon:
    """One supervisor process on one node."""

    def __init__(
        self,
        cfg: Config,
        db: Database,
        *,
        clock: Callable[[], datetime] | None = None,
        rng: random.Random | None = None,
        ingest: bool = True,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.owner = Owner.this_process(cfg.daemon.node_name)
        self.leases = Leases(db, self.owner, lease_s=cfg.daemon.lease_s, clock=clock)
        self.stop_event = threading.Event()
        self.executor = StageExecutor(
            cfg, db, self.leases, rng=rng, should_stop=self.stop_event.is_set
        )
        self.ingestor = Ingestor(cfg, db, clock=clock or utcnow) if ingest else None
        self.summary = RunSummary()

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
            if kill_leftover(
                pid or -1, start_time or 0.0, self.cfg.daemon.term_grace_s, mark=workdir
            ):
                self.summary.leftovers_killed += 1
                log.warning("recover.killed_leftover_worker", group_id=group_id, pid=pid)
        self.summary.reaped += self.leases.reap(
            crash_budget=self.cfg.retry.crash_budget, only_dead_here=True
        )
        self.summary.staging_removed += self.remove_orphan_staging()

    def remove_orphan_staging(self) -> int:
        """Delete staging areas that no running attempt owns (rollback after a crash)."""
        staging = self.cfg.path("staging")
        if not staging.is_dir():
            return 0
        with self.db.transaction() as s:
            live = {
                (a.group_id, f"{a.stage}-t{a.fencing_token}")
                for a in s.scalars(select(StageAttempt).where(StageAttempt.outcome == "running"))
            }
        removed = 0
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

    # The loop -------------------------------------------------------------------------
    def run(self, *, until_idle: bool = False, max_attempts: int | None = None) -> RunSummary:
        self.recover()
        while not self.stop_event.is_set():
            if self.ingestor is not None:
                self.ingestor.scan()
            self.summary.reaped += self.leases.reap(crash_budget=self.cfg.retry.crash_budget)
            self._expire_waiting()
            claim = self.leases.claim_next()
            if claim is not None:
                try:
                    state = self.executor.execute(claim)
                except Exception as exc:  # noqa: BLE001 - one group must not stop the daemon
                    state = self._supervisor_error(claim, exc)
                self.summary.attempts += 1
                self.summary.outcomes[state] = self.summary.outcomes.get(state, 0) + 1
                if max_attempts is not None and self.summary.attempts >= max_attempts:
                    break
                continue
            if until_idle and not self._work_remains():
                break
            self.stop_event.wait(self._idle_wait_s())
        return self.summary

    def _expire_waiting(self) -> None:
        with self.db.transaction() as s:
            expired = calibration.expire_waiting(s, self.cfg, self.leases.now(s), self.leases.actor)
        for group_id in expired:
            log.warning("calibration.wait_expired", group_id=group_id)

    def _supervisor_error(self, claim: Claim, exc: Exception) -> str:
        """A bug or an environment fault in the supervisor itself while handling ``claim``:
        fail the group (fatal, with the traceback in the log), keep the daemon alive."""
        log.exception("supervisor.error", group_id=claim.group_id, stage=claim.stage)
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
                    transition(
                        s,
                        group,
                        State.FAILED,
                        now=self.leases.now(s),
                        actor=self.leases.actor,
                        fencing_token=claim.fencing_token,
                        failure=failure,
                        set_fields={"lease_owner": None, "lease_expires_at": None},
                    )
        except Exception:  # noqa: BLE001 - the lease will expire and the reaper takes over
            log.exception("supervisor.error_not_recorded", group_id=claim.group_id)
            return "lost"
        return State.FAILED.value

    def stop(self) -> None:
        self.stop_event.set()

    def _work_remains(self) -> bool:
        """Anything runnable, running or waiting to retry (ingest settling counts too)."""
        if self.ingestor is not None and self.ingestor.run_once().settling:
            return True
        with self.db.transaction() as s:
            active = s.scalar(
                select(func.count()).select_from(Group).where(Group.state.in_(ACTIVE_STATES))
            )
        return bool(active)

    def _idle_wait_s(self) -> float:
        """Sleep until the next retry is due, but at most the idle poll period."""
        wait = self.cfg.daemon.idle_poll_s
        with self.db.transaction() as s:
            due = s.scalar(
                select(func.min(Group.next_attempt_at)).where(Group.state == State.RETRY_WAIT.value)
            )
            now = self.leases.now(s)
        if due is not None:
            wait = min(wait, max(0.05, (due - now).total_seconds()))
        return wait
