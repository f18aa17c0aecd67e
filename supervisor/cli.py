"""The ``contimg-supervisor`` command line. Exit codes: 0 ok, 1 degraded/not found, 2 usage or
configuration error."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from supervisor import __version__
from supervisor.config import Config, load_config
from supervisor.errors import ConfigError

EXIT_OK, EXIT_DEGRADED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A problem with the command line or the environment it runs in (exit 2)."""


# Helpers --------------------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _load(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, workspace=args.workspace)
    from supervisor.logs import configure_logging

    configure_logging(cfg.logging.level, cfg.logging.format)
    return cfg


def _database(cfg: Config, *, require_current: bool = True):  # noqa: ANN202
    from supervisor.db import SCHEMA_REVISION, Database

    path = _sqlite_path(cfg)
    if require_current and path is not None and not path.exists():
        # Opening it would create an empty file, which looks like a database that lost
        # everything: say so instead, without creating anything.
        raise UsageError(
            f"there is no database at {path}: `contimg-supervisor db upgrade` creates one; "
            "after a loss, `db rebuild` or `db restore BACKUP` (README: When the database "
            "is lost)"
        )
    db = Database(
        cfg.database_url,
        busy_timeout_ms=cfg.database.busy_timeout_ms,
        must_exist=require_current,  # a file removed under it is never re-created empty
    )
    if require_current:
        current, head = db.schema_revision(), SCHEMA_REVISION
        if current != head:
            raise UsageError(
                f"database {cfg.database_url} is at schema revision {current or 'none'}, "
                f"this program needs {head}: run `contimg-supervisor db upgrade`"
            )
    return db


def _fault_list(kind: str, values: list[str] | None) -> list[Any]:
    from supervisor.simulate import Fault

    out = []
    for value in values or []:
        try:
            group_s, _, sb_s = value.rpartition(":")
            out.append(Fault(kind, int(group_s or 0), int(sb_s)))
        except ValueError:
            raise UsageError(f"--{kind} {value!r}: expected SUBBAND or GROUP:SUBBAND") from None
    return out


