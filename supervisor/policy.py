"""Failure policy: classify what went wrong (rules are configuration), then decide what
happens next — retry after a jittered backoff, move to the next fallback tier, quarantine,
or fail and wait for a human.
"""

from __future__ import annotations

import enum
import fnmatch
import random
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from supervisor.config import PolicyConfig, PolicyRule, RetryConfig, StageConfig
from supervisor.errors import Category, Failure


@dataclass(frozen=True)
class Evidence:
    """Everything known about one failed attempt.

    outcome: error (the worker wrote a failure record), crash (no usable record and a bad
    exit), timeout, invalid_result (garbage result file), postcondition (the worker claimed
    success but its outputs do not hold up), gate (a quality gate failed).
    """

    stage: str
    outcome: str
    exception_type: str = ""
    message: str = ""
    log_lines: tuple[str, ...] = ()
    stderr_tail: str = ""
    returncode: int | None = None
    worker_category: str | None = None  # a StageFailure's own classification
    worker_code: str | None = None
    worker_hint: str = ""
    details: dict[str, object] = field(default_factory=dict)

    @property
    def is_crash(self) -> bool:
        return self.outcome == "crash"


class Classifier:
    """Maps :class:`Evidence` to a :class:`Failure` using the configured rules, in order."""

    def __init__(self, policy: PolicyConfig) -> None:
        self.rules: list[PolicyRule] = [*policy.extra_rules, *policy.rules]
        self._benign = [re.compile(p) for p in policy.benign_log_patterns]
        self._compiled = [
            (
                rule,
                re.compile(rule.exception) if rule.exception else None,
                re.compile(rule.message) if rule.message else None,
            )
            for rule in self.rules
        ]

    def relevant_text(self, ev: Evidence) -> str:
        """Message, SEVERE/WARN log lines and stderr, without lines known to be benign."""
        lines = [ev.message, *ev.log_lines, *ev.stderr_tail.splitlines()]
        return "\n".join(
            line for line in lines if line and not any(p.search(line) for p in self._benign)
        )

    def classify(self, ev: Evidence) -> Failure:
        summary = _summary(ev)
        details = {
            "outcome": ev.outcome,
            "returncode": ev.returncode,
            "exception_type": ev.exception_type or None,
            **ev.details,
        }
        if ev.worker_category in {c.value for c in Category}:
            return Failure(
                Category(ev.worker_category),
                ev.worker_code or "worker_classified",
                summary,
                ev.worker_hint,
                details=details,
            )
        text = self.relevant_text(ev)
        for rule, exc_re, msg_re in self._compiled:
            if rule.stage != "*" and not fnmatch.fnmatch(ev.stage, rule.stage):
                continue
            if rule.outcome != "any" and rule.outcome != ev.outcome:
                continue
            if exc_re is not None and not exc_re.search(ev.exception_type):
                continue
            if msg_re is not None and not msg_re.search(text):
                continue
            if rule.exit_codes and ev.returncode not in rule.exit_codes:
                continue
            return Failure(Category(rule.category), rule.code, summary, rule.hint, details=details)
        return Failure(
            Category.FATAL,
            "unclassified",
            summary,
            "no policy rule matches this failure: inspect the attempt (show GROUP), add a rule "
            "to policy.extra_rules if it recurs, then `retry` the group",
            details=details,
        )


def _summary(ev: Evidence) -> str:
    what = {
        "error": "raised",
        "crash": "crashed",
        "timeout": "timed out",
        "hung": "hung",
        "invalid_result": "wrote an unusable result",
        "postcondition": "failed its post-conditions",
        "gate": "failed its quality gate",
    }.get(ev.outcome, ev.outcome)
    parts = [f"{ev.stage} {what}"]
    if ev.exception_type:
        parts.append(f"{ev.exception_type}: {ev.message}" if ev.message else ev.exception_type)
    elif ev.message:
        parts.append(ev.message)
    if ev.returncode is not None and ev.outcome in ("crash", "invalid_result"):
        parts.append(_describe_returncode(ev.returncode))
    return "; ".join(parts)


