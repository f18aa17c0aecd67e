"""The reliability harness at small counts (``make reliability`` runs the large ones): the
daemon SIGKILLed at random moments and at every named injection point, restarted each time;
claims raced by two processes. Nothing lost, failed, doubled or left behind."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import reliability  # noqa: E402


def test_chaos_with_injection_points_loses_and_doubles_nothing(tmp_path: Path) -> None:
    figures = reliability.chaos(tmp_path, n_groups=6, n_kills=10, seed=7)
    assert figures["kills"] == 10 and figures["final_exit"] == 0
    assert {k: figures[k] for k in reliability_keys()} == dict.fromkeys(reliability_keys(), 0)


def reliability_keys() -> tuple[str, ...]:
    return (
        "lost",
        "failed_by_kills",
        "duplicated",
        "incomplete_stages",
        "audit_disagrees",
        "attempts_left_running",
        "orphans",
        "leftover_staging",
    )


def test_database_lost_at_random_moments_loses_replaces_and_reruns_nothing(
    tmp_path: Path,
) -> None:
    figures = reliability.db_loss(tmp_path, n_groups=4, n_losses=5, seed=3)
    assert figures["db_losses"] == 5 and figures["recoveries"] == 5
    assert figures["final_exit"] == 0 and figures["check_state_exit"] == 0
    assert figures["groups"] >= 4 and figures["not_completed"] == 0
    assert figures["products_checked"] > 0
    assert (
        figures["products_lost"],
        figures["products_replaced"],
        figures["groups_reprocessed"],
    ) == (0, 0, 0)


def test_two_processes_racing_for_claims_never_share_a_group(tmp_path: Path) -> None:
    got = reliability.claims(f"sqlite:///{tmp_path / 'claims.sqlite3'}", 300, 2)
    assert got["claims"] == 300 and got["double_claims"] == 0 and got["unclaimed"] == 0