def _parse_time(value: str) -> datetime:
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO time") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _refuse_root_in_foreign_workspace(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Root must not run a command that can create files in a workspace another user (the
    service's) owns: the directories, logs and SQLite side files it made would be root's,
    and the daemon could not write them later (DOMAIN.md, failure mode 8). Commands that
    touch neither the workspace nor the database (simulate, config check) are free."""
    import os

    if os.geteuid() != 0 or args.func in (cmd_simulate, cmd_config_check):
        return  # (the service user loads no configuration twice)
    from supervisor import writable

    cfg = load_config(args.config, workspace=args.workspace)
    owner = writable.foreign_owner_of_workspace(cfg)
    if owner is None:
        return
    import shlex

    raise UsageError(
        f"running as root in workspace {cfg.workspace}, which {owner} owns: files this "
        f"command made would be root's, and the service could not write them. Run it as "
        f"that user: sudo -u {owner} contimg-supervisor {shlex.join(argv)}"
    )


# Commands -------------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.file or args.config, workspace=args.workspace)
    if args.json:
        _print_json(cfg.as_dict())
    else:
        print(f"configuration OK (workspace {cfg.workspace}, database {cfg.database_url})")
    return EXIT_OK


def _sqlite_path(cfg: Config) -> Path | None:
    from supervisor.dbfile import sqlite_file

    return sqlite_file(cfg.database_url)


def _require_intact(cfg: Config) -> None:
    """quick_check the SQLite file before anything opens it for writing (DatabaseCorrupt
    is reported by main(): exit 2, the file untouched)."""
    from supervisor.dbfile import require_intact

    require_intact(_sqlite_path(cfg), backups=cfg.path("backups"))


def _refuse_unknown_commits(cfg: Config, db: Any, *, start_fresh: bool) -> None:
    """An empty (or older) database over a workspace whose products hold committed stages it
    does not know: refuse to process (the groups would be queued again from preflight and
    their registered products replaced), unless the operator starts fresh, which moves
    those product directories to lost+found/ (never deletes them)."""
    from supervisor import rebuild, reconcile

    found = rebuild.survey(cfg, db, skip_completed=True)
    refusing, legacy = found.refusing(), found.legacy
    if not refusing and not legacy:
        return
    groups = sorted({f.manifest.group_id for f in refusing} | {p.parent.name for p in legacy})
    if start_fresh:
        moved = reconcile.move_to_lost_and_found(
            cfg, [f.manifest.directory for f in refusing] + legacy
        )
        print(
            f"--start-fresh: {len(moved)} product directories of {len(groups)} group(s) the "
            f"database does not know moved to {reconcile.lost_and_found(cfg)} (nothing deleted)"
        )
        return
    from sqlalchemy.engine import make_url

    shown = make_url(cfg.database_url).render_as_string(hide_password=True)
    where = shown if db is not None else f"{_sqlite_path(cfg)} (missing)"
    examples = ", ".join(f.label for f in refusing[:3]) or ", ".join(map(str, legacy[:3]))
    raise UsageError(
        f"the database {where} does not know {len(refusing) + len(legacy)} committed "
        f"stage(s) of {len(groups)} group(s) in {cfg.path('products')} (e.g. {examples}): "
        f"processing now would queue them again and replace their products. Recover them "
        f"(the service stopped, as the service user) with\n"
        f"  contimg-supervisor db rebuild          # from the products' commit manifests\n"
        f"  contimg-supervisor db restore BACKUP   # a verified backup, brought forward\n"
        f"or, to start a new database anyway, pass --start-fresh (the unknown product "
        f"directories are moved to {reconcile.lost_and_found(cfg)}, never deleted)"
    )


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from supervisor import migrate

    cfg = _load(args)
    _require_intact(cfg)
    path = _sqlite_path(cfg)
    if path is not None and (not path.exists() or path.stat().st_size == 0):
        _refuse_unknown_commits(cfg, None, start_fresh=args.start_fresh)
    db = _database(cfg, require_current=False)
    migrate.upgrade(db)
    _refuse_unknown_commits(cfg, db, start_fresh=args.start_fresh)
    print(f"database {cfg.database_url} at revision {migrate.current_revision(db)}")
    return EXIT_OK


def _postgres_instead(cfg: Config, command: str) -> UsageError:
    return UsageError(
        f"db {command}: the database is {cfg.database_url.split('@')[-1]}, not SQLite: use "
        f"PostgreSQL's own tools (pg_dump -Fc / pg_restore, or base backups with "
        f"pg_basebackup and WAL archiving; README 'When the database is lost')"
    )


def cmd_db_backup(args: argparse.Namespace) -> int:
    from supervisor import backup

    cfg = _load(args)
    path = _sqlite_path(cfg)
    if path is None:
        raise _postgres_instead(cfg, "backup")
    if not path.exists():
        raise UsageError(f"db backup: there is no database at {path}")
    _require_intact(cfg)
    now = datetime.now(UTC)
    out = Path(args.out) if args.out else cfg.path("backups") / backup.backup_name(now)
    try:
        taken = backup.take(path, out, now=now)
    except backup.BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DEGRADED
    if not args.out:
        backup.prune(
            out.parent, now, hourly_h=cfg.backup.keep_hourly_h, daily_d=cfg.backup.keep_daily_d
        )
    if args.json:
        _print_json(taken.as_dict())
    else:
        rows = ", ".join(f"{t} {n}" for t, n in taken.row_counts.items() if n)
        print(f"backup {out} ({taken.bytes} bytes, integrity_check ok; rows: {rows})")
    return EXIT_OK


def cmd_db_restore(args: argparse.Namespace) -> int:
    from supervisor import backup, dbfile, migrate, rebuild

    cfg = _load(args)
    path = _sqlite_path(cfg)
    if path is None:
        raise _postgres_instead(cfg, "restore")
    source = Path(args.file)
    with dbfile.exclusive_lock(cfg.state_dir, "db restore"):
        try:
            moved = backup.restore(source, path)
        except backup.BackupError as exc:
            print(f"error: {exc}; the database was not touched", file=sys.stderr)
            return EXIT_DEGRADED
        for m in moved:
            print(f"kept the previous file as {m}")
        db = _database(cfg, require_current=False)
        migrate.upgrade(db)
        found, applied = rebuild.rebuild(cfg, db)
    taken = backup.read_backup(source)
    when = f" taken {taken.taken_at.isoformat()}" if taken else ""
    print(f"restored {source}{when} to {path}")
    _print_rebuild(found, applied)
    return EXIT_OK


def cmd_db_rebuild(args: argparse.Namespace) -> int:
    from supervisor import dbfile, migrate, rebuild

    cfg = _load(args)
    path = _sqlite_path(cfg)
    lock = (
        dbfile.exclusive_lock(cfg.state_dir, "db rebuild")
        if path is not None
        else contextlib.nullcontext()
    )
    with lock:
        if path is not None and path.exists():
            state = dbfile.check_integrity(path)
            if not state.ok:
                for m in dbfile.set_aside(path, why="corrupt"):
                    print(f"{path} is corrupt ({state.report}): kept as {m}")
        db = _database(cfg, require_current=False)
        migrate.upgrade(db)
        found, applied = rebuild.rebuild(cfg, db)
    _print_rebuild(found, applied)
    return EXIT_OK


def _print_rebuild(found: Any, applied: Any) -> None:
    kinds: dict[str, int] = {}
    for f in found.all():
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    print(
        f"rebuilt from the products' manifests: {applied.groups_created} group(s) created, "
        f"{applied.groups_moved} brought forward, {applied.stages} stage commit(s) "
        f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items())) or 'none'}), "
        f"{applied.calibration_sets} calibration set(s), {applied.events_applied} later "
        f"change(s); incoming files seen {applied.files_seen}"
    )
    for p in found.legacy:
        print(f"  no manifest (written before manifests existed): {p}")
    print("next: contimg-supervisor check-state, then start the service")


def cmd_db_check(args: argparse.Namespace) -> int:
    from alembic.util.exc import AutogenerateDiffsDetected

    from supervisor import migrate

    cfg = _load(args)
    db = _database(cfg)
    try:
        migrate.check(db)
    except AutogenerateDiffsDetected as exc:
        print(f"schema drift: {exc}", file=sys.stderr)
        return EXIT_DEGRADED
    print("database schema matches the models")
    return EXIT_OK


def _index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"simulate: {text!r} is not a comma-separated list of indices") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from supervisor.simulate import SimulationSpec, simulate

    cfg = _load(args)
    faults = [
        *_fault_list("drop", args.drop),
        *_fault_list("truncate", args.truncate),
        *_fault_list("duplicate", args.duplicate),
        *_fault_list("garbage", args.garbage),
        *_fault_list("flagged", args.flag),
        *_fault_list("nan_vis", args.nan_vis),
        *_fault_list("nan_some_vis", args.nan_some_vis),
        *_fault_list("nan_uvw", args.nan_uvw),
    ]
    try:
        spec = SimulationSpec(
            n_groups=args.groups,
            start=args.start,
            n_antennas=args.nants,
            n_channels_per_subband=args.nchan,
            n_times=args.ntimes,
            dec_deg=args.dec,
            calibrator=args.calibrator,
            calibrator_group=args.calibrator_group,
            n_field_sources=args.field_sources,
            sefd_jy=args.sefd if args.sefd is not None else cfg.telescope.sefd_jy,
            jitter_s=args.jitter,
            phase=args.phase,
            autos=not args.no_autos,
            seed=args.seed,
            faults=tuple(faults),
            rfi=args.rfi,
            dead_antennas=_index_list(args.dead_antennas),
            noisy_antennas=_index_list(args.noisy_antennas),
            latitude_deg=cfg.telescope.latitude_deg,
            longitude_deg=cfg.telescope.longitude_deg,
            altitude_m=cfg.telescope.altitude_m,
            dish_diameter_m=cfg.telescope.dish_diameter_m,
        )
    except ValueError as exc:
        raise UsageError(f"simulate: {exc}") from None
    outdir = Path(args.outdir)
    try:
        truths = simulate(outdir, spec)
    except ValueError as exc:
        raise UsageError(f"simulate: {exc}") from None
    summary = {
        "outdir": str(outdir.resolve()),
        "groups": [
            {
                "group_id": t.group_id,
                "files": len(t.files),
                "calibrator": t.calibrator,
                "sigma_image_jy": t.sigma_image_jy,
                "faults": t.faults,
            }
            for t in truths
        ],
    }
    if args.json:
        _print_json(summary)
    else:
        for g in summary["groups"]:
            cal = f" calibrator {g['calibrator']}" if g["calibrator"] else ""
            print(f"{g['group_id']}  {g['files']} files{cal}")
        print(f"wrote {len(truths)} group(s) to {summary['outdir']} (truth in truth/)")
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    from supervisor.ingest import Ingestor

    cfg = _load(args)
    db = _database(cfg)
    if not cfg.incoming_dir.is_dir():
        raise UsageError(f"incoming directory {cfg.incoming_dir} does not exist (paths.incoming)")
    ingestor = Ingestor(cfg, db)
    if args.once:
        report = ingestor.run_once()
        if args.json:
            _print_json(report.as_dict())
        else:
            print(
                f"files {report.files_seen} (new {report.new_files}, ready {report.ready}, "
                f"rejected {len(report.rejected)}, settling {report.settling}); "
                f"groups created {len(report.groups_created)}, "
                f"pending {len(report.groups_pending)}, "
                f"quarantined {len(report.groups_quarantined)}"
            )
            for r in report.rejected:
                print(f"  rejected [{r['category']}/{r['code']}] {r['message']}")
            for q in report.groups_quarantined:
                print(f"  quarantined {q['group_id']}: {q['reason']}")
        return EXIT_OK
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        ingestor.scan()
        stop.wait(cfg.ingest.poll_interval_s)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from supervisor.status import collect_status

    cfg = _load(args)
    db = _database(cfg)
    status = collect_status(db, limit=args.limit)
    if args.json:
        _print_json(status)
        return EXIT_OK
    counts = ", ".join(f"{k} {v}" for k, v in status["states"].items() if v) or "no groups"
    print(f"groups: {counts}; rejected files: {status['rejected_files']}")
    for d in status["daemons"]:
        paused = "; ".join(f"{k} paused: {v[0]}" for k, v in d["paused"].items())
        print(
            f"daemon {d['owner']} {d['state']}, {d['in_flight']} in flight, last seen "
            f"{d['heartbeat_at']}" + (f"; {paused}" if paused else "")
        )
    for g in status["in_flight"]:
        print(
            f"running: {g['group_id']} {g['stage']} attempt {g['attempt']} "
            f"(owner {g['owner']}, lease until {g['lease_expires_at']})"
        )
    for f in status["recent_failures"][:5]:
        print(
            f"recent {f['state']}: {f['group_id']} {f['stage'] or ''} "
            f"[{f['category']}/{f['code']}] {f['message']}"
        )
    if status["groups"]:
        print(f"{'group':20} {'state':20} {'stage':10} {'files':>5}  reason")
        for g in status["groups"]:
            print(
                f"{g['group_id']:20} {g['state']:20} {g['stage'] or '-':10} "
                f"{g['files_ready']:>5}  {g['reason'] or ''}"
            )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon, as systemd runs it: JSON log lines on stdout (journald), READY=1 after the
    checks, SIGTERM/SIGINT drain (a second one stops at once), SIGHUP reloads the config.
    Exit 0 after an orderly stop; a failure to start exits 2 (configuration) or 1;
    ``--until-idle`` exits 1 (degraded) when the work left is refused by admission
    (daemon.stall_exit_s)."""
    import os

    import structlog

    from supervisor import writable
    from supervisor.daemon import ConfigSource, Daemon
    from supervisor.listener import parse_listen
    from supervisor.logs import configure_logging
    from supervisor.notify import Notifier

    cfg = load_config(args.config, workspace=args.workspace)
    configure_logging(cfg.logging.level, cfg.logging.format, stream=sys.stdout)
    listen = cfg.daemon.listen if args.listen is None else args.listen
    if listen:
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    # Before the database opens (a root-owned -shm breaks even reading it): a workspace
    # directory it cannot write would fail every group, so the daemon does not start.
    problems = writable.workspace_problems(cfg)
    if problems:
        raise UsageError(writable.explain(problems))
    _require_intact(cfg)
    from supervisor import dbfile

    dbfile.hold_daemon_lock(cfg.state_dir)  # for the process's life: db restore waits
    path = _sqlite_path(cfg)
    if path is not None and (not path.exists() or path.stat().st_size == 0):
        # Before any "run db upgrade" message: a lost database over a populated workspace.
        _refuse_unknown_commits(cfg, None, start_fresh=args.start_fresh)
    if args.upgrade:
        from supervisor import migrate

        migrate.upgrade(_database(cfg, require_current=False))
    db = _database(cfg)
    _refuse_unknown_commits(cfg, db, start_fresh=args.start_fresh)
    # One group's directories only fail that group (classified, when it gets there): say so
    # now, and keep up with the rest of the sky.
    problems = writable.open_group_problems(cfg, db)
    if problems:
        structlog.get_logger("supervisor.writable").error(
            "writable.group_directories",
            problems=[str(p) for p in problems],
            fix=writable.chown_hint(p.path for p in problems),
        )
    from supervisor import incoming

    state = incoming.look(cfg)
    if not state.ok:
        # The raw-data mount is out (or not mounted yet): the daemon starts and waits for it,
        # health unhealthy, work that does not read raw files carrying on.
        structlog.get_logger("supervisor.ingest").error(
            "ingest.incoming_unavailable", path=str(state.path), reason=state.detail
        )
    daemon = Daemon(
        cfg,
        db,
        notifier=Notifier(),
        source=ConfigSource(
            getattr(args, "config", None) or os.environ.get("CONTIMG_CONFIG"),
            getattr(args, "workspace", None),
        ),
        listen=listen,
        log_stream=sys.stdout,
    )
    terms = 0

    def on_term(signum: int, _frame: object) -> None:
        nonlocal terms
        terms += 1
        if terms == 1:
            daemon.drain()
        else:
            daemon.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_term)
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    summary = daemon.run(until_idle=args.until_idle, max_attempts=args.max_attempts)
    print(
        json.dumps(
            {
                "event": "run.finished",
                "attempts": summary.attempts,
                "outcomes": summary.outcomes,
                "reaped": summary.reaped,
                "leftovers_killed": summary.leftovers_killed,
                "drained": summary.drained,
                "stalled": summary.stalled,
                "halted": summary.halted,
            }
        ),
        flush=True,
    )
    if summary.halted:
        print(f"halted: {summary.halted}", file=sys.stderr)
        return EXIT_USAGE
    if summary.stalled:
        reasons = "; ".join(f"{stage}: {', '.join(r)}" for stage, r in summary.stalled.items())
        print(f"stalled: work remains but cannot start ({reasons})", file=sys.stderr)
        return EXIT_DEGRADED
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """The health report (exit 0 healthy, 1 degraded, 2 unhealthy)."""
    from supervisor import health

    cfg = _load(args)
    from supervisor.dbfile import check_integrity

    path = _sqlite_path(cfg)
    state = check_integrity(path) if path is not None else None
    if state is not None and not state.ok:
        rep = health.corrupt_report(
            cfg, f"{path} is corrupt: {state.report} (db restore / db rebuild: see run's message)"
        )
    else:
        rep = health.report(cfg, _database(cfg))
    if args.json:
        _print_json(rep)
    else:
        print(f"{rep['status']} (node {rep['node']})")
        for check in rep["checks"]:
            print(f"  {check['status']:10} {check['name']:12} {check['detail']}")
    return health.exit_code(rep)


