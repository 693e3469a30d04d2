"""`llmctl shutdown`: stop a daemon the user runs, as SIGTERM does, and wait until it is gone.

Only the standard library besides click: like `ps`, it must start quickly.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import click

from llmd.daemon.cli.client import daemon_for, fail

# How often to look whether the daemon is gone.
POLL_SECONDS = 0.1


@click.command()
@click.pass_context
def shutdown(ctx: click.Context) -> None:
    """Stop llmd as SIGTERM does (in-flight requests finish, engines stop) and wait until it is gone.

    A daemon that systemd runs is left to it: stop that one with `systemctl stop llmd`.
    """
    daemon = daemon_for(ctx)
    answer = daemon.call("POST", "/v1/shutdown")
    pid, within = int(answer["pid"]), float(answer["within_s"])
    click.echo(f"llmd (pid {pid}) is stopping: finishing in-flight requests, then stopping its engines", err=True)
    if not wait_until_gone(daemon.socket_path, pid, within):
        fail(f"llmd (pid {pid}) is still running {within:.0f}s later; its log says what it is waiting for")
    click.echo(f"llmd stopped (pid {pid})")


def wait_until_gone(socket_path: Path, pid: int, timeout: float) -> bool:
    """Wait until nothing answers on `socket_path` and process `pid` has ended; False after `timeout`.

    The daemon closes its socket once every engine has stopped, and exits right after."""
    deadline = time.monotonic() + timeout
    while socket_answers(socket_path) or process_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def socket_answers(path: Path) -> bool:
    """Whether something accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def process_running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended; an ended one its parent has not reaped
    yet (a zombie) counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        # /proc/PID/stat: "PID (COMMAND) STATE ..."; COMMAND may hold spaces and parentheses.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc to ask: it exists, as far as we can tell
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
