"""sd_notify without a dependency: one datagram to ``$NOTIFY_SOCKET`` (a path, or an abstract ``@name``
socket); a no-op outside systemd. ``medqc agent`` sends READY=1 once the AE listens and the model is
loaded, WATCHDOG=1 from its main loop and STOPPING=1 on shutdown."""

from __future__ import annotations

import os
import socket


def notify(message: str, env: dict | None = None) -> bool:
    """Send ``message`` (e.g. "READY=1\\nSTATUS=receiving"); True when a datagram was sent."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        return False  # vsock and other families are not used for a local service
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(message.encode())
    return True


def watchdog_interval_s(env: dict | None = None) -> float | None:
    """Half the unit's WatchdogSec (``$WATCHDOG_USEC``), the interval to send WATCHDOG=1 at; None if off."""
    e = env if env is not None else os.environ
    usec = e.get("WATCHDOG_USEC", "")
    pid = e.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