def cmd_demo(args: argparse.Namespace) -> int:
    from supervisor.demo import DemoError, render_table, run_demo
    from supervisor.logs import configure_logging

    configure_logging("warning", "console")
    try:
        summary = run_demo(
            args.config,
            Path(args.workspace) if args.workspace else None,
            n_groups=args.groups,
            seed=args.seed,
        )
    except DemoError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        _print_json(summary)
    else:
        print(render_table(summary))
    ok = all(g["state"] == "completed" for g in summary["groups"])
    return EXIT_OK if ok else EXIT_DEGRADED


def _products(args: argparse.Namespace) -> Path:
    return load_config(args.config, workspace=args.workspace).path("products")


def _operator(args: argparse.Namespace, action: Any) -> int:
    from supervisor.operator import OperatorError

    cfg = _load(args)
    db = _database(cfg)
    try:
        group = action(db)
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"{group.group_id}: {group.state} at stage {group.stage}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from supervisor.operator import retry_group

    return _operator(args, lambda db: retry_group(db, args.group))


def cmd_requeue(args: argparse.Namespace) -> int:
    from supervisor.operator import requeue_group

    return _operator(
        args,
        lambda db: requeue_group(db, args.group, args.from_stage, products=_products(args)),
    )


def cmd_quarantine(args: argparse.Namespace) -> int:
    from supervisor.operator import quarantine_group

    return _operator(args, lambda db: quarantine_group(db, args.group, args.reason))


