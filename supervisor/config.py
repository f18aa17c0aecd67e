"""Load, merge and validate the configuration: embedded default, an optional file, CONTIMG_ env.

The schema is a tree of frozen dataclasses; each field's metadata says what values are
allowed, so one generic validator produces messages that name the key, the value and the
rule. Unknown keys (in files or in ``CONTIMG_<SECTION>__<KEY>`` variables) are errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.errors import ConfigError

# The shipped files (top-level config/, installed as the package supervisor.defaults).
_DEFAULTS = Path(str(importlib.resources.files("supervisor.defaults")))
DEFAULT_CONFIG_PATH = _DEFAULTS / "default.toml"
DEFAULT_CATALOGUE_PATH = _DEFAULTS / "calibrators.toml"
ENV_PREFIX = "CONTIMG_"
# Variables with this prefix that are not key overrides; everything else with a "__" is one.
NON_OVERRIDE_ENV = {
    "CONTIMG_WORKSPACE",
    "CONTIMG_CONFIG",
    "CONTIMG_ATTEMPT_MARK",
    "CONTIMG_CORRELATION_ID",
    "CONTIMG_KILL_AT",  # fault injection for the reliability harness (supervisor/faults.py)
    "CONTIMG_KILL_SEED",
}


def _rule(
    *,
    min: float | None = None,  # noqa: A002 - reads best at the call sites
    max: float | None = None,  # noqa: A002
    exclusive_min: bool = False,
    choices: tuple[str, ...] | None = None,
    help: str = "",  # noqa: A002
) -> dict[str, Any]:
    return {
        "min": min,
        "max": max,
        "exclusive_min": exclusive_min,
        "choices": choices,
        "help": help,
    }


def _field(default: Any, **rule: Any) -> Any:
    return field(default=default, metadata=_rule(**rule))


@dataclass(frozen=True)
class PathsConfig:
    """Directories; relative ones resolve under the workspace."""

    incoming: str = _field("incoming", help="raw UVH5 landing directory (read-only to us)")
    products: str = _field("products", help="Measurement Sets, tables, images")
    staging: str = _field("staging", help="per-attempt staging areas")
    tmpfs_staging: str = _field("", help="tmpfs staging directory, empty to disable")
    state: str = _field("state", help="state database and generated files")
    logs: str = _field("logs", help="log directory")
    backups: str = _field(
        "state/backups", help="verified backups of the SQLite database (best on another disk)"
    )


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = _field("", help="SQLAlchemy URL; empty means SQLite under paths.state")
    busy_timeout_ms: int = _field(30000, min=0, help="SQLite busy timeout in milliseconds")


@dataclass(frozen=True)
class IngestConfig:
    poll_interval_s: float = _field(10.0, min=0, exclusive_min=True)
    stability_interval_s: float = _field(1.0, min=0)
    group_tolerance_s: float = _field(60.0, min=0, exclusive_min=True, max=150)
    group_deadline_s: float = _field(900.0, min=0, exclusive_min=True)
    subbands_per_group: int = _field(16, min=1, max=16)
    future_tolerance_s: float = _field(
        86400.0, min=0, help="a file named this far in the future is rejected (clock skew)"
    )
    incoming_is_mount: bool = _field(
        False, help="incoming must be a mount point (the raw-data disk): health says when not"
    )
    io_timeout_s: float = _field(
        10.0, min=0, exclusive_min=True, help="a look at incoming that takes longer: an outage"
    )


@dataclass(frozen=True)
class TelescopeConfig:
    name: str = _field("DSA-110")
    casa_name: str = _field("OVRO_MMA", help="a telescope name CASA's Observatories table knows")
    latitude_deg: float = _field(37.2339, min=-90, max=90)
    longitude_deg: float = _field(-118.2825, min=-180, max=180)
    altitude_m: float = _field(1222.0)
    dish_diameter_m: float = _field(4.65, min=0, exclusive_min=True)
    sefd_jy: float = _field(6500.0, min=0, exclusive_min=True)


@dataclass(frozen=True)
class CalibrationConfig:
    catalogue: str = _field("", help="calibrator catalogue TOML; empty: the shipped one")
    max_dec_offset_deg: float = _field(1.5, min=0, exclusive_min=True, max=10)
    validity_hours: float = _field(12.0, min=0, exclusive_min=True)
    fallback_hours: float = _field(48.0, min=0, help="last-known-good tables reach this far")
    max_wait_hours: float = _field(6.0, min=0, help="wait for a calibrator this long at most")
    min_apparent_flux_jy: float = _field(
        2.0, min=0, help="a calibrator is solved on only if catalogue flux x beam gain reaches this"
    )
    sky_catalogue: str = _field(
        "",
        help="field sky model for calibrator solves: an NVSS-like CSV (supervisor/skymodel.py);"
        " empty: the model holds the calibrator only",
    )
    sky_model_min_apparent_jy: float = _field(
        0.01, min=0, help="field sources fainter than this after the 1.4 GHz beam are left out"
    )
    sky_model_min_beam_gain: float = _field(
        0.05, min=0, max=1, help="field sources where the 1.4 GHz beam is below this are left out"
    )
    sky_model_max_sources: int = _field(200, min=0, help="the brightest this many at most")
    sky_reference_min_beam_gain: float = _field(
        0.1,
        min=0,
        max=1,
        help="image QA: catalogue sources where the beam is at least this are expected in it",
    )


@dataclass(frozen=True)
class GatesConfig:
    """Quality-gate thresholds (DOMAIN.md "Quality numbers"); on_fail says what a failed gate
    means for the policy: validation (quarantine) or recoverable (next fallback tier)."""

    flagged_fraction_warn: float = _field(0.05, min=0, max=1)
    flagged_fraction_fail: float = _field(0.75, min=0, max=1)
    rfi_flagged_fraction_warn: float = _field(
        0.15, min=0, max=1, help="convert: interference flagged, of the working antennas' data"
    )
    rfi_flagged_fraction_fail: float = _field(0.5, min=0, max=1)
    broken_antenna_fraction_warn: float = _field(
        0.05, min=0, max=1, help="convert: antennas flagged dead or noisy, of the array"
    )
    broken_antenna_fraction_fail: float = _field(0.5, min=0, max=1)
    solution_flag_fraction_warn: float = _field(0.10, min=0, max=1)
    solution_flag_fraction_fail: float = _field(0.25, min=0, max=1)
    bandpass_snr_target: float = _field(20.0, min=0)
    bandpass_snr_min: float = _field(5.0, min=0)
    good_antenna_fraction_min: float = _field(0.5, min=0, max=1)
    gain_amp_min: float = _field(0.1, min=0)
    gain_amp_max: float = _field(10.0, min=0)
    rms_over_theory_warn: float = _field(2.7, min=0)
    rms_over_theory_fail: float = _field(5.0, min=0)
    calibrator_flux_error_warn: float = _field(0.10, min=0)
    calibrator_flux_error_fail: float = _field(0.20, min=0)
    beam_axis_ratio_warn: float = _field(3.0, min=1, help="restoring beam major/minor")
    catalogue_min_matched: int = _field(
        3, min=1, help="image: fewer sky-catalogue sources matched: no flux/astrometry scores"
    )
    catalogue_flux_error_warn: float = _field(0.10, min=0, help="|median found/catalogue - 1|")
    catalogue_flux_error_fail: float = _field(0.30, min=0)
    astrometry_offset_warn_arcsec: float = _field(5.0, min=0, help="median offset, arcsec")
    astrometry_offset_fail_arcsec: float = _field(20.0, min=0)
    min_usable_subbands: int = _field(12, min=1, max=16, help="fewer left: quarantine")
    subband_nonfinite_drop_fraction: float = _field(
        0.5, min=0, max=1, help="a subband with more NaN/Inf visibilities than this is dropped"
    )
    convert_on_fail: str = _field("validation", choices=("validation", "recoverable", "fatal"))
    calibrate_on_fail: str = _field("recoverable", choices=("validation", "recoverable", "fatal"))
    image_on_fail: str = _field("validation", choices=("validation", "recoverable", "fatal"))


@dataclass(frozen=True)
class CasaConfig:
    python: str = _field("", help="casa6 interpreter for stage workers; empty: this one")


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _field("info", choices=("debug", "info", "warning", "error"))
    format: str = _field("json", choices=("json", "console"))


STAGE_NAMES = ("preflight", "convert", "calibrate", "image", "register")
OUTCOME_KINDS = (
    "any",
    "error",
    "crash",
    "timeout",
    "hung",
    "invalid_result",
    "postcondition",
    "gate",
)
CATEGORIES = ("retryable", "recoverable", "validation", "fatal")
# Where a calibrate tier gets its tables (supervisor.calibration explains each).
# stages/flagging.py's FLAGGERS (stages/ and supervisor/ import nothing of each other; a
# test keeps the two equal).
FLAGGERS = ("auto", "aoflagger", "flagdata", "none")
CALIBRATION_SOURCES = ("auto", "self", "valid_window", "last_known_good", "field_calibrator")


@dataclass(frozen=True)
class DaemonConfig:
    node_name: str = _field("", help="this node's name in leases; empty: the host name")
    lease_s: float = _field(120.0, min=5, help="claim lease length, on the database clock")
    heartbeat_s: float = _field(15.0, min=0, exclusive_min=True, help="lease renewal period")
    idle_poll_s: float = _field(2.0, min=0, exclusive_min=True)
    stall_exit_s: float = _field(
        60.0,
        min=0,
        help="run --until-idle: give up (exit 1) once work remains but admission has refused"
        " it this long with nothing running (a full disk never frees itself)",
    )
    term_grace_s: float = _field(10.0, min=0, help="SIGTERM -> SIGKILL grace for workers")
    max_parallel: int = _field(2, min=1, help="stage attempts in flight at once (all stages)")
    drain_budget_s: float = _field(
        600.0, min=0, help="SIGTERM: running attempts may finish within this, then are stopped"
    )
    listen: str = _field("127.0.0.1:9580", help="HOST:PORT of /healthz and /metrics; empty: off")
    reap_interval_s: float = _field(15.0, min=0, exclusive_min=True, help="lease reaper period")
    heartbeat_row_s: float = _field(
        5.0, min=0, exclusive_min=True, help="how often the loop records its liveness in the DB"
    )
    worker_threads: int = _field(
        0,
        min=0,
        help="threads per stage worker (OpenMP, wsclean -j); 0: granted when it starts, the"
        " CPUs the attempts already running leave free (at least CPUs / max_parallel, at most"
        " the stage's max_threads)",
    )

    def threads_per_worker(self, cpus: int | None = None) -> int:
        """The fixed share: worker_threads, else ``cpus`` (the node's by default) /
        max_parallel, at least 1."""
        if self.worker_threads:
            return self.worker_threads
        return max(1, (cpus or os.cpu_count() or 1) // self.max_parallel)


@dataclass(frozen=True)
class ResourcesConfig:
    """Admission before a claim: a stage whose needs do not fit pauses its intake."""

    memory_budget_gb: float = _field(
        0.0, min=0, help="memory stage workers may reserve in total; 0: 85 % of physical RAM"
    )
    min_free_disk_gb: float = _field(
        2.0, min=0, help="free space always left on the products/staging filesystem"
    )
    disk_margin_fraction: float = _field(0.2, min=0, help="margin on a stage's disk estimate")
    min_free_fds: int = _field(64, min=0, help="file descriptors that must stay free")
    monitor_interval_s: float = _field(15.0, min=0, exclusive_min=True)


@dataclass(frozen=True)
class RetentionConfig:
    """What intermediates are removed, and when (supervisor/retention.py)."""

    enabled: bool = _field(True)
    target_ms_days: float = _field(
        7.0, min=0, help="remove a completed target group's MS this long after; 0: keep"
    )
    interval_s: float = _field(3600.0, min=0, exclusive_min=True, help="retention job period")


@dataclass(frozen=True)
class BackupConfig:
    """Online backups of the SQLite state database (supervisor/backup.py)."""

    enabled: bool = _field(True)
    interval_s: float = _field(3600.0, min=0, exclusive_min=True, help="backup job period")
    keep_hourly_h: float = _field(24.0, min=0, help="keep the newest backup of each hour this long")
    keep_daily_d: float = _field(14.0, min=0, help="keep the newest backup of each day this long")
    stale_after_s: float = _field(
        7200.0, min=0, exclusive_min=True, help="health: newest good backup older than this"
    )


@dataclass(frozen=True)
class HealthConfig:
    backlog_warn_s: float = _field(927.0, min=0, help="oldest runnable group: degraded beyond")
    backlog_fail_s: float = _field(3600.0, min=0, help="oldest runnable group: unhealthy beyond")
    loop_stale_s: float = _field(60.0, min=0, exclusive_min=True, help="loop liveness limit")
    state_check_interval_s: float = _field(
        300.0, min=0, exclusive_min=True, help="periodic check-state (report only)"
    )
    calibration_warn_h: float = _field(24.0, min=0, help="no good calibration for this long")
    no_data_warn_s: float = _field(
        618.0, min=0, exclusive_min=True, help="no raw file seen for this long: degraded"
    )


@dataclass(frozen=True)
class RetryConfig:
    base_delay_s: float = _field(30.0, min=0, help="first retry delay before jitter")
    max_delay_s: float = _field(900.0, min=0, help="cap of the exponential backoff")
    crash_budget: int = _field(2, min=0, help="worker crashes (signals, OOM) tolerated per stage")


@dataclass(frozen=True)
class StageTier:
    """One rung of a stage's fallback ladder: a name and parameter overrides."""

    name: str = _field("primary")
    params: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class StageConfig:
    module: str = _field("", help="worker module, run as python -m MODULE --request R.json")
    timeout_s: float = _field(1800.0, min=0, exclusive_min=True)
    stall_timeout_s: float = _field(
        300.0, min=0, help="no CPU and no output growth this long: hung (0: off)"
    )
    memory_limit_gb: float = _field(
        0.0, min=0, help="address-space limit of the worker (RLIMIT_AS); 0: none"
    )
    max_attempts: int = _field(3, min=1, help="attempts per fallback tier (retry budget)")
    tiers: list[StageTier] = field(default_factory=lambda: [StageTier()])
    slots: int = _field(1, min=1, help="attempts of this stage in flight at once")
    max_threads: int = _field(
        0, min=0, help="most threads its worker can use (1: single-threaded Python); 0: any"
    )
    memory_per_input: float = _field(
        1.0, min=0, help="worker peak memory per byte of the group's UVH5 input (estimate)"
    )
    memory_floor_mb: float = _field(400.0, min=0, help="worker memory however small the group")
    disk_per_input: float = _field(
        0.0, min=0, help="bytes the stage writes per byte of UVH5 input (estimate)"
    )
    when_exhausted: str = _field(
        "quarantine",
        choices=("quarantine", "wait_calibration"),
        help="after the last tier failed recoverably: quarantine, or wait for new calibration",
    )


@dataclass(frozen=True)
class PolicyRule:
    """A classification rule; the first rule whose every given matcher matches wins.

    Matchers: ``stage`` (a name or ``*``), ``outcome`` (what happened), ``exception``
    (regular expression on the exception type), ``message`` (regular expression searched in
    the message, the SEVERE log lines and stderr), ``exit_codes`` (return codes; negative
    numbers are signals).
    """

    stage: str = _field("*")
    outcome: str = _field("any", choices=OUTCOME_KINDS)
    exception: str = _field("")
    message: str = _field("")
    exit_codes: list[int] = field(default_factory=list)
    category: str = _field("fatal", choices=CATEGORIES)
    code: str = _field("unclassified")
    hint: str = _field("")


@dataclass(frozen=True)
class PolicyConfig:
    benign_log_patterns: list[str] = field(default_factory=list)
    extra_rules: list[PolicyRule] = field(default_factory=list)  # checked before ``rules``
    rules: list[PolicyRule] = field(default_factory=list)


@dataclass(frozen=True)
class Config:
    """The whole configuration, with relative paths already resolved under ``workspace``."""

    workspace: str = _field("", help="base directory for relative paths")
    paths: PathsConfig = field(default_factory=PathsConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    telescope: TelescopeConfig = field(default_factory=TelescopeConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    casa: CasaConfig = field(default_factory=CasaConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)

    # Resolved locations -------------------------------------------------------------
    def path(self, name: str) -> Path:
        """An absolute directory from ``[paths]`` (``""`` stays empty: a disabled path)."""
        raw = getattr(self.paths, name)
        if not raw:
            return Path()
        p = Path(raw).expanduser()
        return p if p.is_absolute() else Path(self.workspace) / p

    @property
    def incoming_dir(self) -> Path:
        return self.path("incoming")

    @property
    def state_dir(self) -> Path:
        return self.path("state")

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.state_dir / 'contimg.sqlite3'}"

    @property
    def calibrator_catalogue_path(self) -> Path:
        if not self.calibration.catalogue:
            return DEFAULT_CATALOGUE_PATH
        p = Path(self.calibration.catalogue).expanduser()
        return p if p.is_absolute() else Path(self.workspace) / p

    @property
    def sky_catalogue_path(self) -> Path | None:
        if not self.calibration.sky_catalogue:
            return None
        p = Path(self.calibration.sky_catalogue).expanduser()
        return p if p.is_absolute() else Path(self.workspace) / p

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Loading ----------------------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such configuration file"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    """``CONTIMG_SECTION__KEY=value`` → ``{section: {key: "value"}}`` (strings, typed later)."""
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in NON_OVERRIDE_ENV:
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        if "__" not in rest:
            problems.append(
                f"environment variable {name}: not a setting this program reads "
                f"(overrides are CONTIMG_<SECTION>__<KEY>; also read: "
                f"{', '.join(sorted(NON_OVERRIDE_ENV))})"
            )
            continue
        *parents, key = rest.split("__")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = _EnvString(value, name)
    return out


class _EnvString(str):
    """A string from the environment, remembering its variable name for messages."""

    source: str

    def __new__(cls, value: str, source: str) -> _EnvString:
        obj = super().__new__(cls, value)
        obj.source = source
        return obj


def _coerce(key: str, value: Any, typ: type, meta: Mapping[str, Any]) -> tuple[Any, str | None]:
    """Convert and check one value; return (value, problem or None)."""
    shown = f"{value!r}" + (f" (from {value.source})" if isinstance(value, _EnvString) else "")
    if typ is bool:
        if isinstance(value, _EnvString):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True, None
            if low in ("0", "false", "no", "off"):
                return False, None
        if isinstance(value, bool):
            return value, None
        return value, f"{key} = {shown}: must be true or false"
    if typ in (int, float):
        if isinstance(value, bool):
            return value, f"{key} = {shown}: must be a number, not a boolean"
        try:
            if isinstance(value, str):
                number = typ(value.strip())
            elif typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            else:
                number = typ(value)
        except (TypeError, ValueError):
            kind = "a whole number" if typ is int else "a number"
            return value, f"{key} = {shown}: must be {kind}"
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (number <= lo if meta.get("exclusive_min") else number < lo):
            op = ">" if meta.get("exclusive_min") else ">="
            return value, f"{key} = {shown}: must be {op} {lo}" + (
                f" and <= {hi}" if hi is not None else ""
            )
        if hi is not None and number > hi:
            return value, f"{key} = {shown}: must be <= {hi}"
        return number, None
    if typ is str:
        if not isinstance(value, str):
            return value, f"{key} = {shown}: must be a string"
        choices = meta.get("choices")
        if choices and value not in choices:
            return value, f"{key} = {shown}: must be one of {', '.join(choices)}"
        return str(value), None
    raise TypeError(f"unsupported config type {typ} for {key}")


def _build(cls: type, data: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            allowed = ", ".join(sorted(fields))
            problems.append(f"{full}: unknown key{hint}; allowed here: {allowed}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in data:
            ok, value = _build_value(f.type, data[name], f"{prefix}{name}", f.metadata, problems)
            if ok:
                kwargs[name] = value
    return cls(**kwargs)


_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def _build_value(
    annotation: Any, value: Any, key: str, meta: Mapping[str, Any], problems: list[str]
) -> tuple[bool, Any]:
    """Check and convert ``value`` for a field annotated ``annotation`` (a string, since this
    module uses postponed annotations): a scalar, a schema dataclass, ``dict[str, X]`` or
    ``list[X]``. ``dict[str, object]`` is a free-form table of scalars (stage parameters)."""
    ann = str(annotation).replace(" ", "")
    if ann in _SCALARS:
        coerced, problem = _coerce(key, value, _SCALARS[ann], meta)
        if problem:
            problems.append(problem)
            return False, None
        return True, coerced
    if ann == "dict[str,object]":
        if not isinstance(value, Mapping):
            problems.append(f"{key}: must be a table of parameters")
            return False, None
        bad = [k for k, v in value.items() if not isinstance(v, str | int | float | bool)]
        for k in bad:
            problems.append(f"{key}.{k} = {value[k]!r}: parameters must be strings or numbers")
        return not bad, dict(value)
    if ann.startswith("dict[str,") and ann.endswith("]"):
        if not isinstance(value, Mapping):
            problems.append(f"{key}: must be a table ([{key}.<name>])")
            return False, None
        inner = ann[len("dict[str,") : -1]
        out = {}
        for k, v in value.items():
            ok, built = _build_value(inner, v, f"{key}.{k}", {}, problems)
            if ok:
                out[k] = built
        return True, out
    if ann.startswith("list[") and ann.endswith("]"):
        if not isinstance(value, list):
            problems.append(f"{key}: must be a list ([[{key}]] tables or [...])")
            return False, None
        inner = ann[len("list[") : -1]
        out_list = []
        for i, item in enumerate(value):
            ok, built = _build_value(inner, item, f"{key}[{i}]", {}, problems)
            if ok:
                out_list.append(built)
        return True, out_list
    cls = globals().get(ann)
    if cls is not None and dataclasses.is_dataclass(cls):
        if not isinstance(value, Mapping):
            problems.append(f"{key}: must be a table ([{key}])")
            return False, None
        return True, _build(cls, value, f"{key}.", problems)
    raise TypeError(f"unsupported configuration type {annotation!r} for {key}")


def _cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one key."""
    import re

    out = []
    for name in cfg.stages:
        if name not in STAGE_NAMES:
            close = difflib.get_close_matches(name, STAGE_NAMES, n=1)
            hint = f" (did you mean stages.{close[0]}?)" if close else ""
            out.append(f"stages.{name}: unknown stage{hint}; stages are {', '.join(STAGE_NAMES)}")
    for name in STAGE_NAMES:
        stage = cfg.stages.get(name)
        if stage is None:
            out.append(f"stages.{name}: missing")
        elif not stage.module:
            out.append(f"stages.{name}.module: must name the worker module")
        elif not stage.tiers:
            out.append(f"stages.{name}.tiers: needs at least one tier")
    calibrate = cfg.stages.get("calibrate")
    for i, tier in enumerate(calibrate.tiers if calibrate else []):
        source = tier.params.get("source", "auto")
        if source not in CALIBRATION_SOURCES:
            out.append(
                f"stages.calibrate.tiers[{i}].params.source = {source!r}: must be one of "
                f"{', '.join(CALIBRATION_SOURCES)}"
            )
    convert = cfg.stages.get("convert")
    for i, tier in enumerate(convert.tiers if convert else []):
        where = f"stages.convert.tiers[{i}].params"
        flagger = tier.params.get("flagger", "auto")
        if flagger not in FLAGGERS:
            out.append(f"{where}.flagger = {flagger!r}: must be one of {', '.join(FLAGGERS)}")
        for key in ("dead_power_ratio", "noisy_power_ratio"):
            value = tier.params.get(key)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                out.append(f"{where}.{key} = {value!r}: must be a number > 0")
    if cfg.daemon.heartbeat_s * 2 > cfg.daemon.lease_s:
        out.append(
            f"daemon.heartbeat_s = {cfg.daemon.heartbeat_s}: must be at most half of "
            f"daemon.lease_s ({cfg.daemon.lease_s}) so one missed beat does not lose the lease"
        )
    rules = [("policy.extra_rules", r) for r in cfg.policy.extra_rules] + [
        ("policy.rules", r) for r in cfg.policy.rules
    ]
    for i, (where, rule) in enumerate(rules):
        for attr in ("exception", "message"):
            try:
                re.compile(getattr(rule, attr))
            except re.error as exc:
                out.append(f"{where}[{i}].{attr} = {getattr(rule, attr)!r}: bad regex: {exc}")
        if rule.stage != "*" and rule.stage not in STAGE_NAMES:
            out.append(f"{where}[{i}].stage = {rule.stage!r}: not a stage name or *")
    for i, pattern in enumerate(cfg.policy.benign_log_patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            out.append(f"policy.benign_log_patterns[{i}] = {pattern!r}: bad regex: {exc}")
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    workspace: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Load the embedded default, merge ``path`` and the environment, validate everything.

    Raises :class:`ConfigError` listing every problem found (not just the first).
    Workspace precedence: ``workspace`` argument, ``CONTIMG_WORKSPACE``, the file's
    ``workspace`` key, then the current directory.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []
    data = _read_toml(DEFAULT_CONFIG_PATH)
    if path is None and env.get("CONTIMG_CONFIG"):
        path = env["CONTIMG_CONFIG"]
    if path is not None:
        data = _merge(data, _read_toml(Path(path)))
    data = _merge(data, _env_overrides(env, problems))
    cfg = _build(Config, data, "", problems)
    if not problems:
        problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(problems)
    ws = workspace or env.get("CONTIMG_WORKSPACE") or cfg.workspace or os.getcwd()
    cfg = dataclasses.replace(cfg, workspace=str(Path(ws).expanduser().resolve()))
    problems = _file_checks(cfg)  # files named relative to the workspace, now known
    if problems:
        raise ConfigError(problems)
    return cfg


def _file_checks(cfg: Config) -> list[str]:
    """Files the configuration names, read as strictly as the daemon will read them."""
    out: list[str] = []
    sky = cfg.sky_catalogue_path
    if sky is not None:
        from supervisor.skymodel import CatalogueError, read_catalogue

        try:
            read_catalogue(sky)
        except FileNotFoundError:
            out.append(f"calibration.sky_catalogue = {str(sky)!r}: no such file")
        except CatalogueError as exc:
            out.extend(f"calibration.sky_catalogue: {p}" for p in exc.problems)
        except OSError as exc:
            out.append(f"calibration.sky_catalogue = {str(sky)!r}: unreadable: {exc}")
    return out
