"""Open the daemon's listening sockets up front, so a port in use or a stale socket gets a clear error."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from llmd.daemon.errors import AddressInUseError, ConfigError

SOCKET_MODE = 0o660


def bind_tcp(host: str, port: int, setting: str = "[server] listen") -> socket.socket:
    """A TCP socket bound to host:port (IPv4 or IPv6). Errors name `setting`, where the address
    came from; AddressInUseError when another socket holds it."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"{setting}: cannot resolve host {host!r}: {exc}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(
                f"{setting}: {host}:{port} is already in use; stop what holds it or choose another port"
            ) from None
        raise ConfigError(f"{setting}: cannot bind {host}:{port}: {exc.strerror}; use an address of this host") from None
    return sock


def bind_unix(path: Path) -> socket.socket:
    """A unix socket at `path` with mode 0660, replacing a stale one but never a live daemon's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left over from a crash
        else:
            raise ConfigError(f"another llmd is already serving on {path}; stop it first (llmd shuts down on SIGTERM)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # never let the socket exist with looser permissions, even briefly
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"[server] socket: cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    return sock