def cmd_check_state(args: argparse.Namespace) -> int:
    """Compare the database with the disk; --repair fixes what is safe. Exit 0 when they
    agree (or every finding was repaired), 1 otherwise."""
    from supervisor import reconcile

    cfg = _load(args)
    db = _database(cfg)
    findings = reconcile.check_state(cfg, db, repair=args.repair)
    report = reconcile.summary(findings)
    report["mode"] = "repair" if args.repair else "dry run"
    if args.json:
        _print_json(report)
    else:
        if not findings:
            print("database and disk agree")
        for f in findings:
            done = " [repaired]" if f.repaired else ("" if args.repair else " [dry run]")
            print(f"{f.kind:20} {f.detail}\n{'':20} -> {f.repair}{done}")
        if findings and not args.repair:
            print("run again with --repair to apply the repairs above")
    unrepaired = [f for f in findings if not f.repaired]
    return EXIT_OK if not unrepaired else EXIT_DEGRADED


def cmd_calibration_list(args: argparse.Namespace) -> int:
    from supervisor.operator import calibration_sets

    cfg = _load(args)
    sets = calibration_sets(_database(cfg))
    if args.json:
        _print_json(sets)
        return EXIT_OK
    if not sets:
        print("no calibration sets")
    for c in sets:
        q = c["quality"]
        print(
            f"set {c['id']:>4} {c['calibrator']:10} solved {c['solved_at']} valid "
            f"{c['valid_from']} .. {c['valid_until']} {c['status']:8} "
            f"bandpass SNR {q['bandpass_snr_median']} used by {c['groups_using']} group(s)"
        )
    return EXIT_OK


