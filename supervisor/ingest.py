"""Scan the incoming directory: decide which subband files are ready, group them, queue groups.

Rules (DOMAIN.md): only names ``YYYY-MM-DDTHH:MM:SS_sbNN.hdf5`` count; a file is ready when
its size and mtime held still for ``stability_interval_s`` and HDF5 opens with a non-empty
``Header/time_array``; files join the group whose key (earliest timestamp at creation) is
within ``group_tolerance_s``; a group with every subband ready becomes pending; one still
collecting after ``group_deadline_s`` is quarantined with a reason naming what is missing.
Bad files get a classified reason. Raw files are only ever stat'ed and read, never changed.
A scan is idempotent: repeating it without new files changes nothing.
"""

from __future__ import annotations

import enum
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from supervisor import metrics
from supervisor.calibrators import (
    INTEGRATION_S,
    Calibrator,
    choose_calibrator,
    load_catalogue,
)
from supervisor.config import Config
from supervisor.db import Database
from supervisor.errors import Category, Failure
from supervisor.incoming import is_storage_failure
from supervisor.models import Group, SubbandFile, utcnow
from supervisor.states import Actor, Stage, State, create_group, transition

log = structlog.get_logger(__name__)

FILENAME_RE = re.compile(r"^(?P<stamp>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})_sb(?P<sb>\d{2})\.hdf5$")
INGEST_ACTOR = Actor("ingest")
EARLIEST_PLAUSIBLE = datetime(2015, 1, 1, tzinfo=UTC)  # DSA-110 files are newer than this


class FileStatus(enum.StrEnum):
    SETTLING = "settling"  # seen; waiting for size/mtime to hold still
    READY = "ready"  # stable and a readable UVH5 with a non-empty time axis
    REJECTED = "rejected"  # see reason_code; re-examined if the file changes


@dataclass(frozen=True, slots=True)
class Observation:
    """What one ``stat`` of a candidate file showed."""

    path: str
    name: str
    subband: int
    file_time: datetime
    size_bytes: int
    mtime_ns: int
    failure: Failure | None = None  # set when the file is rejected before any read


@dataclass(frozen=True, slots=True)
class TimeAxis:
    """A file's integrations: how many (UVH5 ``Ntimes``) and the span they cover (s), from
    the start of the first to the end of the last (``time_array`` holds mid-points)."""

    n_integrations: int
    span_s: float


def time_axis(header: Any) -> TimeAxis:
    """The time axis of an open UVH5 ``Header`` group (h5py). ``time_array`` has one entry
    per baseline-time (Nblts), so integrations are counted as unique times; ``Ntimes`` is
    checked against them when the writer recorded it. Raises ValueError on non-finite or
    inconsistent values."""
    import numpy as np

    times = np.asarray(header["time_array"][()], dtype=float)
    if not np.isfinite(times).all():
        raise ValueError("Header/time_array holds non-finite values")
    unique = np.unique(times)
    n = len(unique)
    if "Ntimes" in header:
        declared = int(header["Ntimes"][()])
        if declared != n:
            raise ValueError(f"Header/Ntimes = {declared} but time_array has {n} unique times")
    integration_s = INTEGRATION_S
    if "integration_time" in header:
        inttime = np.asarray(header["integration_time"][()], dtype=float)
        if inttime.size and np.isfinite(inttime).all() and (inttime > 0).all():
            integration_s = float(np.median(inttime))
    span_s = float(unique[-1] - unique[0]) * 86400.0 + integration_s
    return TimeAxis(n_integrations=n, span_s=span_s)


def read_time_axis(path: str) -> TimeAxis:
    """Open ``path`` read-only and return its :class:`TimeAxis`."""
    import h5py

    with h5py.File(path, "r") as fh:
        return time_axis(fh["Header"])


@dataclass(frozen=True, slots=True)
class Inspection:
    """The outcome of opening a stable file as UVH5."""

    axis: TimeAxis | None = None
    pointing_dec_deg: float | None = None
    failure: Failure | None = None


