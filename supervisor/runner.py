"""Run one stage worker as a subprocess in its own session, watch it, and make sure that when
it ends nothing it started is left running.

The worker gets its own session and process group (so one signal reaches all of it), its own
attempt directory as cwd, and a CASA site config routing CASA's log there. We remember every
descendant we see while it runs: a grandchild that called ``setsid`` escapes the process
group but not that list. On timeout, lost lease or shutdown: SIGTERM to everything, a grace
period, SIGKILL, then a check that no member survives.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

# The directory holding the ``stages`` package (the repository, or site-packages).
STAGES_ROOT = Path(str(importlib.util.find_spec("stages").origin)).parent.parent  # type: ignore[union-attr]

ATTEMPT_MARK_ENV = "CONTIMG_ATTEMPT_MARK"
CORRELATION_ENV = "CONTIMG_CORRELATION_ID"


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """A process as it can be recognised later: pid reuse is caught by the start time."""

    pid: int
    create_time: float  # psutil.Process.create_time(), seconds since the epoch

    def process(self) -> psutil.Process | None:
        """The live process with this identity, or None (gone, or the pid was reused)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.01:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    pid: int
    pgid: int
    create_time: float


@dataclass
class RunOutcome:
    """How a worker run ended. ``result`` is the parsed result JSON when it was valid."""

    returncode: int | None
    duration_s: float
    timed_out: bool = False
    hung: bool = False  # no CPU time and no output growth for stall_timeout_s
    lease_lost: bool = False
    stopped: bool = False  # shutdown asked us to stop it
    result: dict[str, Any] | None = None
    result_problem: str | None = None  # why the result file was unusable, if it was
    stderr_tail: str = ""
    survivors: list[int] = field(default_factory=list)  # pids that would not die (should be [])
    peak_rss_bytes: int = 0  # the worker and its descendants, sampled while it ran
    worker_s: float = 0.0  # wall time from just before the spawn to the exit being seen
    worker_cpu_s: float = 0.0  # user + system CPU of the worker and the children it reaped
    pid: int = 0  # the worker (its session and process group have the same id)
    create_time: float = 0.0

    @property
    def interrupted(self) -> bool:
        return self.timed_out or self.hung or self.lease_lost or self.stopped


def worker_command(python: str, module: str, request_path: Path) -> list[str]:
    return [python, "-m", module, "--request", str(request_path)]


