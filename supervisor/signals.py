"""Signals as events of the supervisor's loop: the wake-up file descriptor carries each signal's number to the loop,
which runs the callback for it between its other work (never inside a signal handler)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

from supervisor.loop import Loop


def install(loop: Loop, on_signal: dict[signal.Signals, Callable[[signal.Signals], None]]) -> tuple[socket.socket, ...]:
    """Run `on_signal[signum](signum)` on `loop` when the process gets one of those signals. Returns the socket
    pair that carries them; closing it is the caller's (`uninstall`)."""
    receive, send = socket.socketpair()
    send.setblocking(False)
    receive.setblocking(False)
    signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    for signum in on_signal:
        signal.signal(signum, lambda *_: None)  # the wake-up fd carries the signal number to the loop

    by_number = {int(signum): (signum, callback) for signum, callback in on_signal.items()}

    def signalled() -> None:
        for number in receive.recv(64):
            known = by_number.get(number)  # another signal's number (one with a handler elsewhere) is not ours
            if known is not None:
                signum, callback = known
                callback(signum)

    loop.add_reader(receive, signalled)
    return receive, send


def uninstall(sockets: tuple[socket.socket, ...]) -> None:
    signal.set_wakeup_fd(-1)
    for sock in sockets:
        sock.close()