@dataclass
class ScanReport:
    """What one scan did (counts for logs and the CLI)."""

    files_seen: int = 0
    ignored_names: int = 0
    new_files: int = 0
    ready: int = 0
    rejected: list[dict[str, object]] = field(default_factory=list)
    settling: int = 0
    groups_created: list[str] = field(default_factory=list)
    groups_pending: list[str] = field(default_factory=list)
    groups_quarantined: list[dict[str, str]] = field(default_factory=list)

    def merge(self, other: ScanReport) -> None:
        self.files_seen = max(self.files_seen, other.files_seen)
        self.ignored_names = max(self.ignored_names, other.ignored_names)
        self.new_files += other.new_files
        self.ready += other.ready
        self.rejected += other.rejected
        self.settling = other.settling
        self.groups_created += other.groups_created
        self.groups_pending += other.groups_pending
        self.groups_quarantined += other.groups_quarantined

    def as_dict(self) -> dict[str, object]:
        return {
            "files_seen": self.files_seen,
            "ignored_names": self.ignored_names,
            "new_files": self.new_files,
            "ready": self.ready,
            "settling": self.settling,
            "rejected": self.rejected,
            "groups_created": self.groups_created,
            "groups_pending": self.groups_pending,
            "groups_quarantined": self.groups_quarantined,
        }


