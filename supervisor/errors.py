"""Errors as values: every failure carries a category, a stable code and a recovery hint."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Category(enum.StrEnum):
    """What the pipeline should do about a failure (ARCHITECTURE.md, "Policy")."""

    RETRYABLE = "retryable"  # transient: locks, busy DB, I/O hiccups, a file still growing
    RECOVERABLE = "recoverable"  # try another way: another calibrator, last-known-good tables
    VALIDATION = "validation"  # the data is bad: quarantine the group, keep going
    FATAL = "fatal"  # needs a human: configuration, environment, programming errors


@dataclass(frozen=True, slots=True)
class Failure:
    """One classified failure.

    Attributes:
        category: what the pipeline does next (retry, fall back, quarantine, stop).
        code: a short stable identifier an operator can grep for, e.g. ``truncated_hdf5``.
        message: what went wrong, naming the file or object concerned.
        hint: what an operator (or the policy) can do about it.
        path: the file concerned, if any.
        details: extra machine-readable facts (sizes, subband numbers, exit codes ...).
    """

    category: Category
    code: str
    message: str
    hint: str = ""
    path: str | None = None
    details: dict[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"[{self.category}/{self.code}] {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text

    def as_dict(self) -> dict[str, object]:
        return {
            "category": str(self.category),
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "path": self.path,
            "details": dict(self.details),
        }


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every message, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems
