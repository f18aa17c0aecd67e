"""The systemd notify protocol (sd_notify(3)), written in a few lines rather than taken from
a library: one datagram of ``KEY=value`` lines to the socket named by ``NOTIFY_SOCKET``
(a path, or an abstract name starting with ``@``). Outside systemd every call is a no-op.

The daemon sends READY=1 once migrations, config and a database write are checked;
STATUS= lines as work moves; STOPPING=1 and EXTEND_TIMEOUT_USEC= while it drains; and
WATCHDOG=1 only when its scheduling loop has made progress (see :mod:`supervisor.daemon`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends notifications to systemd (or nowhere, when not started by it)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not watchdog_pid or watchdog_pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def watchdog_interval_s(self) -> float:
        """How often to ping: half the watchdog timeout (sd_watchdog_enabled(3)); 0 = off."""
        return self.watchdog_usec / 2e6

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines; False (and a log line) when it could not be sent."""
        if not self.address:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the scheduling loop on a reader that is not reading (a full
                # datagram queue): the message is dropped instead, and said so.
                self._sock.setblocking(False)
            self._sock.sendto(payload, self.address)
            return True
        except BlockingIOError:
            log.warning("notify.dropped", reason="notify socket queue full", fields=list(fields))
            return False
        except OSError as exc:
            log.warning("notify.failed", error=str(exc), fields=list(fields))
            return False

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def stopping(self, status: str, extend_s: float) -> bool:
        return self.send(STOPPING=1, STATUS=status, EXTEND_TIMEOUT_USEC=int(extend_s * 1e6))

    def extend_timeout(self, seconds: float, status: str) -> bool:
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6), STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
