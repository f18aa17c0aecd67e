"""Commit manifests: each stage commit leaves, inside its product directory and atomically
with its rename into place, a ``commit.json`` of what the database recorded (the group, the
claim's fencing token, the worker's result, artifacts with sizes and checksums of small
files, the gate's verdict, a calibration set's rows), so that the disk can rebuild the
database (:mod:`supervisor.rebuild`). Later changes the database records about those
products (retention removed a file, a calibration set retired or found invalid, a requeue
superseded the stage) are appended to it as events.

A manifest is written before the commit, so it may describe a stage that never committed
(the daemon died between the rename and the commit): readers decide what to trust by the
fencing token (rebuild.py). ``.replaced-*`` and ``.incoming`` directories are never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

NAME = "commit.json"
FORMAT = "contimg-commit/1"
CHECKSUM_LIMIT_BYTES = 1 << 20  # sha256 of files up to 1 MiB (tables' small files, PNG, CSV)
GROUP_FIELDS = (
    "group_id",
    "obs_start",
    "pointing_dec_deg",
    "is_calibrator",
    "calibrator_name",
    "calibrator_choice",
    "obs_duration_s",
    "priority",
    "correlation_id",
    "first_seen_at",
)


@dataclass
class Manifest:
    """One stage's commit, as read from its product directory.

    directory: the stage's product directory. data: the JSON as written (see
    :func:`build`). events: later changes, oldest first (``pruned``, ``calibration_status``,
    ``superseded``).
    """

    directory: Path
    data: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def group_id(self) -> str:
        return str(self.data["group"]["group_id"])

    @property
    def stage(self) -> str:
        return str(self.data["stage"])

    @property
    def fencing_token(self) -> int:
        return int(self.data["fencing_token"])

    @property
    def superseded(self) -> bool:
        return any(e.get("event") == "superseded" for e in self.events)

    def pruned(self) -> dict[str, dict[str, Any]]:
        """Artifact path (relative) -> its ``pruned`` event."""
        return {e["artifact"]: e for e in self.events if e.get("event") == "pruned"}

    def calibration_status(self) -> tuple[str, str | None] | None:
        """The set's newest status and reason, when an event changed it."""
        changes = [e for e in self.events if e.get("event") == "calibration_status"]
        if not changes:
            return None
        return str(changes[-1]["status"]), changes[-1].get("reason")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def group_snapshot(row: Any) -> dict[str, Any]:
    """The group's identity fields (a row or mapping with GROUP_FIELDS)."""
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    return {k: _jsonable(get(k)) for k in GROUP_FIELDS}


def artifact_entries(output_dir: Path, artifacts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Kind, relative path, bytes, and the sha256 of small files, measured in staging."""
    entries = []
    for art in artifacts:
        path = output_dir / art["path"]
        entry: dict[str, Any] = {"kind": str(art.get("kind", "output")), "path": art["path"]}
        if path.is_dir():
            entry["bytes"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.exists():
            size = path.stat().st_size
            entry["bytes"] = size
            if size <= CHECKSUM_LIMIT_BYTES:
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entry["bytes"] = 0
        entries.append(entry)
    return entries


def build(
    *,
    group: dict[str, Any],
    stage: str,
    fencing_token: int,
    attempt: int,
    tier: int,
    tier_name: str,
    committed_at: datetime,
    next_stage: str | None,
    result: dict[str, Any],
    artifacts: list[dict[str, Any]],
    gate: dict[str, Any] | None,
    calibration_set: dict[str, Any] | None,
    workdir: str,
    resized: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The manifest of one commit (what the transaction about to commit records)."""
    return {
        "format": FORMAT,
        "group": group,
        "stage": stage,
        "fencing_token": fencing_token,
        "attempt": attempt,
        "tier": tier,
        "tier_name": tier_name,
        "committed_at": committed_at.isoformat(),
        "next_stage": next_stage,
        "workdir": workdir,
        "result": result,
        "artifacts": artifacts,
        "gate": gate,
        "calibration_set": calibration_set,
        # Earlier stages' committed outputs this stage wrote into, with their new sizes
        # (absolute paths as recorded; rebuild maps them by their place under products/).
        "resized": resized or {},
        "events": [],
    }


def write(directory: Path, data: dict[str, Any]) -> Path:
    """Write ``commit.json`` into ``directory`` atomically (temp file, fsync, rename)."""
    target = directory / NAME
    tmp = directory / f".{NAME}.{os.getpid()}.{threading.get_ident()}.tmp"
    payload = json.dumps(data, default=_jsonable, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(target)
    return target


def read(directory: Path) -> Manifest | None:
    """The manifest in ``directory``; None when there is none or it is not ours (logged)."""
    path = directory / NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("manifest.unreadable", path=str(path), error=str(exc)[:300])
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        log.warning("manifest.unknown_format", path=str(path))
        return None
    try:
        manifest = Manifest(directory, data, list(data.get("events") or []))
        _ = (manifest.group_id, manifest.stage, manifest.fencing_token)
    except (KeyError, TypeError, ValueError):
        log.warning("manifest.incomplete", path=str(path))
        return None
    return manifest


def stage_directory(products: Path, group_id: str, stage: str) -> Path:
    return products / group_id / stage


def record_event(products: Path, group_id: str, stage: str, event: dict[str, Any]) -> bool:
    """Append ``event`` to the manifest of ``group_id``'s ``stage`` (a later change the
    database recorded). False when there is no manifest (a product committed before
    manifests existed) or it could not be rewritten (logged: the database stays the truth
    while it lives)."""
    directory = stage_directory(products, group_id, stage)
    manifest = read(directory)
    if manifest is None:
        return False
    data = dict(manifest.data)
    data["events"] = [*manifest.events, {k: _jsonable(v) for k, v in event.items()}]
    try:
        write(directory, data)
    except OSError as exc:
        log.error("manifest.event_not_written", path=str(directory), error=str(exc)[:300])
        return False
    return True


def record_calibration_status(
    products: Path, set_group_id: str, set_id: int, status: str, reason: str | None, at: datetime
) -> bool:
    """A calibration set's status changed (retired, invalid): say so in the manifest of the
    calibrate stage that registered it."""
    event = {
        "event": "calibration_status",
        "set_id": set_id,
        "status": status,
        "reason": reason,
        "at": at,
    }
    return record_event(products, set_group_id, "calibrate", event)


def stage_directories(products: Path) -> list[Path]:
    """Every committed-looking stage directory ``products/<group>/<stage>`` (never
    ``.replaced-*`` or ``.incoming`` ones, nor hidden files)."""
    out: list[Path] = []
    if not products.is_dir():
        return out
    for group_dir in sorted(products.iterdir()):
        if not group_dir.is_dir() or group_dir.name.startswith("."):
            continue
        with contextlib.suppress(OSError):
            for stage_dir in sorted(group_dir.iterdir()):
                if stage_dir.is_dir() and not stage_dir.name.startswith("."):
                    out.append(stage_dir)
    return out