def _calibration_call(args: argparse.Namespace, action: Any) -> dict[str, Any] | None:
    """Run an operator action on a calibration set; None when it was refused (printed) or
    already printed as JSON."""
    from supervisor.operator import OperatorError

    cfg = _load(args)
    try:
        info = action(_database(cfg))
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise _Refused from None
    if args.json:
        _print_json(info)
        return None
    return info


class _Refused(Exception):
    """An operator action was refused (already printed): exit 1."""


def cmd_calibration_show(args: argparse.Namespace) -> int:
    from supervisor.operator import calibration_set

    try:
        info = _calibration_call(args, lambda db: calibration_set(db, args.set_id))
    except _Refused:
        return EXIT_DEGRADED
    if info is None:
        return EXIT_OK
    print(
        f"set {info['id']} on {info['calibrator']} (group {info['group_id']}), solved "
        f"{info['solved_at']}, {info['status']}"
        + (f" ({info['status_reason']})" if info["status_reason"] else "")
    )
    print(f"  valid {info['valid_from']} .. {info['valid_until']}")
    for t in info["tables"]:
        print(f"  table {t['kind']}: {t['path']}" + ("" if t["exists"] else " (MISSING)"))
    print(f"  used by {info['groups_using']} group(s): {', '.join(info['used_by']) or '-'}")
    return EXIT_OK


