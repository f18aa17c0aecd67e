"""Claims on groups: who runs what, for how long (a lease on the database clock), and the reaper
that returns abandoned work to its last checkpoint.

A claim bumps the group's fencing token; every later write by the claimant names that token,
so a worker whose lease was reaped (and the group re-claimed) can change nothing.
Claim order: calibrator groups first (``priority``), then observation time.
PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets several nodes claim from one queue; SQLite:
the transaction is ``BEGIN IMMEDIATE`` (see :mod:`supervisor.db`).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psutil
import structlog
from sqlalchemy import Connection, Select, and_, bindparam, func, or_, select, text, update
from sqlalchemy.orm import Session

from supervisor import metrics
from supervisor.db import Database, dialect_of, is_sqlite
from supervisor.errors import Category, Failure
from supervisor.models import CLAIMABLE_SQL, Group, StageAttempt, SubbandFile, UTCDateTime
from supervisor.states import Actor, GroupView, State, move_group, transition

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Owner:
    """A lease owner: node, pid and process start time (pid reuse cannot impersonate it)."""

    node: str
    pid: int
    start_time: float

    def __str__(self) -> str:
        return f"{self.node}:{self.pid}:{self.start_time:.3f}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            node, pid, start = text.rsplit(":", 2)
            return cls(node, int(pid), float(start))
        except (ValueError, AttributeError):
            return None

    @classmethod
    def this_process(cls, node_name: str = "") -> Owner:
        pid = os.getpid()
        return cls(node_name or socket.gethostname(), pid, psutil.Process(pid).create_time())

    def provably_alive_here(self, node: str) -> bool:
        """True only if this owner runs on ``node`` (this node) and its process still lives."""
        if self.node != node:
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.start_time) < 0.01
        except psutil.NoSuchProcess:
            return False

    def provably_dead_here(self, node: str) -> bool:
        return self.node == node and not self.provably_alive_here(node)


@dataclass(frozen=True, slots=True)
class Claim:
    """A group claimed to run one stage attempt. Fencing tokens count per group: the pair
    (group_id, fencing_token) is what identifies a claim (see :attr:`key`)."""

    group_id: str
    stage: str
    attempt: int  # 1-based, within the current fallback tier
    tier: int
    fencing_token: int
    owner: str
    correlation_id: str
    lease_expires_at: datetime
    input_bytes: int = 0  # the group's ready UVH5 bytes (resource estimates scale with it)

    @property
    def key(self) -> tuple[str, int]:
        return (self.group_id, self.fencing_token)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A claimable group as admission sees it."""

    group_id: str
    stage: str  # the stage it would run
    input_bytes: int  # its ready UVH5 bytes


def database_now(session: Session | Connection) -> datetime:
    """The database server's clock, as aware UTC (leases must not trust node clocks).

    SQLite has no server: its ``'now'`` is this node's clock, the only one every daemon
    sharing the file reads (one node), so it is read here without a query."""
    if dialect_of(session).name == "sqlite":
        return datetime.now(UTC)
    value = session.execute(text("SELECT clock_timestamp() AT TIME ZONE 'UTC'")).scalar_one()
    return value.replace(tzinfo=UTC)


