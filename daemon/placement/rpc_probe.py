"""Ask a llama.cpp RPC server how much memory its device has, over its own protocol.

llmd talks to the server directly rather than through `llama-server --rpc EP --list-devices`:
one TCP connection and three small messages take milliseconds, where spawning llama-server
takes a second or more, and a refused or timed-out connection says at once that the server
is unreachable.

The protocol, from ggml-rpc.cpp of the llama.cpp this llmd builds (protocol 7.x). Integers are
little-endian; a request is `cmd (u8) | size (u64) | payload`, a reply `size (u64) | payload`:

- HELLO (14), always first: payload 24 bytes of transport capabilities (zeros: plain TCP);
  reply `major, minor, patch, pad (u8 each) | capabilities (24 bytes)`;
- DEVICE_COUNT (15): no payload; reply `count (u32)`;
- GET_DEVICE_MEMORY (11): payload `device (u32)`; reply `free (u64) | total (u64)`, in bytes.

The server serves one client at a time: while an engine is connected, a new connection is
accepted by the kernel but not answered. Such a server is `busy`, not unreachable. Its listen
queue is one deep, so llmd does not probe a server one of its own engines holds (that would
fill the queue with connections it never answers, and the next one would time out);
`engine_link` reads that engine's connection instead.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Literal

import psutil

__all__ = ["RPC_PROTOCOL_MAJOR", "RpcProbe", "engine_link", "probe_rpc_server", "split_endpoint"]

# The RPC protocol of the llama.cpp this llmd builds; a server of another major version
# refuses its clients.
RPC_PROTOCOL_MAJOR = 7

_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_CAPS_SIZE = 24
_MIB = 1024 * 1024

Status = Literal["ok", "busy", "unreachable"]


@dataclass(frozen=True)
class RpcProbe:
    """What one look at an RPC server found.

    `ok`: it answered; `total_mib` and `free_mib` are its first device's memory.
    `busy`: it accepted the connection but did not answer in time (serving another client).
    `unreachable`: no connection, or an answer that is not the protocol; `detail` says which.
    """

    status: Status
    total_mib: int = 0
    free_mib: int = 0
    devices: int = 0
    version: str = ""
    detail: str = ""


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """("host", port) of "HOST:PORT"."""
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


class _NoAnswer(Exception):
    """The server took the connection but sent nothing back in time."""


def probe_rpc_server(endpoint: str, *, connect_timeout: float = 1.0, answer_timeout: float = 0.5) -> RpcProbe:
    """Connect to the RPC server at `endpoint` and read its first device's memory. Blocking:
    call it from a worker thread in async code. Never raises."""
    host, port = split_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        return RpcProbe("unreachable", detail=_why(exc))
    try:
        sock.settimeout(answer_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _converse(sock)
    except _NoAnswer:
        return RpcProbe("busy", detail="it accepted the connection but did not answer: another client is using it")
    except (OSError, ValueError, struct.error) as exc:
        return RpcProbe("unreachable", detail=_why(exc))
    finally:
        sock.close()


def _converse(sock: socket.socket) -> RpcProbe:
    hello = _request(sock, _CMD_HELLO, bytes(_CAPS_SIZE), 4 + _CAPS_SIZE, first=True)
    major, minor, patch = hello[0], hello[1], hello[2]
    version = f"{major}.{minor}.{patch}"
    if major != RPC_PROTOCOL_MAJOR:
        return RpcProbe(
            "unreachable", version=version,
            detail=f"it speaks RPC protocol {version}, llmd's llama.cpp speaks {RPC_PROTOCOL_MAJOR}.x: "
                   "run the same llama.cpp version on both machines",
        )
    (count,) = struct.unpack("<I", _request(sock, _CMD_DEVICE_COUNT, b"", 4))
    if count != 1:
        # llama-server numbers the devices of all its servers in one sequence (RPC0, RPC1...):
        # with one device per endpoint, llmd knows each one's name.
        what = "no device" if count < 1 else f"{count} devices; llmd uses one per endpoint: run one `llmd rpc-server --device NAME` per device"
        return RpcProbe("unreachable", version=version, devices=count, detail=f"it serves {what}")
    free, total = struct.unpack("<QQ", _request(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", 0), 16))
    return RpcProbe("ok", total_mib=total // _MIB, free_mib=free // _MIB, devices=count, version=version)


def _request(sock: socket.socket, cmd: int, payload: bytes, reply_size: int, *, first: bool = False) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    try:
        header = _read(sock, 8)
    except TimeoutError:
        # Only the first answer tells a busy server (still serving someone else) from a live one.
        if first:
            raise _NoAnswer from None
        raise
    (size,) = struct.unpack("<Q", header)
    if size != reply_size:
        raise ValueError(f"it answered {size} bytes where the RPC protocol has {reply_size}: is it an RPC server?")
    return _read(sock, size)


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("it closed the connection")
        data += chunk
    return data


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve its host name ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def engine_link(pid: int, endpoint: str) -> Literal["up", "down", "none"]:
    """The state of process `pid`'s TCP connection to `endpoint`: "up" while established,
    "down" once the server closed it (the server stopped, or its machine went away and said so),
    "none" when it has none (not connected yet, or gone). Blocking: resolves the host."""
    host, port = split_endpoint(endpoint)
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        addresses = {host}
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return "none"
    states = [
        conn.status for conn in connections
        if conn.raddr and conn.raddr.port == port and _unmapped(conn.raddr.ip) in addresses
    ]
    if not states:
        return "none"
    return "up" if psutil.CONN_ESTABLISHED in states else "down"


def _unmapped(ip: str) -> str:
    """An IPv4 address seen through an IPv6 socket ("::ffff:10.0.0.2") as itself."""
    return ip.removeprefix("::ffff:")