def worker_environment(
    base: dict[str, str], mark: str, correlation_id: str | None = None, threads: int | None = None
) -> dict[str, str]:
    """Make the project's ``stages`` package importable by any casa6 interpreter, mark
    every process of this attempt with ``mark`` (unique per attempt), hand down the
    group's correlation id (``CONTIMG_CORRELATION_ID``) and cap the worker's OpenMP/BLAS
    threads at ``threads`` (its share of the node's cores)."""
    env = dict(base)
    env[ATTEMPT_MARK_ENV] = mark
    if threads:
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
    if correlation_id:
        env[CORRELATION_ENV] = correlation_id
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(STAGES_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def run_worker(
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    result_path: Path,
    timeout_s: float,
    grace_s: float,
    heartbeat_s: float,
    heartbeat: Callable[[], bool] = lambda: True,
    should_stop: Callable[[], bool] = lambda: False,
    on_start: Callable[[WorkerStarted], None] = lambda _: None,
    monotonic: Callable[[], float] = time.monotonic,
    stall_timeout_s: float = 0.0,
    watch_files: tuple[Path, ...] = (),
    memory_limit_bytes: int = 0,
) -> RunOutcome:
    """Start ``command`` and supervise it until it ends (see the module docstring).

    ``heartbeat`` is called every ``heartbeat_s`` while the worker lives; returning False
    means the lease is lost and the worker is stopped. ``should_stop`` is polled as often.
    ``stall_timeout_s`` (0: off): a worker whose processes use no CPU time and whose
    stdout, stderr and ``watch_files`` do not grow for that long is hung (CASA blocks
    forever on a casacore table lock) and is stopped well before ``timeout_s``.
    ``memory_limit_bytes`` (0: none): the worker's address space (RLIMIT_AS), set right
    after it starts, so that a runaway allocation raises MemoryError in the worker instead
    of taking the node down.
    """
    stdout = (cwd / "worker.stdout").open("ab")
    stderr_path = cwd / "worker.stderr"
    stderr = stderr_path.open("ab")
    started = monotonic()
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        close_fds=True,
    )
    stdout.close()
    stderr.close()
    if memory_limit_bytes > 0:
        with contextlib.suppress(OSError):  # gone already: it is reaped below
            resource.prlimit(proc.pid, resource.RLIMIT_AS, (memory_limit_bytes,) * 2)
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:  # already gone; still reap it below
        create_time = 0.0
    on_start(WorkerStarted(proc.pid, proc.pid, create_time))
    seen: dict[int, ProcessIdentity] = {proc.pid: ProcessIdentity(proc.pid, create_time)}
    outcome = RunOutcome(returncode=None, duration_s=0.0, pid=proc.pid, create_time=create_time)
    next_beat = started + heartbeat_s
    poll_s = min(0.2, heartbeat_s)
    watched = (cwd / "worker.stdout", stderr_path, *watch_files)
    # No reading before the first poll: most workers of a backlog's light stages end
    # within it. The first reading then counts as activity, so the stall clock starts
    # at most one poll (0.2 s) late.
    activity: tuple[float, tuple[int, ...]] | None = None
    active_at = started
    exited = _ExitWatch(proc)
    polls = 0
    while True:
        # Not before the first wait: a worker that ends within it (most do in tests, and
        # every no-op) costs no process-table scan; wait4 reports its peak RSS.
        if polls:
            _remember_descendants(proc.pid, seen)
            outcome.peak_rss_bytes = max(outcome.peak_rss_bytes, _tree_rss(proc.pid))
        polls += 1
        if exited.wait(poll_s):
            break
        now = monotonic()
        if stall_timeout_s > 0:
            current = _activity(proc.pid, seen, watched)
            if current != activity:
                activity, active_at = current, now
        if stall_timeout_s > 0 and now - active_at > stall_timeout_s:
            outcome.hung = True
        elif now - started > timeout_s:
            outcome.timed_out = True
        elif should_stop():
            outcome.stopped = True
        elif now >= next_beat:
            next_beat = now + heartbeat_s
            if not heartbeat():
                outcome.lease_lost = True
        if outcome.interrupted:
            terminate(
                list(seen.values()), proc.pid, grace_s, env.get(ATTEMPT_MARK_ENV), create_time
            )
            exited.wait(None)
            break
    outcome.worker_s = monotonic() - started
    exited.close()
    outcome.peak_rss_bytes = max(outcome.peak_rss_bytes, exited.max_rss_bytes)
    outcome.worker_cpu_s = exited.cpu_s
    # Whatever happened, nothing of the attempt may outlive it.
    outcome.survivors = terminate(
        list(seen.values()), proc.pid, grace_s, env.get(ATTEMPT_MARK_ENV), since=create_time
    )
    outcome.returncode = proc.returncode
    outcome.duration_s = monotonic() - started
    outcome.stderr_tail = _tail(stderr_path)
    outcome.result, outcome.result_problem = read_result(result_path)
    return outcome


class _ExitWatch:
    """Wait for the worker's exit without polling: a pidfd (Linux >= 5.3) becomes readable
    the moment the process ends, so a 40 ms worker is not noticed 50 ms late (Popen.wait's
    timeout loop sleeps up to 50 ms between checks). The worker is then reaped with
    ``wait4``, which also reports its peak resident memory (ru_maxrss) and CPU time, each
    of the worker and the descendants it waited for."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.max_rss_bytes = 0
        self.cpu_s = 0.0
        try:
            self.fd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # old kernel or not Linux: Popen's own wait
            self.fd = None

    def wait(self, timeout: float | None) -> bool:
        """True once the worker has ended (and is reaped); False after ``timeout`` s."""
        if self.proc.returncode is not None:
            return True
        if self.fd is None:
            try:
                self.proc.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            _pid, status, usage = os.wait4(self.proc.pid, 0)
        except ChildProcessError:  # reaped elsewhere: let Popen report what it knows
            self.proc.wait()
            return True
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.max_rss_bytes = usage.ru_maxrss * 1024  # kilobytes on Linux
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


WORKER_IDENTITY_FILE = "worker.pid"


def write_worker_identity(workdir: Path, started: WorkerStarted) -> None:
    """``workdir/worker.pid``: the running worker's pid and start time, as JSON."""
    (workdir / WORKER_IDENTITY_FILE).write_text(
        json.dumps({"pid": started.pid, "pgid": started.pgid, "create_time": started.create_time})
    )