def _describe_returncode(rc: int) -> str:
    import signal

    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc in (134, 139):
        return f"exit {rc} ({'SIGABRT' if rc == 134 else 'SIGSEGV'} in a child shell)"
    return f"exit {rc}"


class Action(enum.StrEnum):
    RETRY = "retry"  # same tier, after ``next_attempt_at``
    NEXT_TIER = "next_tier"  # the stage's next fallback tier, at once
    WAIT_CALIBRATION = "wait_calibration"  # every tier spent; wait for new calibration
    QUARANTINE = "quarantine"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    action: Action
    failure: Failure
    next_attempt_at: datetime | None = None
    tier: int = 0
    reason: str = ""


def backoff_delay_s(attempt: int, retry: RetryConfig, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2^(attempt-1)))."""
    ceiling = min(retry.max_delay_s, retry.base_delay_s * 2 ** max(0, attempt - 1))
    return rng.uniform(0.0, ceiling)


def decide(
    failure: Failure,
    *,
    is_crash: bool,
    attempt: int,
    crash_count: int,
    tier: int,
    stage: StageConfig,
    retry: RetryConfig,
    now: datetime,
    rng: random.Random,
) -> Decision:
    """What to do after ``failure`` in attempt ``attempt`` (1-based) of tier ``tier``.

    ``crash_count`` includes this failure when it is a crash.
    """
    has_next_tier = tier + 1 < len(stage.tiers)
    if failure.category == Category.RETRYABLE:
        if is_crash and crash_count > retry.crash_budget:
            return Decision(
                Action.FAIL,
                _exhausted(failure, "crash budget", crash_count, retry.crash_budget),
                tier=tier,
            )
        if attempt < stage.max_attempts:
            delay = backoff_delay_s(attempt, retry, rng)
            return Decision(
                Action.RETRY,
                failure,
                now + timedelta(seconds=delay),
                tier,
                f"retry {attempt + 1}/{stage.max_attempts} in {delay:.0f} s",
            )
        if has_next_tier:
            return Decision(
                Action.NEXT_TIER,
                failure,
                tier=tier + 1,
                reason=f"retries exhausted; fallback tier {stage.tiers[tier + 1].name}",
            )
        return Decision(
            Action.FAIL, _exhausted(failure, "retry budget", attempt, stage.max_attempts), tier=tier
        )
    if failure.category == Category.RECOVERABLE:
        if has_next_tier:
            return Decision(
                Action.NEXT_TIER,
                failure,
                tier=tier + 1,
                reason=f"fallback tier {stage.tiers[tier + 1].name}",
            )
        if stage.when_exhausted == "wait_calibration":
            return Decision(
                Action.WAIT_CALIBRATION,
                failure,
                tier=tier,
                reason="every calibration tier tried; waiting for a new calibration set",
            )
        exhausted = Failure(
            Category.VALIDATION,
            "fallbacks_exhausted",
            f"{failure.message} (every fallback tier tried)",
            failure.hint or "no tier could process this group",
            details=failure.details,
        )
        return Decision(Action.QUARANTINE, exhausted, tier=tier)
    if failure.category == Category.VALIDATION:
        return Decision(Action.QUARANTINE, failure, tier=tier)
    return Decision(Action.FAIL, failure, tier=tier)


def _exhausted(failure: Failure, budget: str, used: int, allowed: int) -> Failure:
    return Failure(
        Category.FATAL,
        f"{failure.code}_budget_exhausted",
        f"{failure.message} ({budget} exhausted: {used} of {allowed})",
        f"{failure.hint}; then `contimg-supervisor retry GROUP`".lstrip("; "),
        details={**failure.details, "last_category": str(failure.category)},
    )
