"""systemd's notify protocol: one datagram per message to $NOTIFY_SOCKET.

READY=1 once both listeners serve, STATUS= lines as state changes, STOPPING=1 on shutdown,
and WATCHDOG=1 pings sent from the event loop itself, so a hung loop stops the pings and
systemd restarts the daemon. Without $NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import anyio

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
# systemd sets it for every process of a unit it starts, whatever the unit's Type.
INVOCATION_ID_ENV = "INVOCATION_ID"
# systemd 248 and later: the pid of the process it started. A shell in a terminal that runs as a
# user service inherits the terminal's $INVOCATION_ID and this, with the terminal's pid.
EXEC_PID_ENV = "SYSTEMD_EXEC_PID"


def started_by_systemd(environ: Mapping[str, str] | None = None) -> str | None:
    """Which of $NOTIFY_SOCKET and $INVOCATION_ID systemd set for this process; None: neither,
    systemd did not start it.

    Read it at startup: the environment is what systemd gave the process then. A shell inside
    another systemd unit (a terminal that runs as a user service) passes $INVOCATION_ID on too;
    $SYSTEMD_EXEC_PID, where systemd sets it, tells the two apart, since it names the process
    systemd started. A refusal that rests on this names the variable all the same."""
    env = os.environ if environ is None else environ
    if env.get(NOTIFY_SOCKET_ENV):
        return NOTIFY_SOCKET_ENV
    exec_pid = env.get(EXEC_PID_ENV)
    if env.get(INVOCATION_ID_ENV) and (not exec_pid or exec_pid == str(os.getpid())):
        return INVOCATION_ID_ENV
    return None


def notify(*messages: str) -> bool:
    """Send `messages` (e.g. "READY=1", "STATUS=...") in one datagram; False when not under systemd."""
    address = os.environ.get(NOTIFY_SOCKET_ENV)
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(messages).encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WatchdogSec), or None when no watchdog is set for this process."""
    usec = os.environ.get(WATCHDOG_USEC_ENV)
    pid = os.environ.get(WATCHDOG_PID_ENV)
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000 / 2


async def ping_watchdog_forever(interval: float) -> None:
    """Ping from the event loop: if the loop hangs, the pings stop and systemd acts."""
    while True:
        notify("WATCHDOG=1")
        await anyio.sleep(interval)