def read_worker_identity(workdir: Path) -> tuple[int, float] | None:
    """(pid, create_time) from ``workdir/worker.pid``, or None."""
    try:
        data = json.loads((workdir / WORKER_IDENTITY_FILE).read_text())
        return int(data["pid"]), float(data["create_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_result(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Parse and sanity-check a worker's result file: (result, None) or (None, problem)."""
    if not path.exists():
        return None, "no result file"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"result file is not valid JSON: {exc}"
    if not isinstance(data, dict) or data.get("status") not in ("succeeded", "failed"):
        return None, "result file lacks a status of succeeded/failed"
    if data["status"] == "failed" and not isinstance(data.get("error"), dict):
        return None, "failed result without an error record"
    if data["status"] == "succeeded" and not isinstance(data.get("artifacts", []), list):
        return None, "artifacts must be a list"
    return data, None


def terminate(
    members: list[ProcessIdentity],
    session_id: int,
    grace_s: float,
    mark: str | None = None,
    since: float = 0.0,
) -> list[int]:
    """SIGTERM every live member, the process group ``session_id`` and every process marked
    ``mark``; wait ``grace_s``; SIGKILL the rest. Return the pids still alive afterwards
    (normally none). ``since``: when the attempt's first process started (psutil create
    time; 0: unknown); nothing older can belong to it, so older processes are not examined."""

    def everyone() -> list[psutil.Process]:
        found = {p.pid: p for p in _live(members)}
        found.update((p.pid, p) for p in _session_or_marked(session_id, mark, since))
        return list(found.values())

    _signal_group(session_id, signal.SIGTERM)
    live = everyone()
    if not live:
        # The common, clean end of a worker: nothing of it is alive, so nothing can fork
        # later. (A descendant double-forking during this one scan could slip through;
        # start-up recovery's scan for the attempt's mark is the second net.)
        return []
    for proc in live:
        _send(proc, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(live, timeout=grace_s)
    if alive:
        _signal_group(session_id, signal.SIGKILL)
        for proc in alive:
            _send(proc, signal.SIGKILL)
        _gone, alive = psutil.wait_procs(alive, timeout=5.0)
    stragglers = everyone()
    for proc in stragglers:  # late forks seen only now
        _send(proc, signal.SIGKILL)
    psutil.wait_procs(stragglers, timeout=2.0)
    return sorted(p.pid for p in everyone())


def kill_leftover(pid: int, create_time: float, grace_s: float, mark: str) -> bool:
    """Kill what a worker recorded by an earlier daemon life left running: the worker
    itself if that very process still runs (pid + start time), its session, and every
    process carrying its attempt ``mark``. Returns True if anything was found.

    A pid that now belongs to another process (different start time) is not touched.
    """
    ident = ProcessIdentity(pid, create_time)
    proc = ident.process() if pid > 0 else None
    members: list[ProcessIdentity] = []
    session = pid
    if proc is not None:
        members = [ident] + [ProcessIdentity(c.pid, c.create_time()) for c in _safe_children(proc)]
    elif pid <= 0 or psutil.pid_exists(pid):
        session = -1  # never started, or the pid was reused: that session is not ours
    since = create_time if create_time > 0 else 0.0
    found = bool(members) or bool(_session_or_marked(session, mark, since))
    if found:
        terminate(members, session, grace_s, mark, since)
    return found


def _remember_descendants(pid: int, seen: dict[int, ProcessIdentity]) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for child in _safe_children(root):
        try:
            seen.setdefault(child.pid, ProcessIdentity(child.pid, child.create_time()))
        except psutil.NoSuchProcess:
            continue


def _activity(
    pid: int, seen: dict[int, ProcessIdentity], files: tuple[Path, ...]
) -> tuple[float, tuple[int, ...]]:
    """CPU seconds used by the attempt's live processes and the sizes of its output files:
    if neither moves, nothing is happening."""
    cpu = 0.0
    for ident in seen.values():
        proc = ident.process()
        if proc is None:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            cpu += t.user + t.system
    sizes = []
    for path in files:
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            sizes.append(-1)
    return round(cpu, 2), tuple(sizes)


def _tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants now (bytes; 0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        total = root.memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
    for child in _safe_children(root):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += child.memory_info().rss
    return total


def _safe_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _live(members: list[ProcessIdentity]) -> list[psutil.Process]:
    return [p for p in (m.process() for m in members) if p is not None]


def _session_or_marked(
    session_id: int, mark: str | None, since: float = 0.0
) -> list[psutil.Process]:
    """Live processes in session / process group ``session_id`` or carrying ``mark``,
    in one pass over the process table (the environment is read only when needed).
    Processes created before ``since`` (less a second of clock-tick rounding) are passed
    over unread: psutil caches each process's start time, so only new ones cost a read."""
    out: list[psutil.Process] = []
    me = os.getpid()
    for proc in psutil.process_iter():
        try:
            if proc.pid == me or proc.create_time() < since - 1.0:
                continue
            in_session = session_id > 0 and session_id in (
                os.getsid(proc.pid),
                os.getpgid(proc.pid),
            )
            if not in_session and not (mark and proc.environ().get(ATTEMPT_MARK_ENV) == mark):
                continue
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error, OSError):
            continue
    return out


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    if pgid <= 0:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _send(proc: psutil.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        proc.send_signal(sig)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""
