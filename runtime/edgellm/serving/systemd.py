"""systemd glue: sd_notify over NOTIFY_SOCKET, and logging to the journal or stderr.

The notify protocol is one datagram of newline-separated VAR=value lines to the unix socket
named in $NOTIFY_SOCKET ('@' = abstract namespace); it is short enough to speak with the
socket module, which keeps systemd-python optional (the GPU boxes lack it). systemd-python
is used only for structured journal logging, when present.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

log = logging.getLogger("edgellm.serving.systemd")


class Notifier:
    """Sends READY/STATUS/STOPPING/WATCHDOG to systemd; does nothing outside systemd."""

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._sock = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.ping_every: float | None = None  # seconds: half of WatchdogSec, as sd_watchdog_enabled(3) advises
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.ping_every = int(usec) / 1e6 / 2
        self._last_ping = float("-inf")
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None:
            return
        try:
            with self._lock:
                self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:  # systemd gone or socket full: never let this take the daemon down
            log.warning("sd_notify to %r failed: %s", self._address, e)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        """Called from the scheduler loop every iteration, so a stuck loop stops the pings;
        sends at most one per half WatchdogSec."""
        if self.ping_every is None or self._sock is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.ping_every:
            self._last_ping = now
            self.notify("WATCHDOG=1")


def under_systemd(environ: dict[str, str] | None = None) -> bool:
    """stderr is the journal: systemd sets JOURNAL_STREAM to its device:inode."""
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str = "info") -> None:
    """Journal (with priority and fields) when run by systemd and systemd-python is there;
    stderr otherwise (under systemd that still lands in the journal, without timestamps twice)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level.upper())
    handler: logging.Handler | None = None
    journal = under_systemd()
    if journal:
        try:
            from systemd.journal import JournalHandler
        except ImportError:
            pass
        else:
            handler = JournalHandler(SYSLOG_IDENTIFIER="edgellmd")
            handler.setFormatter(logging.Formatter("%(message)s"))
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s" if journal else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
