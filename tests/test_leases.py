"""Claims, heartbeats and the reaper, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from supervisor.db import Database
from supervisor.leases import Leases, Owner, database_now
from supervisor.models import Group
from supervisor.states import State
from tests.conftest import FakeClock, add_pending_group

GID = "2025-10-05T12:30:00"


def group(db: Database, gid: str = GID) -> Group:
    with db.transaction() as s:
        return s.get(Group, gid)  # type: ignore[return-value]


def other_node_owner() -> Owner:
    return Owner("another-node", 4242, 1.0)


def test_database_clock_is_sane(db: Database) -> None:
    with db.transaction() as s:
        now = database_now(s)
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


def test_claim_sets_lease_and_fencing_token(db: Database, clock: FakeClock) -> None:
    add_pending_group(db, GID)
    leases = Leases(db, Owner.this_process(), lease_s=60, clock=clock)
    claim = leases.claim_next()
    assert claim is not None and claim.attempt == 1 and claim.stage == "preflight"
    g = group(db)
    assert (g.state, g.fencing_token, g.lease_owner) == (
        "running",
        claim.fencing_token,
        str(leases.owner),
    )
    assert g.lease_expires_at == clock.now + timedelta(seconds=60)
    clock.advance(30)
    assert leases.heartbeat(claim)
    assert group(db).lease_expires_at == clock.now + timedelta(seconds=60)


def test_reaper_returns_expired_claims_to_their_checkpoint(db: Database, clock: FakeClock) -> None:
    add_pending_group(db, GID)
    remote = Leases(db, other_node_owner(), lease_s=60, clock=clock)
    claim = remote.claim_next()
    local = Leases(db, Owner.this_process("here"), lease_s=60, clock=clock)
    clock.advance(59)
    assert local.reap(crash_budget=2) == []
    clock.advance(2)
    assert local.reap(crash_budget=2) == [GID]
    g = group(db)
    assert (g.state, g.stage, g.crash_count) == ("pending", "preflight", 0)
    assert g.fencing_token == claim.fencing_token + 1
    assert not remote.heartbeat(claim)  # the old owner learns it lost the claim


def test_reaper_never_reaps_an_owner_alive_on_this_node(db: Database, clock: FakeClock) -> None:
    add_pending_group(db, GID)
    me = Leases(db, Owner.this_process("here"), lease_s=10, clock=clock)
    me.claim_next()
    clock.advance(3600)
    assert me.reap(crash_budget=2) == []
    assert group(db).state == State.RUNNING


def test_dead_owner_on_this_node_is_reaped_without_waiting(db: Database, clock: FakeClock) -> None:
    add_pending_group(db, GID)
    dead = Leases(db, Owner("here", 999_999, 12.0), lease_s=600, clock=clock)
    dead.claim_next()
    me = Leases(db, Owner.this_process("here"), lease_s=600, clock=clock)
    assert me.reap(crash_budget=2, only_dead_here=True) == [GID]


def test_a_dying_daemon_never_costs_its_groups_anything(db: Database, clock: FakeClock) -> None:
    """Daemons killed again and again (restart, watchdog, operator): the group goes back to
    its checkpoint every time and its crash count stays 0."""
    import psutil

    add_pending_group(db, GID)
    me = Leases(db, Owner.this_process("here"), lease_s=600, clock=clock)
    after_boot = psutil.boot_time() + 10.0
    for pid in range(999_000, 999_010):
        Leases(db, Owner("here", pid, after_boot), lease_s=600, clock=clock).claim_next()
        assert me.reap(crash_budget=1, only_dead_here=True) == [GID]
    g = group(db)
    assert (g.state, g.crash_count) == ("pending", 0)
    assert "no crash counted" in g.state_reason


def test_a_group_running_while_the_node_restarts_too_often_fails(
    db: Database, clock: FakeClock
) -> None:
    """The owner started before the node's last boot: the node went down under this stage.
    That is evidence against the group, and it has a budget."""
    add_pending_group(db, GID)
    me = Leases(db, Owner.this_process("here"), lease_s=600, clock=clock)
    for pid in (999_001, 999_002):
        Leases(db, Owner("here", pid, 12.0), lease_s=600, clock=clock).claim_next()
        me.reap(crash_budget=1, only_dead_here=True)
    g = group(db)
    assert (g.state, g.error_code) == ("failed", "abandoned_too_often")
    assert "node restarted 2 times" in g.state_reason


def test_concurrent_claimers_never_share_a_group(db: Database) -> None:
    """Four claimers race over twelve groups: each group is claimed exactly once."""
    for minute in range(12):
        add_pending_group(db, f"2025-10-05T13:{minute:02d}:00")
    claimed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        leases = Leases(db, Owner(f"node{n}", n, 1.0), lease_s=60)
        try:
            while (claim := leases.claim_next()) is not None:
                with lock:
                    claimed.append(claim.group_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(claimed) == [f"2025-10-05T13:{m:02d}:00" for m in range(12)]
    with db.transaction() as s:
        tokens = s.scalars(select(Group.fencing_token)).all()
    assert set(tokens) == {1}


def test_a_group_its_live_owner_no_longer_works_on_is_reaped(
    db: Database, clock: FakeClock
) -> None:
    """The daemon lives, but the attempt thread that held this claim ended without handing
    the group back (the database failed at that moment): the claim is not in the tokens the
    daemon still holds, so the reaper returns the group to its checkpoint, uncounted."""
    add_pending_group(db, GID)
    me = Leases(db, Owner.this_process("here"), lease_s=600, clock=clock)
    claim = me.claim_next()
    assert me.reap(crash_budget=2, held_claims={claim.key}) == []
    # Tokens count per group: another group's claim with the same token does not hold it.
    assert me.reap(crash_budget=2, held_claims={("2025-10-05T12:35:09", claim.fencing_token)}) == [
        GID
    ]
    g = group(db)
    assert (g.state, g.stage, g.crash_count) == ("pending", "preflight", 0)
    assert "ended without handing the group back" in g.state_reason
