"""The least a proxy written in Python can cost: a bare byte relay on uvloop.

Each client connection gets a connection of its own to the engine, and bytes are copied both
ways as they arrive, with no HTTP parsing, no routing, no metrics: one read and one write per
piece, in one callback, which is what llmd's stream relay and nginx do too. What it costs per
relayed event is the floor for any proxy built on the same event loop; the suite measures it
beside llmd and nginx (the target `relay`), so a report shows how much of llmd's cost is its
own and how much is Python's.

The suite runs it in a process of its own (`ByteRelay`, which calls `serve_forever`).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import psutil
import uvloop

from .harness import LOCALHOST, free_port, stop_process, wait_listening


class _Half(asyncio.Protocol):
    """One side of a relayed connection: what it reads, its peer writes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []  # read before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # The peer cannot take more: stop reading until it can (back-pressure, as any proxy must).
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Half):
    def __init__(self, engine_port: int) -> None:
        super().__init__()
        self.engine_port = engine_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        engine = _Half()
        engine.peer = self
        try:
            await asyncio.get_running_loop().create_connection(lambda: engine, LOCALHOST, self.engine_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert engine.transport is not None
        if self.transport is None or self.transport.is_closing():
            engine.transport.close()  # the client left while the engine connection was made
            return
        self.peer = engine
        for data in self.pending:
            engine.transport.write(data)
        self.pending.clear()


async def _serve(port: int, engine_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Client(engine_port), LOCALHOST, port)
    await server.serve_forever()


def serve_forever(port: int, engine_port: int) -> None:
    """Relay `port` to the engine at `engine_port` until killed."""
    uvloop.run(_serve(port, engine_port))


# Imported, not run with `-m`: the package imports this module already, and runpy would run
# a second copy of it as __main__ (with a warning saying so).
_MAIN = "import sys; from bench.byte_relay import serve_forever; serve_forever(int(sys.argv[1]), int(sys.argv[2]))"


@dataclass
class ByteRelay:
    """The relay in a subprocess of its own, in front of the engine at `upstream_port`."""

    upstream_port: int
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port()
        self.popen = subprocess.Popen(
            [sys.executable, "-c", _MAIN, str(self.port), str(self.upstream_port)],
            cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL,
        )
        wait_listening(self.popen, self.port, "the byte relay")

    def pids(self) -> list[int]:
        return [self.popen.pid] if self.popen is not None and psutil.pid_exists(self.popen.pid) else []

    def stop(self) -> None:
        if self.popen is not None:
            stop_process(self.popen)
            self.popen = None