def cmd_calibration_retire(args: argparse.Namespace) -> int:
    from supervisor.operator import retire_calibration_set

    try:
        info = _calibration_call(
            args,
            lambda db: retire_calibration_set(
                db, args.set_id, args.reason, products=_products(args)
            ),
        )
    except _Refused:
        return EXIT_DEGRADED
    if info is None:
        return EXIT_OK
    print(f"calibration set {info['id']} retired: it is never chosen again")
    for gid in info["completed_groups_to_requeue"]:
        print(
            f"  used by completed group {gid}: "
            f"contimg-supervisor requeue {gid} --from-stage calibrate"
        )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    from supervisor.operator import OperatorError, show_group

    cfg = _load(args)
    db = _database(cfg)
    try:
        info = show_group(db, args.group)
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        _print_json(info)
        return EXIT_OK
    print(
        f"group {info['group_id']}: {info['state']} (stage {info['stage'] or '-'}, "
        f"calibrator {info['calibrator'] or 'none'}, files ready {info['files_ready']})"
    )
    if info["reason"]:
        print(f"  reason: {info['reason']}")
    print("transitions:")
    for t in info["transitions"]:
        extra = f" [{t['category']}/{t['code']}]" if t["category"] else ""
        print(
            f"  {t['at']}  {t['from'] or '-':>19} -> {t['to']:<19} {t['stage'] or '':<9}"
            f"{extra} {t['message'] or ''}  ({t['actor']})"
        )
        if t["hint"]:
            print(f"      hint: {t['hint']}")
    print("attempts:")
    for a in info["attempts"]:
        err = a["error"]
        detail = f" {err['category']}/{err['code']}: {err['message']}" if err else ""
        cost = ""
        if a["worker_seconds"] is not None:
            cost += f" {a['worker_seconds']:.1f} s"
        if a["worker_cpu_seconds"] is not None:
            cost += f" (CPU {a['worker_cpu_seconds']:.1f} s)"
        if a["peak_rss_bytes"]:
            cost += f" {a['peak_rss_bytes'] / 1e9:.2f} GB"
        print(
            f"  {a['stage']:<9} #{a['attempt']} tier {a['tier']} {a['outcome']:<9} "
            f"rc={a['exit_code']}{cost}{detail}"
        )
        print(f"      logs: {a['workdir']}")
    for art in info["artifacts"]:
        pruned = (
            f"; pruned {art['pruned_at']} by retention rule {art['pruned_rule']}"
            if art.get("pruned_at")
            else ""
        )
        print(f"  artifact {art['kind']}: {art['path']} ({art['bytes']} bytes{pruned})")
    return EXIT_OK


# Parser ---------------------------------------------------------------------------------


