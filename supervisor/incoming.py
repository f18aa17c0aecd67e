"""The incoming mount, where the correlator's raw files land (NTFS over FUSE on the real
nodes, and it drops out): whether it is there, a directory, readable, a mount point when it
should be one, and answering at all — every look bounded by a timeout, since a ``stat`` on a
dead FUSE mount can hang — and which I/O errors mean the storage failed, not the data.

An outage of the storage is never the data's fault: such errors are retryable, and intake
from the mount pauses while it lasts (the daemon's admission, ``resource="incoming"``).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import Config

# errno values that say the storage (a mount, a network filesystem, a disk) failed.
STORAGE_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ESTALE,
        errno.ENOTCONN,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
        errno.ENODEV,
        errno.ENXIO,
        errno.ECONNABORTED,
        errno.ECONNRESET,
    }
)


def is_storage_failure(exc: BaseException) -> bool:
    """True when ``exc`` (an OSError, or HDF5's wrapping of one) says the storage failed."""
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return True
    text = str(exc)
    return any(f"errno = {n}," in text or os.strerror(n) in text for n in STORAGE_ERRNOS)


@dataclass(frozen=True)
class IncomingState:
    """One look at the incoming directory. ok: usable; detail: what is wrong (or fine)."""

    path: Path
    ok: bool
    detail: str


def look(cfg: Config, timeout_s: float | None = None) -> IncomingState:
    """Look at ``paths.incoming`` within ``ingest.io_timeout_s``: exists, is a directory,
    can be listed, and is a mount point when ``ingest.incoming_is_mount``. A look that does
    not answer in time is left to finish in a daemon thread and reported as an outage."""
    path = cfg.incoming_dir
    timeout = cfg.ingest.io_timeout_s if timeout_s is None else timeout_s
    answer: list[IncomingState] = []

    def run() -> None:
        answer.append(_look(path, cfg.ingest.incoming_is_mount))

    worker = threading.Thread(target=run, name="incoming-look", daemon=True)
    worker.start()
    worker.join(timeout)
    if not answer:
        return IncomingState(
            path,
            False,
            f"incoming directory {path} did not answer within {timeout:g} s (a dead FUSE mount?)",
        )
    return answer[0]


def _look(path: Path, must_be_mount: bool) -> IncomingState:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return IncomingState(path, False, f"incoming directory {path} does not exist")
    except OSError as exc:
        return IncomingState(path, False, f"incoming directory {path}: {exc.strerror}")
    if not stat.S_ISDIR(st.st_mode):
        return IncomingState(path, False, f"incoming {path} is not a directory")
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except OSError as exc:
        return IncomingState(path, False, f"incoming directory {path} cannot be listed: {exc}")
    if must_be_mount and not os.path.ismount(path):
        return IncomingState(
            path,
            False,
            f"incoming directory {path} is not a mount point (ingest.incoming_is_mount): the "
            "raw-data disk is not mounted there",
        )
    return IncomingState(path, True, f"incoming directory {path} is readable")