def parse_name(name: str) -> tuple[datetime, int] | None:
    """``2025-10-05T12:30:00_sb03.hdf5`` → (aware UTC time, 3); None for other names."""
    m = FILENAME_RE.match(name)
    if not m:
        return None
    try:
        when = datetime.strptime(m["stamp"], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return when, int(m["sb"])


def inspect_uvh5(path: str) -> Inspection:
    """Open ``path`` read-only with h5py and check the UVH5 header we rely on."""
    import h5py  # local: h5py is only needed once a file is stable

    try:
        with h5py.File(path, "r") as fh:
            header = fh.get("Header")
            if header is None or "time_array" not in header:
                return Inspection(
                    failure=_reject(
                        "not_uvh5",
                        f"{path}: HDF5 file has no Header/time_array (not UVH5)",
                        "only UVH5 files written by the correlator belong in incoming",
                        path,
                    )
                )
            if int(header["time_array"].shape[0]) == 0:
                return Inspection(
                    failure=_reject(
                        "empty_time_array",
                        f"{path}: Header/time_array is empty",
                        "the writer produced no integrations; check the correlator",
                        path,
                    )
                )
            dec = None
            extra = header.get("extra_keywords")
            if extra is not None and "phase_center_dec" in extra:
                import math

                dec = math.degrees(float(extra["phase_center_dec"][()]))
            try:
                axis = time_axis(header)
            except (ValueError, KeyError, TypeError) as exc:
                return Inspection(
                    failure=_reject(
                        "bad_time_axis",
                        f"{path}: unusable time axis: {exc}",
                        "the writer produced inconsistent times; check the correlator",
                        path,
                    )
                )
            return Inspection(axis=axis, pointing_dec_deg=dec)
    except PermissionError as exc:
        return Inspection(
            failure=Failure(
                Category.RETRYABLE,
                "unreadable",
                f"{path}: permission denied ({exc.strerror})",
                "make raw files readable by the service user (written by root?)",
                path,
            )
        )
    except FileNotFoundError:
        return Inspection(
            failure=Failure(
                Category.RETRYABLE,
                "vanished",
                f"{path}: file disappeared while being checked",
                "someone moved or deleted a raw file; it is re-examined if it returns",
                path,
            )
        )
    except OSError as exc:
        text = str(exc)
        if is_storage_failure(exc):  # the mount failed, not the file: look again later
            return Inspection(
                failure=Failure(
                    Category.RETRYABLE,
                    "storage_unavailable",
                    f"{path}: the incoming storage failed while reading it ({text})",
                    "an outage of the raw-data mount (FUSE, network): re-examined when it "
                    "answers again; check the mount",
                    path,
                )
            )
        if "truncated file" in text:
            return Inspection(
                failure=_reject(
                    "truncated_hdf5",
                    f"{path}: truncated HDF5 file ({text})",
                    "the file stopped growing before it was complete; the writer may have died",
                    path,
                )
            )
        if "file signature not found" in text:
            return Inspection(
                failure=_reject(
                    "not_hdf5",
                    f"{path}: not an HDF5 file (file signature not found)",
                    "only UVH5 files belong in incoming; is this a partial or foreign file?",
                    path,
                )
            )
        return Inspection(
            failure=_reject(
                "unreadable_hdf5",
                f"{path}: HDF5 open failed: {text}",
                "inspect the file with h5dump; it will be re-examined if it changes",
                path,
            )
        )


def _reject(code: str, message: str, hint: str, path: str) -> Failure:
    return Failure(Category.VALIDATION, code, message, hint, path)


class Ingestor:
    """Scans ``cfg.paths.incoming`` into the state database (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        db: Database,
        *,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
        catalogue: list[Calibrator] | None = None,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.clock = clock
        self.sleep = sleep
        self.incoming = cfg.incoming_dir
        self.catalogue = (
            catalogue if catalogue is not None else load_catalogue(cfg.calibrator_catalogue_path)
        )

    # Public API ---------------------------------------------------------------------
    def run_once(self, max_rounds: int = 3) -> ScanReport:
        """Scan; while files are still settling, wait one stability interval and rescan."""
        report = self.scan()
        for _ in range(max_rounds - 1):
            if report.settling == 0:
                break
            self.sleep(self.cfg.ingest.stability_interval_s)
            report.merge(self.scan())
        return report

    def scan(self) -> ScanReport:
        report = ScanReport()
        observations = self._observe(report)
        now = self.clock()
        to_inspect = self._record_observations(observations, now, report)
        inspections = {path: inspect_uvh5(path) for path in to_inspect}
        self._apply_inspections(inspections, self.clock(), report)
        changes = {k: v for k, v in report.as_dict().items() if v}
        quiet = not (
            report.new_files
            or report.ready
            or report.rejected
            or report.groups_pending
            or report.groups_quarantined
        )
        (log.debug if quiet else log.info)("ingest.scan", **changes)
        return report

    def _implausible_time(self, path: str, file_time: datetime) -> Failure | None:
        """A name stamped in the future (beyond a day of clock skew) or before DSA-110
        existed cannot be grouped with anything real."""
        now = self.clock()
        if file_time > now + timedelta(seconds=self.cfg.ingest.future_tolerance_s):
            why = f"is {(file_time - now).days} days in the future"
        elif file_time < EARLIEST_PLAUSIBLE:
            why = f"is before {EARLIEST_PLAUSIBLE.date()} (before the array observed)"
        else:
            return None
        return _reject(
            "implausible_timestamp",
            f"{path}: the time in its name ({file_time.isoformat()}) {why}",
            "check the writer's clock and file naming; the file is not grouped",
            path,
        )

    # Step 1: look (no database) -----------------------------------------------------
    def _observe(self, report: ScanReport) -> list[Observation]:
        if not self.incoming.is_dir():
            raise FileNotFoundError(f"incoming directory {self.incoming} does not exist")
        real_incoming = os.path.realpath(self.incoming)
        out = []
        with os.scandir(self.incoming) as entries:
            for entry in entries:
                parsed = parse_name(entry.name)
                if parsed is None:
                    report.ignored_names += 1  # includes .fuse_hidden*, truth/, notes ...
                    continue
                report.files_seen += 1
                file_time, subband = parsed
                path = os.path.join(self.incoming, entry.name)
                failure = None
                if entry.is_symlink():
                    target = os.path.realpath(path)
                    if os.path.commonpath([target, real_incoming]) != real_incoming:
                        failure = _reject(
                            "symlink_escape",
                            f"{path}: symlink points outside the incoming directory ({target})",
                            "incoming must hold the raw files themselves; link targets outside "
                            "it are not read",
                            path,
                        )
                if failure is None:
                    failure = self._implausible_time(path, file_time)
                n_subbands = self.cfg.ingest.subbands_per_group
                if failure is None and subband >= n_subbands:
                    failure = _reject(
                        "bad_subband_index",
                        f"{path}: subband {subband} outside 0..{n_subbands - 1}",
                        "check the correlator's subband numbering",
                        path,
                    )
                try:
                    st = os.lstat(path) if failure else os.stat(path)
                except FileNotFoundError:
                    continue  # gone between listing and stat; nothing to record
                except PermissionError as exc:
                    failure = Failure(
                        Category.RETRYABLE,
                        "unreadable",
                        f"{path}: cannot stat ({exc.strerror})",
                        "fix the permissions of the incoming directory",
                        path,
                    )
                    st = None
                if st is not None and not failure and not _is_regular(st.st_mode):
                    failure = _reject(
                        "not_a_file",
                        f"{path}: not a regular file",
                        "only UVH5 files belong in incoming",
                        path,
                    )
                out.append(
                    Observation(
                        path=path,
                        name=entry.name,
                        subband=subband,
                        file_time=file_time,
                        size_bytes=st.st_size if st else -1,
                        mtime_ns=st.st_mtime_ns if st else -1,
                        failure=failure,
                    )
                )
        return out

    # Step 2: record what changed; choose stable files to open ------------------------
    def _record_observations(
        self, observations: list[Observation], now: datetime, report: ScanReport
    ) -> list[str]:
        to_inspect: list[str] = []
        stable_after = timedelta(seconds=self.cfg.ingest.stability_interval_s)
        with self.db.transaction() as s:
            known = {row.path: row for row in _rows_for_paths(s, [o.path for o in observations])}
            # Observation-time order, so groups are created keyed on their earliest file.
            for obs in sorted(observations, key=lambda o: (o.file_time, o.subband)):
                row = known.get(obs.path)
                if row is None:
                    row = self._new_file(s, obs, now, report)
                    report.new_files += 1
                    if obs.failure:
                        report.rejected.append(obs.failure.as_dict())
                    elif self.cfg.ingest.stability_interval_s == 0:
                        to_inspect.append(obs.path)
                    else:
                        report.settling += 1
                    continue
                changed = (row.size_bytes, row.mtime_ns) != (obs.size_bytes, obs.mtime_ns)
                if row.status == FileStatus.READY:
                    if changed:
                        log.warning(
                            "ingest.ready_file_changed",
                            path=obs.path,
                            old_size=row.size_bytes,
                            new_size=obs.size_bytes,
                        )
                    continue
                if changed:
                    row.size_bytes, row.mtime_ns, row.observed_at = (
                        obs.size_bytes,
                        obs.mtime_ns,
                        now,
                    )
                    if obs.failure is None:
                        row.status = FileStatus.SETTLING.value
                        row.reason_category = row.reason_code = row.reason = None
                if obs.failure is not None:
                    _set_rejected(row, obs.failure)
                    continue
                recheck = (
                    row.status == FileStatus.REJECTED and row.reason_category == Category.RETRYABLE
                )
                if row.status == FileStatus.SETTLING or recheck:
                    if not changed and now - row.observed_at >= stable_after:
                        to_inspect.append(obs.path)
                    else:
                        report.settling += 1
        return to_inspect

    def _new_file(
        self, s: Session, obs: Observation, now: datetime, report: ScanReport
    ) -> SubbandFile:
        group = self._group_for(s, obs.file_time, now, report)
        row = SubbandFile(
            path=obs.path,
            group_id=group.group_id,
            subband=obs.subband,
            file_time=obs.file_time,
            size_bytes=obs.size_bytes,
            mtime_ns=obs.mtime_ns,
            status=FileStatus.SETTLING.value,
            first_seen_at=now,
            observed_at=now,
        )
        if obs.failure:
            _set_rejected(row, obs.failure)
        s.add(row)
        s.flush()
        return row

    def _group_for(
        self, s: Session, file_time: datetime, now: datetime, report: ScanReport
    ) -> Group:
        """The group whose key lies within the tolerance of ``file_time``, else a new one."""
        tol = timedelta(seconds=self.cfg.ingest.group_tolerance_s)
        candidates = s.scalars(
            select(Group).where(
                Group.obs_start >= file_time - tol, Group.obs_start <= file_time + tol
            )
        ).all()
        if candidates:
            return min(candidates, key=lambda g: abs(g.obs_start - file_time))
        group_id = file_time.strftime("%Y-%m-%dT%H:%M:%S")
        group = create_group(s, group_id=group_id, obs_start=file_time, now=now, actor=INGEST_ACTOR)
        log.info("ingest.group_created", group_id=group_id, correlation_id=group.correlation_id)
        report.groups_created.append(group_id)
        return group

    # Step 3: apply inspection results, then decide each collecting group ----------------
    def _apply_inspections(
        self, inspections: dict[str, Inspection], now: datetime, report: ScanReport
    ) -> None:
        with self.db.transaction() as s:
            rows = {r.path: r for r in _rows_for_paths(s, list(inspections))}
            touched: set[str] = set()
            for path in sorted(inspections, key=lambda p: (rows[p].file_time, rows[p].subband)):
                row, result = rows[path], inspections[path]
                touched.add(row.group_id or "")
                if result.failure:
                    _set_rejected(row, result.failure)
                    report.rejected.append(result.failure.as_dict())
                    continue
                dup = s.scalars(
                    select(SubbandFile).where(
                        SubbandFile.group_id == row.group_id,
                        SubbandFile.subband == row.subband,
                        SubbandFile.status == FileStatus.READY.value,
                        SubbandFile.id != row.id,
                    )
                ).first()
                if dup is not None:
                    failure = _reject(
                        "duplicate_subband",
                        f"{path}: group {row.group_id} already has subband {row.subband:02d} "
                        f"from {dup.path}",
                        "two files claim the same subband; the first one ready is used. Check "
                        "the correlator's clock and file naming",
                        path,
                    )
                    failure.details.update(kept=dup.path, subband=row.subband)
                    _set_rejected(row, failure)
                    report.rejected.append(failure.as_dict())
                    continue
                row.status = FileStatus.READY.value
                row.reason_category = row.reason_code = row.reason = None
                row.ready_at = now
                if result.axis is not None:
                    row.n_integrations = result.axis.n_integrations
                    row.time_span_s = result.axis.span_s
                report.ready += 1
                group = s.get(Group, row.group_id)
                if group is not None and group.pointing_dec_deg is None:
                    group.pointing_dec_deg = result.pointing_dec_deg
            self._decide_groups(s, now, report)

    def _decide_groups(self, s: Session, now: datetime, report: ScanReport) -> None:
        n_sb = self.cfg.ingest.subbands_per_group
        deadline = timedelta(seconds=self.cfg.ingest.group_deadline_s)
        collecting = s.scalars(
            select(Group).where(Group.state == State.COLLECTING.value).order_by(Group.obs_start)
        ).all()
        for group in collecting:
            files = s.scalars(select(SubbandFile).where(SubbandFile.group_id == group.group_id))
            ready: set[int] = set()
            final_rejects: dict[int, SubbandFile] = {}
            pending_sb: set[int] = set()
            for f in files:
                if f.status == FileStatus.READY:
                    ready.add(f.subband)
                elif f.status == FileStatus.REJECTED and f.reason_category != Category.RETRYABLE:
                    if f.reason_code != "duplicate_subband":
                        final_rejects.setdefault(f.subband, f)
                else:
                    pending_sb.add(f.subband)
            if ready >= set(range(n_sb)):
                self._make_pending(s, group, now)
                report.groups_pending.append(group.group_id)
                continue
            missing = sorted(set(range(n_sb)) - ready - set(final_rejects) - pending_sb)
            bad = {sb: f for sb, f in final_rejects.items() if sb not in ready}
            settled = not pending_sb - ready and not missing
            expired = now - group.first_seen_at >= deadline
            if (bad and settled) or expired:
                failure = _incomplete_failure(
                    group,
                    missing,
                    bad,
                    pending_sb - ready,
                    expired,
                    self.cfg.ingest.group_deadline_s,
                )
                transition(
                    s, group, State.QUARANTINED, now=now, actor=INGEST_ACTOR, failure=failure
                )
                metrics.ATTEMPTS.labels("ingest", "quarantined").inc()
                log.warning(
                    "ingest.group_quarantined",
                    group_id=group.group_id,
                    code=failure.code,
                    reason=failure.message,
                    correlation_id=group.correlation_id,
                )
                report.groups_quarantined.append(
                    {"group_id": group.group_id, "code": failure.code, "reason": failure.message}
                )

    def _make_pending(self, s: Session, group: Group, now: datetime) -> None:
        duration_s = _group_duration_s(s, group)
        choice = None
        if group.pointing_dec_deg is not None:
            choice = choose_calibrator(
                self.catalogue,
                start=group.obs_start,
                duration_s=duration_s,
                pointing_dec_deg=group.pointing_dec_deg,
                longitude_deg=self.cfg.telescope.longitude_deg,
                max_dec_offset_deg=self.cfg.calibration.max_dec_offset_deg,
                dish_m=self.cfg.telescope.dish_diameter_m,
                min_apparent_flux_jy=self.cfg.calibration.min_apparent_flux_jy,
            )
        cal = choice.chosen if choice else None
        fields = {
            "stage": Stage.PREFLIGHT.value,
            "is_calibrator": cal is not None,
            "calibrator_name": cal.name if cal else None,
            "calibrator_choice": choice.as_dict() if choice else None,
            "obs_duration_s": duration_s,
            "priority": 0 if cal else 1,  # calibrator groups are claimed first
        }
        message = "all subbands ready" + (f"; calibrator {cal.name} transits" if cal else "")
        transition(
            s, group, State.PENDING, now=now, actor=INGEST_ACTOR, message=message, set_fields=fields
        )
        log.info(
            "ingest.group_pending",
            group_id=group.group_id,
            calibrator=fields["calibrator_name"],
            duration_s=round(duration_s, 1),
            correlation_id=group.correlation_id,
        )


def _group_duration_s(s: Session, group: Group) -> float:
    """The group's observed span: the longest span of its ready files (seconds); one
    nominal file (24 integrations) when no file recorded one."""
    spans = s.scalars(
        select(SubbandFile.time_span_s).where(
            SubbandFile.group_id == group.group_id,
            SubbandFile.status == FileStatus.READY.value,
            SubbandFile.time_span_s.is_not(None),
        )
    ).all()
    return max(spans) if spans else 24 * INTEGRATION_S


def _incomplete_failure(
    group: Group,
    missing: list[int],
    bad: dict[int, SubbandFile],
    still_settling: Iterable[int],
    expired: bool,
    deadline_s: float,
) -> Failure:
    parts = []
    if missing:
        parts.append("missing subbands " + ", ".join(f"sb{sb:02d}" for sb in missing))
    if bad:
        parts.append(
            "rejected "
            + "; ".join(
                f"sb{sb:02d} ({f.reason_code}: {os.path.basename(f.path)})"
                for sb, f in sorted(bad.items())
            )
        )
    settling = sorted(still_settling)
    if settling:
        parts.append("never became ready " + ", ".join(f"sb{sb:02d}" for sb in settling))
    when = (
        f"after the {deadline_s:.0f} s deadline" if expired else "with every subband accounted for"
    )
    code = "incomplete_group" if missing or settling else "bad_subband_files"
    failure = Failure(
        Category.VALIDATION,
        code,
        f"group {group.group_id} cannot complete {when}: " + "; ".join(parts),
        "if the files arrive or are fixed later, `contimg-supervisor requeue` the group",
        details={"missing": missing, "rejected": {f"sb{k:02d}": v.path for k, v in bad.items()}},
    )
    return failure


def _rows_for_paths(s: Session, paths: list[str]) -> list[SubbandFile]:
    out: list[SubbandFile] = []
    for i in range(0, len(paths), 500):  # keep IN lists well under SQLite's variable limit
        out.extend(s.scalars(select(SubbandFile).where(SubbandFile.path.in_(paths[i : i + 500]))))
    return out


def _set_rejected(row: SubbandFile, failure: Failure) -> None:
    row.status = FileStatus.REJECTED.value
    row.reason_category = str(failure.category)
    row.reason_code = failure.code
    row.reason = failure.message


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)
