"""Named fault-injection points for the reliability harness (``make reliability``) and the
chaos tests: at each point the daemon may SIGKILL itself, so that a test can die exactly
between, say, renaming a staging area into place and committing it.

Off unless ``CONTIMG_KILL_AT`` is set (never in production): ``POINT[,POINT...]:PROBABILITY``
e.g. ``between_rename_and_commit:0.3``, or ``any:0.05`` for every point. The random stream
is seeded from ``CONTIMG_KILL_SEED`` and the pid, so a run is reproducible.
"""

from __future__ import annotations

import os
import random
import signal

ENV = "CONTIMG_KILL_AT"
SEED_ENV = "CONTIMG_KILL_SEED"
POINTS = (
    "after_claim",
    "after_worker_start",
    "after_result_written",
    "between_rename_and_commit",
    "during_drain",
    "during_reload",
)

_spec = os.environ.get(ENV, "")
_points: set[str] = set()
_probability = 0.0
if _spec:
    names, _, prob = _spec.rpartition(":")
    _points = set(names.split(","))
    _probability = float(prob)
_rng = random.Random(f"{os.environ.get(SEED_ENV, '0')}:{os.getpid()}")


def point(name: str) -> None:
    """Maybe die here (only when the harness asked for it)."""
    if _probability <= 0.0 or not (name in _points or "any" in _points):
        return
    if _rng.random() < _probability:
        os.write(2, f"fault injection: SIGKILL at {name}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
