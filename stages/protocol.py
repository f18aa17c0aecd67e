"""The worker side of the supervisor contract: read the request, run the stage, write the
result JSON atomically, and leave with ``os._exit`` (CASA may segfault at interpreter
teardown after any task error; the result written first is what counts)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_CLASSIFIED_FAILURE = 3
LOG_LINE_RE = re.compile(r"\b(SEVERE|WARN)\b")
MAX_LOG_LINES = 50


class StageFailure(Exception):
    """A failure the worker itself understands: it carries the policy category and a hint.

    category: retryable / recoverable / validation / fatal (see supervisor.errors.Category).
    """

    def __init__(self, category: str, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.category = category
        self.code = code
        self.hint = hint


def finite_or_null(value: Any, path: str = "", found: list[str] | None = None) -> Any:
    """``value`` with every NaN/Inf float replaced by None (strict JSON has neither);
    the dotted paths of what was replaced are appended to ``found``."""
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(path or "<value>")
        return None
    if isinstance(value, dict):
        return {
            k: finite_or_null(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [finite_or_null(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` as strict JSON (non-finite numbers become null) so
    that a reader sees all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as fh:
        json.dump(finite_or_null(payload), fh, indent=1, default=str, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def casa_log_lines(log_path: str | None) -> list[str]:
    """SEVERE and WARN lines of the attempt's CASA log (the last ``MAX_LOG_LINES``)."""
    if not log_path or not os.path.exists(log_path):
        return []
    with open(log_path, errors="replace") as fh:
        lines = [line.rstrip() for line in fh if LOG_LINE_RE.search(line)]
    return lines[-MAX_LOG_LINES:]


def run(stage: Callable[[dict[str, Any]], dict[str, Any]]) -> NoReturn:
    """Entry point of every worker: ``run(my_stage)`` at the bottom of the module."""
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--request", required=True)
    args, _ = parser.parse_known_args()
    started = time.monotonic()
    request: dict[str, Any] = {}
    result_path = Path(args.request).with_name("result.json")
    try:
        request = json.loads(Path(args.request).read_text())
        result_path = Path(request.get("result_path", result_path))
        output = stage(request) or {}
        record: dict[str, Any] = {
            "status": "succeeded",
            "artifacts": output.get("artifacts", []),
            "metrics": output.get("metrics", {}),
            "qa": output.get("qa", {}),
        }
        code = EXIT_SUCCEEDED
    except StageFailure as exc:
        record = {"status": "failed", "error": _error(exc)}
        record["error"].update(category=exc.category, code=exc.code, hint=exc.hint)
        code = EXIT_CLASSIFIED_FAILURE
    except BaseException as exc:  # noqa: BLE001 - everything must end in a result record
        record = {"status": "failed", "error": _error(exc)}
        code = EXIT_FAILED
    record["duration_s"] = round(time.monotonic() - started, 3)
    # The group's correlation id, from the request (or the environment the supervisor set).
    record["correlation_id"] = request.get("correlation_id") or os.environ.get(
        "CONTIMG_CORRELATION_ID"
    )
    record["log_lines"] = casa_log_lines(request.get("casa_log"))
    nonfinite: list[str] = []
    record = finite_or_null(record, "", nonfinite)
    if nonfinite:
        record["nonfinite_replaced_by_null"] = nonfinite
    try:
        write_json_atomic(result_path, record)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = EXIT_FAILED
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _error(exc: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc),
        "traceback": "".join(tb)[-4000:],
    }