def _stages() -> list[Any]:
    from supervisor.states import Stage

    return list(Stage)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=argparse.SUPPRESS, help="configuration file (TOML), env CONTIMG_CONFIG"
    )
    common.add_argument(
        "--workspace",
        default=argparse.SUPPRESS,
        help="directory under which relative paths resolve (env CONTIMG_WORKSPACE)",
    )
    parser = argparse.ArgumentParser(
        prog="contimg-supervisor",
        description="Supervisory orchestrator of the DSA-110 continuum imaging pipeline.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help_text: str, *, json_flag: bool = False) -> Any:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("simulate", cmd_simulate, "write synthetic DSA-110 UVH5 groups", json_flag=True)
    p.add_argument("outdir", help="directory to write the subband files into (e.g. incoming/)")
    p.add_argument("--groups", type=int, default=1, help="number of consecutive groups")
    p.add_argument("--start", type=_parse_time, default=None, help="first group's start (UTC)")
    p.add_argument("--nants", type=int, default=8, help="antennas (DSA-110: 96)")
    p.add_argument("--nchan", type=int, default=4, help="channels per subband (DSA-110: 48)")
    p.add_argument("--ntimes", type=int, default=24, help="12.885 s integrations per group")
    p.add_argument("--dec", type=float, default=None, help="pointing declination (deg)")
    p.add_argument("--calibrator", default=None, help="catalogue calibrator that transits")
    p.add_argument("--calibrator-group", type=int, default=0, help="group index of the transit")
    p.add_argument("--field-sources", type=int, default=3, help="faint sources per group")
    p.add_argument("--sefd", type=float, default=None, help="Jy (default telescope.sefd_jy)")
    p.add_argument("--jitter", type=int, default=30, help="max |name timestamp jitter| (s)")
    p.add_argument("--phase", choices=("meridian", "drift"), default="meridian")
    p.add_argument("--no-autos", action="store_true", help="omit autocorrelations")
    p.add_argument(
        "--rfi",
        action="store_true",
        help="inject interference: narrow-band channels, broadband bursts, a few baselines",
    )
    p.add_argument("--dead-antennas", default="", metavar="I,J", help="antenna indices (0-based)")
    p.add_argument("--noisy-antennas", default="", metavar="I,J", help="antenna indices (0-based)")
    p.add_argument("--seed", type=int, default=1)
    for kind, what in (
        ("drop", "do not write"),
        ("truncate", "truncate to half"),
        ("duplicate", "write a second file for"),
        ("garbage", "write random bytes as"),
        ("flag", "flag every visibility of"),
        ("nan-vis", "write NaN for every visibility of"),
        ("nan-some-vis", "write NaN/Inf for 3 %% of the visibilities of"),
        ("nan-uvw", "write non-finite uvw for a tenth of the rows of"),
    ):
        p.add_argument(
            f"--{kind}", action="append", metavar="[GROUP:]SB", help=f"fault: {what} this file"
        )

    p = add("ingest", cmd_ingest, "scan incoming, group subbands, queue groups", json_flag=True)
    p.add_argument("--once", action="store_true", help="one scan (waiting for settling files)")

    p = add("run", cmd_run, "the daemon: ingest, claim and run groups through the stages")
    p.add_argument(
        "--until-idle",
        action="store_true",
        help="exit 0 once nothing is runnable, running or waiting to retry; exit 1 when what"
        " is left has been refused by admission (disk, memory) for daemon.stall_exit_s",
    )
    p.add_argument("--max-attempts", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--upgrade", action="store_true", help="apply database migrations first (the unit does)"
    )
    p.add_argument(
        "--start-fresh",
        action="store_true",
        help="start although products/ holds commits the database does not know (they go to "
        "lost+found/, never deleted); otherwise refused: see db rebuild / db restore",
    )
    p.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help="serve /healthz and /metrics here (default daemon.listen; '' turns it off)",
    )

    add(
        "health",
        cmd_health,
        "loop liveness, database, disk, writable workspace, intake, calibration age, backlog "
        "(exit 0 healthy, 1 degraded, 2 unhealthy)",
        json_flag=True,
    )

    p = add(
        "demo",
        cmd_demo,
        "simulate a short night, run it through the real pipeline, print a summary",
        json_flag=True,
    )
    p.add_argument("--groups", type=int, default=4, help="groups to simulate (first: 3C48)")
    p.add_argument("--seed", type=int, default=11)

    p = add("show", cmd_show, "one group's full history", json_flag=True)
    p.add_argument("group")
    p = add("retry", cmd_retry, "run a failed/quarantined/waiting group again from its checkpoint")
    p.add_argument("group")
    p = add("requeue", cmd_requeue, "send a group back to an earlier (committed) stage")
    p.add_argument("group")
    p.add_argument("--from-stage", required=True, choices=[s.value for s in _stages()])
    p = add("quarantine", cmd_quarantine, "take a group out of processing")
    p.add_argument("group")
    p.add_argument("--reason", required=True)

    p = add("status", cmd_status, "counts per state and the newest groups", json_flag=True)
    p.add_argument("--limit", type=int, default=20, help="how many groups to list")

    p = add(
        "check-state",
        cmd_check_state,
        "compare the database with the disk; --repair fixes what is safe (dry run by default)",
        json_flag=True,
    )
    p.add_argument("--repair", action="store_true", help="apply the safe repairs")

    cal = sub.add_parser("calibration", help="calibration sets", parents=[common])
    cal_sub = cal.add_subparsers(dest="calibration_command", required=True, metavar="SUBCOMMAND")
    sp = cal_sub.add_parser(
        "list", parents=[common], help="sets with validity, quality, status and use"
    )
    sp.set_defaults(func=cmd_calibration_list)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = cal_sub.add_parser("show", parents=[common], help="one set: tables, metrics, users")
    sp.set_defaults(func=cmd_calibration_show)
    sp.add_argument("set_id", type=int, metavar="SET")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp = cal_sub.add_parser("retire", parents=[common], help="never choose this set again")
    sp.set_defaults(func=cmd_calibration_retire)
    sp.add_argument("set_id", type=int, metavar="SET")
    sp.add_argument("--reason", required=True)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    db = sub.add_parser("db", help="database schema commands", parents=[common])
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    for name, func, text in (
        ("upgrade", cmd_db_upgrade, "apply migrations up to the newest revision"),
        ("check", cmd_db_check, "compare the models with the migrated schema"),
        (
            "backup",
            cmd_db_backup,
            "take a verified online backup of the SQLite database (to paths.backups)",
        ),
        (
            "restore",
            cmd_db_restore,
            "put a verified backup in place (the old file kept aside) and bring it forward "
            "from the products' manifests; refused while a daemon runs",
        ),
        (
            "rebuild",
            cmd_db_rebuild,
            "rebuild the database from the products' commit manifests and the incoming "
            "files (a corrupt file is kept aside); refused while a daemon runs",
        ),
    ):
        sp = db_sub.add_parser(name, parents=[common], help=text, description=text)
        sp.set_defaults(func=func)
        if name == "upgrade":
            sp.add_argument(
                "--start-fresh",
                action="store_true",
                help="create a new database although products/ holds commits it does not "
                "know (they go to lost+found/)",
            )
        elif name == "backup":
            sp.add_argument("--out", default=None, metavar="FILE", help="write it here instead")
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        elif name == "restore":
            sp.add_argument("file", metavar="FILE", help="a backup taken by db backup")

    cfg = sub.add_parser("config", help="configuration commands", parents=[common])
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    sp = cfg_sub.add_parser(
        "check", parents=[common], help="validate a configuration (default + FILE + environment)"
    )
    sp.add_argument("file", nargs="?", default=None, help="configuration file to check")
    sp.add_argument("--json", action="store_true", help="print the effective configuration")
    sp.set_defaults(func=cmd_config_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("config", "workspace"):
        if not hasattr(args, name):
            setattr(args, name, None)
    try:
        _refuse_root_in_foreign_workspace(args, sys.argv[1:] if argv is None else argv)
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        return _environment_error(exc, args)
    except BrokenPipeError:  # e.g. `status --json | head`: not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _environment_error(exc: Exception, args: argparse.Namespace) -> int:
    """A damaged database (any command): one message naming the file and the recovery, exit
    2; a daemon holding the workspace (restore, rebuild): exit 2. Anything else propagates."""
    from supervisor.dbfile import DatabaseCorrupt, WorkspaceBusy, is_corruption

    if isinstance(exc, WorkspaceBusy):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, DatabaseCorrupt):
        print(f"error: {exc.explain()}", file=sys.stderr)
        return EXIT_USAGE
    if is_corruption(exc):
        cfg = load_config(args.config, workspace=args.workspace)
        path = _sqlite_path(cfg) or Path(cfg.database_url)
        print(
            f"error: {DatabaseCorrupt(path, str(exc).splitlines()[0], cfg.path('backups'))}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    raise exc


if __name__ == "__main__":
    sys.exit(main())
