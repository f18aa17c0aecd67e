"""Classification rules (as configured by default) and the retry/fallback decision."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from supervisor.config import load_config
from supervisor.errors import Category, Failure
from supervisor.policy import Action, Classifier, Evidence, backoff_delay_s, decide

CFG = load_config(workspace="/tmp", environ={})
CLASSIFIER = Classifier(CFG.policy)
TAI = (
    "2026-11-25 10:00:00 SEVERE MeasTable::dUTC(Double) (file MeasTable.cc, line 4290) "
    "Leap second table TAI_UTC seems out-of-date."
)


@pytest.mark.parametrize(
    ("evidence", "category", "code"),
    [
        (Evidence("calibrate", "timeout"), "retryable", "stage_timeout"),
        (
            Evidence(
                "convert",
                "error",
                "RuntimeError",
                "FiledesIO::write - write error in x.ms/table.f10: No such file or directory",
            ),
            "retryable",
            "disk_full",
        ),
        (
            Evidence(
                "convert",
                "crash",
                returncode=-11,
                stderr_tail="errno = 28, error message = 'No space left on device'",
            ),
            "retryable",
            "disk_full",
        ),
        (Evidence("image", "crash", returncode=-9), "retryable", "killed"),
        (Evidence("image", "crash", returncode=139), "retryable", "worker_crash"),
        (
            Evidence(
                "convert",
                "error",
                "OSError",
                "Unable to synchronously open file (truncated file: eof = 88360)",
            ),
            "validation",
            "bad_uvh5",
        ),
        (
            Evidence(
                "convert",
                "error",
                "ValueError",
                "UVParameter ant_1_array does not match. Cannot combine objects.",
            ),
            "validation",
            "inconsistent_subbands",
        ),
        (
            Evidence(
                "calibrate",
                "error",
                "RuntimeError",
                'Antenna Expression: No match found for token(s) "ant999"',
            ),
            "recoverable",
            "bad_refant",
        ),
        (
            Evidence(
                "calibrate",
                "error",
                "RuntimeError",
                "FilebufIO::readBlock - incorrect number of bytes read for file x.ms/table.dat",
            ),
            "fatal",
            "corrupt_table",
        ),
        (
            Evidence(
                "calibrate",
                "error",
                "AssertionError",
                "the vis parameter must be a path that exists ('/x/nope.ms' does not exist)",
            ),
            "fatal",
            "missing_input",
        ),
        (
            Evidence("convert", "invalid_result", message="result file is not valid JSON"),
            "retryable",
            "invalid_result",
        ),
        (Evidence("image", "error", "KeyError", "'weird'"), "fatal", "unclassified"),
        (
            Evidence(
                "image",
                "error",
                "ValueError",
                "bad",
                worker_category="validation",
                worker_code="all_flagged",
                worker_hint="h",
            ),
            "validation",
            "all_flagged",
        ),
    ],
)
def test_default_rules(evidence: Evidence, category: str, code: str) -> None:
    failure = CLASSIFIER.classify(evidence)
    assert (str(failure.category), failure.code) == (category, code)
    assert failure.message.startswith(evidence.stage)
    if code != "unclassified":
        assert failure.hint


def test_the_benign_leap_second_severe_line_never_fails_anything() -> None:
    """It appears in every CASA process here; it must not steer classification."""
    ev = Evidence("image", "error", "KeyError", "'weird'", log_lines=(TAI,), stderr_tail=TAI + "\n")
    assert "TAI_UTC" not in CLASSIFIER.relevant_text(ev)
    # A rule keyed on SEVERE lines would otherwise have matched it.
    from dataclasses import replace

    from supervisor.config import PolicyRule

    policy = replace(
        CFG.policy, extra_rules=[PolicyRule(message="SEVERE", category="fatal", code="severe_line")]
    )
    assert Classifier(policy).classify(ev).code == "unclassified"
    real = Evidence(
        "image", "error", "KeyError", "x", log_lines=("SEVERE tclean::something real broke",)
    )
    assert Classifier(policy).classify(real).code == "severe_line"


def test_site_rules_come_first() -> None:
    from dataclasses import replace

    from supervisor.config import PolicyRule

    policy = replace(
        CFG.policy,
        extra_rules=[PolicyRule(outcome="timeout", category="fatal", code="site_timeout")],
    )
    assert Classifier(policy).classify(Evidence("image", "timeout")).code == "site_timeout"


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    retry = CFG.retry
    for attempt in range(1, 12):
        ceiling = min(retry.max_delay_s, retry.base_delay_s * 2 ** (attempt - 1))
        delays = [backoff_delay_s(attempt, retry, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > 0.5 * ceiling  # really spread over the interval


NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _decide(
    category: Category,
    *,
    attempt: int = 1,
    crashes: int = 0,
    crash: bool = False,
    stage: str = "calibrate",
    tier: int = 0,
):  # noqa: ANN202
    return decide(
        Failure(category, "x", "m", "h"),
        is_crash=crash,
        attempt=attempt,
        crash_count=crashes,
        tier=tier,
        stage=CFG.stages[stage],
        retry=CFG.retry,
        now=NOW,
        rng=random.Random(0),
    )


def test_decisions() -> None:
    first = _decide(Category.RETRYABLE, attempt=1)
    assert first.action == Action.RETRY and NOW <= first.next_attempt_at <= NOW + timedelta(
        seconds=CFG.retry.base_delay_s
    )
    # calibrate: 2 attempts per tier, then the next tier of its chain; after the last tier
    # a transient failure needs a human, a recoverable one waits for new calibration.
    last = len(CFG.stages["calibrate"].tiers) - 1
    assert _decide(Category.RETRYABLE, attempt=2).action == Action.NEXT_TIER
    assert _decide(Category.RETRYABLE, attempt=2, tier=last).action == Action.FAIL
    assert _decide(Category.RETRYABLE, attempt=2, tier=last).failure.code == "x_budget_exhausted"
    assert _decide(Category.RECOVERABLE).action == Action.NEXT_TIER
    assert _decide(Category.RECOVERABLE, tier=last).action == Action.WAIT_CALIBRATION
    # A stage whose chain ends in quarantine (image: WSClean, then the tclean tier).
    assert _decide(Category.RECOVERABLE, stage="image").action == Action.NEXT_TIER
    exhausted = _decide(Category.RECOVERABLE, stage="image", tier=1)
    assert (exhausted.action, exhausted.failure.code) == (Action.QUARANTINE, "fallbacks_exhausted")
    assert _decide(Category.VALIDATION).action == Action.QUARANTINE
    assert _decide(Category.FATAL).action == Action.FAIL
    # Crashes have their own budget (1 in the default config? 2): exceeding it fails.
    budget = CFG.retry.crash_budget
    assert _decide(Category.RETRYABLE, crash=True, crashes=budget).action == Action.RETRY
    assert _decide(Category.RETRYABLE, crash=True, crashes=budget + 1).action == Action.FAIL


def test_a_missing_calibration_table_is_recoverable_not_unclassified() -> None:
    """CASA's "Table ... does not exist" when a solve step silently wrote nothing."""
    failure = Classifier(CFG.policy).classify(
        Evidence(
            stage="calibrate",
            outcome="error",
            exception_type="RuntimeError",
            message="Table /products/2025-10-05T12:30:00/calibrate/B.bcal does not exist",
        )
    )
    assert (failure.category, failure.code) == (Category.RECOVERABLE, "missing_caltable")


def test_worker_reports_are_strict_json(tmp_path) -> None:  # noqa: ANN001
    """NaN and Inf become null (strict JSON readers reject them) and are listed."""
    import json

    from stages.protocol import finite_or_null, write_json_atomic

    found: list[str] = []
    clean = finite_or_null(
        {"gain_phase_scatter_deg": math.nan, "x": [1.0, math.inf], "ok": 2.5}, "", found
    )
    assert clean == {"gain_phase_scatter_deg": None, "x": [1.0, None], "ok": 2.5}
    assert found == ["gain_phase_scatter_deg", "x[1]"]
    path = tmp_path / "r.json"
    write_json_atomic(path, {"m": {"dr": -math.inf}})

    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"m": {"dr": None}}
