"""`python -m bench.hop`: HTTP clients for the proxy's engine hop, side by side.

The proxy's own cost is mostly the hop to the engine: sending a request and reading its reply,
in full for small requests and event by event for streams. This runs that hop in one process,
on uvloop as the daemon does, against one llama-server on the tiny model, with each candidate
client in turn:

- `httpx`: an `httpx.AsyncClient` set up as the daemon used to set it up;
- `aiohttp`: an `aiohttp.ClientSession` (left out when aiohttp is not installed);
- `upstream`: `llmd.daemon.http.upstream.Pool`, an asyncio protocol with httptools.

Two workloads, each in rounds that rotate the clients' order so that none always goes first:
sequential `max_tokens = 1` chat requests (the client's CPU per request, and the latency p50),
and concurrent 256-token streams (the client's CPU per relayed event). The client's CPU is this
process's, which only runs the client: the engine is a process of its own.

    .venv/bin/python -m bench.hop --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from llmd.daemon.http.upstream import Pool

from .harness import (
    LOCALHOST,
    BenchError,
    DirectEngine,
    default_models_dir,
    find_llama_server,
)
from .httpclient import chat_body
from .stats import median, percentile
from .suite import TINY, engine_args

PATH = "/v1/chat/completions"
HEADERS = [(b"content-type", b"application/json"), (b"accept", b"*/*")]


def events(piece: bytes) -> int:
    """The server-sent events a piece of a reply completes."""
    return piece.count(b"\n\n")


class Hop:
    """One candidate client: `exchange` sends a request, reads the reply piece by piece as it
    arrives (the way the proxy hands it on), and returns the server-sent events it carried."""

    name = ""

    async def open(self, port: int) -> None:
        raise NotImplementedError

    async def exchange(self, body: bytes) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class HttpxHop(Hop):
    name = "httpx"

    async def open(self, port: int) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            base_url=f"http://{LOCALHOST}:{port}",
            timeout=httpx.Timeout(connect=10.0, read=None, write=60.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            trust_env=False,
        )

    async def exchange(self, body: bytes) -> int:
        request = self.client.build_request("POST", PATH, content=body, headers=HEADERS)
        response = await self.client.send(request, stream=True)
        count = 0
        try:
            async for piece in response.aiter_raw():
                count += events(piece)
        finally:
            await response.aclose()
        return count

    async def close(self) -> None:
        await self.client.aclose()


class AiohttpHop(Hop):
    name = "aiohttp"

    async def open(self, port: int) -> None:
        import aiohttp

        self.base = f"http://{LOCALHOST}:{port}{PATH}"
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=None, connect=10))
        self.headers = {k.decode(): v.decode() for k, v in HEADERS}

    async def exchange(self, body: bytes) -> int:
        count = 0
        async with self.session.post(self.base, data=body, headers=self.headers) as response:
            async for piece in response.content.iter_any():
                count += events(piece)
        return count

    async def close(self) -> None:
        await self.session.close()


class UpstreamHop(Hop):
    name = "upstream"

    async def open(self, port: int) -> None:
        self.pool = Pool(LOCALHOST, port)

    async def exchange(self, body: bytes) -> int:
        response = await self.pool.request("POST", PATH, HEADERS, body)
        count = 0
        try:
            async for piece in response:
                count += events(piece)
        finally:
            response.close()
        return count

    async def close(self) -> None:
        await self.pool.aclose()


def candidates() -> list[Hop]:
    hops: list[Hop] = [HttpxHop()]
    if importlib.util.find_spec("aiohttp") is not None:
        hops.append(AiohttpHop())
    hops.append(UpstreamHop())
    return hops


async def _timed(work: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    cpu = time.process_time()
    result = await work()
    return time.process_time() - cpu, result


async def requests_round(hop: Hop, body: bytes, count: int) -> tuple[float, list[float]]:
    """`count` sequential requests: CPU seconds per request and each request's latency."""
    latencies: list[float] = []

    async def run() -> None:
        for _ in range(count):
            start = time.perf_counter()
            await hop.exchange(body)
            latencies.append(time.perf_counter() - start)

    cpu, _ = await _timed(run)
    return cpu / count, latencies


async def streams_round(hop: Hop, body: bytes, clients: int) -> tuple[float, int]:
    """`clients` concurrent streams: CPU seconds per relayed event, and the events."""
    cpu, counts = await _timed(lambda: asyncio.gather(*(hop.exchange(body) for _ in range(clients))))
    total = sum(counts)
    return cpu / max(total, 1), total


async def compare(port: int, rounds: int, requests: int, clients: int, tokens: int) -> dict[str, dict[str, float]]:
    hops = candidates()
    small = chat_body("tiny", 1, stream=False)
    stream = chat_body("tiny", tokens, stream=True)
    per_request: dict[str, list[float]] = {h.name: [] for h in hops}
    latency: dict[str, list[float]] = {h.name: [] for h in hops}
    per_event: dict[str, list[float]] = {h.name: [] for h in hops}
    for hop in hops:
        await hop.open(port)
        await requests_round(hop, small, 20)  # warm-up: connections open, code paths hot
    try:
        for index in range(rounds):
            order = hops[index % len(hops):] + hops[: index % len(hops)]
            for hop in order:
                cpu, latencies = await requests_round(hop, small, requests)
                per_request[hop.name].append(cpu)
                latency[hop.name].append(percentile(latencies, 50))
            for hop in order:
                cpu, _ = await streams_round(hop, stream, clients)
                per_event[hop.name].append(cpu)
    finally:
        for hop in hops:
            await hop.close()
    return {
        hop.name: {
            "cpu_us_per_request": 1e6 * median(per_request[hop.name]),
            "p50_ms": 1e3 * median(latency[hop.name]),
            "cpu_us_per_event": 1e6 * median(per_event[hop.name]),
        }
        for hop in hops
    }


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| client | CPU per small request | small request p50 | CPU per streamed event |", "|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['cpu_us_per_request']:.0f} us | {row['p50_ms']:.2f} ms "
                     f"| {row['cpu_us_per_event']:.1f} us |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m bench.hop", description=__doc__.split("\n\n")[0])
    cli.add_argument("--rounds", type=int, default=5)
    cli.add_argument("--requests", type=int, default=500, help="sequential small requests per client per round")
    cli.add_argument("--clients", type=int, default=16, help="concurrent streams per client per round")
    cli.add_argument("--tokens", type=int, default=256)
    args = cli.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="llmd-hop-"))
    try:
        model = TINY.ensure(default_models_dir())
        argv_engine = [str(find_llama_server()), "--model", str(model), "--host", LOCALHOST, "--port", "0",
                       "--parallel", str(args.clients), "--ctx-size", str(args.clients * (args.tokens + 64)),
                       *engine_args(args.clients)]
        engine = DirectEngine(argv_engine, root / "engine.log")
        engine.start()
        try:
            results = uvloop.run(compare(engine.port, args.rounds, args.requests, args.clients, args.tokens))
        finally:
            engine.stop()
    except BenchError as exc:
        print(f"bench.hop: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.rounds} rounds; medians over rounds; {args.requests} sequential requests and "
          f"{args.clients} x {args.tokens}-token streams per client per round\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