class Leases:
    """Claim, renew and reap leases for one owner."""

    def __init__(
        self,
        db: Database,
        owner: Owner,
        *,
        lease_s: float,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.db = db
        self.owner = owner
        self.actor = Actor(str(owner))
        self.lease = timedelta(seconds=lease_s)
        self._clock = clock

    def now(self, session: Session | Connection) -> datetime:
        return self._clock() if self._clock is not None else database_now(session)

    def claim_next(
        self,
        stages: Collection[str] | None = None,
        admit: Callable[[Candidate], list[str]] | None = None,
        scan_limit: int = 32,
    ) -> Claim | None:
        """Claim the next runnable group, or return None when there is none.

        ``stages``: only groups whose next stage is one of these (slots free). ``admit``:
        called with a candidate (its next stage and UVH5 input bytes), returns why it cannot
        start now; a refused candidate's stage is passed over for this claim (intake paused)
        while other stages may still be claimed. Order: calibrator groups first, then
        observation time. Core statements, not ORM objects: this runs before every stage.
        """
        with self.db.core() as s:
            now = self.now(s)
            wanted = None if stages is None else sorted(stages)
            if wanted == []:
                return None  # no slot open for any stage
            query = _claim_query(
                None if wanted is None else len(wanted), is_sqlite(self.db.engine), scan_limit
            )
            params: dict[str, object] = {"now": now}
            params.update({f"stage{i}": name for i, name in enumerate(wanted or ())})
            refused: set[str] = set()
            chosen = None
            for row in s.execute(query, params):
                candidate = Candidate(row.group_id, row.stage or "", int(row.input_bytes or 0))
                if candidate.stage in refused:
                    continue
                if admit is not None and admit(candidate):
                    refused.add(candidate.stage)
                    continue
                chosen = row
                break
            if chosen is None:
                return None
            token = chosen.fencing_token + 1
            expires = now + self.lease
            moved = move_group(
                s,
                GroupView(chosen.group_id, chosen.state, chosen.stage),
                State.RUNNING,
                now=now,
                actor=self.actor,
                message=f"claimed {chosen.stage} attempt {chosen.attempt + 1}",
                set_fields={
                    "fencing_token": token,
                    "lease_owner": str(self.owner),
                    "lease_expires_at": expires,
                    "attempt": chosen.attempt + 1,
                    "next_attempt_at": None,
                },
            )
            return Claim(
                chosen.group_id,
                moved["stage"] or "",
                moved["attempt"],
                moved["fallback_tier"],
                token,
                str(self.owner),
                moved["correlation_id"],
                expires,
                int(chosen.input_bytes or 0),
            )

    def heartbeat(self, claim: Claim) -> bool:
        """Extend the lease; False means it was lost (reaped, re-claimed or operator action)."""
        with self.db.transaction() as s:
            now = self.now(s)
            result = s.execute(
                update(Group)
                .where(
                    Group.group_id == claim.group_id,
                    Group.fencing_token == claim.fencing_token,
                    Group.state == State.RUNNING.value,
                )
                .values(lease_expires_at=now + self.lease)
            )
            return result.rowcount == 1  # type: ignore[attr-defined]

    def reap(
        self,
        *,
        crash_budget: int,
        only_dead_here: bool = False,
        held_claims: Collection[tuple[str, int]] | None = None,
    ) -> list[str]:
        """Return running groups whose lease expired (or whose owner provably died on this
        node) to their checkpoint: ``pending`` at the stage that was running, which never
        committed. The fencing token moves on, so the old owner can no longer write.

        A daemon's death (restart, watchdog, operator, a crash of its own) is not the
        group's fault and costs it nothing. Only evidence that the attempt took the node
        down counts against its crash budget: its owner ran on this node and started before
        the node's last boot (the node restarted while the group was running). A group that
        did that more than ``crash_budget`` times in a row is failed.

        ``held_claims``: the (group, fencing token) pairs this very process still works on.
        A group it owns under any other claim lost its attempt (the thread ended without handing the
        group back, e.g. the database failed at that moment) and is reaped too, although
        its owner is alive.
        """
        reaped = []
        boot_time = psutil.boot_time()
        with self.db.transaction() as s:
            now = self.now(s)
            running = s.scalars(select(Group).where(Group.state == State.RUNNING.value)).all()
            for group in running:
                owner = Owner.parse(group.lease_owner or "")
                dead_here = owner is not None and owner.provably_dead_here(self.owner.node)
                expired = group.lease_expires_at is not None and group.lease_expires_at < now
                dropped = (
                    held_claims is not None
                    and owner == self.owner
                    and (group.group_id, group.fencing_token) not in held_claims
                )
                if owner is not None and owner.provably_alive_here(self.owner.node) and not dropped:
                    continue  # never while the owner is provably alive on this node
                if not (dropped or dead_here or (expired and not only_dead_here)):
                    continue
                node_restarted = dead_here and owner is not None and owner.start_time < boot_time
                if dropped:
                    why = "its attempt ended without handing the group back"
                elif node_restarted:
                    why = "the node restarted while this stage ran"
                elif dead_here:
                    why = "owner process died"
                else:
                    why = "lease expired"
                self._abandon_attempts(s, group, now, why)
                crashes = group.crash_count + (1 if node_restarted else 0)
                fields = {
                    "fencing_token": group.fencing_token + 1,
                    "lease_owner": None,
                    "lease_expires_at": None,
                    "crash_count": crashes,
                }
                message = f"{why} (owner {group.lease_owner}); back to checkpoint {group.stage}"
                if node_restarted:
                    message += f" [counts against the crash budget: {crashes} of {crash_budget}]"
                else:
                    message += " [not the group's fault: no crash counted]"
                if crashes > crash_budget:
                    failure = Failure(
                        Category.FATAL,
                        "abandoned_too_often",
                        f"{message}; the node restarted {crashes} times while this stage ran "
                        f"(crash budget {crash_budget})",
                        "the stage may be taking the node down (memory?): inspect the "
                        "attempt's logs and the node's journal, then `retry` the group",
                    )
                    transition(
                        s,
                        group,
                        State.FAILED,
                        now=now,
                        actor=self.actor,
                        failure=failure,
                        set_fields=fields,
                    )
                else:
                    transition(
                        s,
                        group,
                        State.PENDING,
                        now=now,
                        actor=self.actor,
                        message=message,
                        set_fields=fields,
                    )
                metrics.REAPED.labels(
                    "node_restarted"
                    if node_restarted
                    else "owner_died"
                    if dead_here
                    else "lease_expired"
                ).inc()
                log.warning(
                    "lease.reaped",
                    group_id=group.group_id,
                    stage=group.stage,
                    reason=why,
                    counted=node_restarted,
                    owner=owner and str(owner),
                    correlation_id=group.correlation_id,
                )
                reaped.append(group.group_id)
        return reaped

    @staticmethod
    def _abandon_attempts(s: Session, group: Group, now: datetime, why: str) -> None:
        for attempt in s.scalars(
            select(StageAttempt).where(
                StageAttempt.group_id == group.group_id, StageAttempt.outcome == "running"
            )
        ):
            attempt.outcome = "abandoned"
            attempt.finished_at = now
            attempt.error_message = why


@functools.lru_cache(maxsize=32)
def _claim_query(n_stages: int | None, sqlite: bool, scan_limit: int) -> Select:
    """The claimable groups in claim order, each with its ready UVH5 bytes; built once per
    shape with bound parameters ``now`` and (``n_stages``: only these next stages)
    ``stage0`` … (plain parameters: an expanding IN list is re-rendered at every claim)."""
    groups, files = Group.__table__, SubbandFile.__table__  # tables: Core, not ORM, compiling
    size = (
        select(func.coalesce(func.sum(files.c.size_bytes), 0))
        .where(files.c.group_id == groups.c.group_id, files.c.status == "ready")
        .scalar_subquery()
    )
    query = (
        select(
            groups.c.group_id,
            groups.c.state,
            groups.c.stage,
            groups.c.attempt,
            groups.c.fencing_token,
            size.label("input_bytes"),
        )
        .where(
            text(CLAIMABLE_SQL),  # the partial index's own term (models.Group)
            or_(
                groups.c.state == State.PENDING.value,
                and_(
                    groups.c.state == State.RETRY_WAIT.value,
                    groups.c.next_attempt_at <= bindparam("now", type_=UTCDateTime),
                ),
            ),
        )
        .order_by(groups.c.priority, groups.c.obs_start)
        .limit(scan_limit)
    )
    if n_stages is not None:
        query = query.where(groups.c.stage.in_([bindparam(f"stage{i}") for i in range(n_stages)]))
    if not sqlite:
        query = query.with_for_update(skip_locked=True, of=groups)
    return query
