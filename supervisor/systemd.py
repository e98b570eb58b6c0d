"""systemd's notify protocol, without dependencies: READY, STOPPING, STATUS and the watchdog.

The supervisor reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` at start-up and removes them from its environment, so no
worker inherits them. A socket path starting with `@` is in the abstract namespace. Outside systemd (no
`NOTIFY_SOCKET`) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to the service manager."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        watchdog_pid = environ.get("WATCHDOG_PID")
        usec = environ.get("WATCHDOG_USEC", "")
        for_us = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and for_us else None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def send(self, message: str) -> None:
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a missing socket would otherwise be reported at every watchdog ping
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)
                self._warned = True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
