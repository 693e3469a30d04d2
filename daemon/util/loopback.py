"""Reaching this host's own listeners: an engine's port without a name lookup, llmd's own
listen address by URL."""

from __future__ import annotations

import errno
import os
import socket

import anyio


async def connect(host: str, port: int) -> socket.socket:
    """A connected, non-blocking TCP socket to `host` (an IP literal) on `port`.

    The event loop's own helpers (uvloop's `sock_connect` and `create_connection`) resolve even
    an IP literal through getaddrinfo on a worker thread. For a health probe every second per
    engine, that thread hand-off was most of what an idle daemon cost.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        error = sock.connect_ex((host, port))
        if error == errno.EINPROGRESS:
            await anyio.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, f"cannot connect to {host}:{port}: {os.strerror(error)}")
    except BaseException:
        sock.close()
        raise
    return sock


def reachable_url(host: str, port: int) -> str:
    """An http URL that reaches a listen address from this host (a wildcard address means loopback)."""
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{connect}]:{port}" if ":" in connect else f"http://{connect}:{port}"


def is_loopback_host(host: str) -> bool:
    """Whether a listen address's host is reachable from this host only (127.0.0.0/8, ::1,
    localhost); a wildcard or any other address is reachable from the network."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to may be another machine's view of this one
