"""Proxy overhead on small requests: `max_tokens = 1`, one at a time, the targets interleaved.

Every iteration sends the same request to each target (the engine itself, nginx in front of it,
llmd in front of it) in a rotating order, each over its own keep-alive connection. What the
proxies add is the difference of their latency percentiles from the engine's own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .harness import LOCALHOST, BenchError, Target, rotations
from .httpclient import Connection, chat_body
from .report import Section
from .stats import Figure, median, over_blocks, percentile

Samples = dict[str, list[float]]

PATH = "/v1/chat/completions"
BLOCKS = 5
P50_GOAL_MS = 1.0
P99_SLACK_OVER_NGINX_MS = 2.0


def measure(targets: Sequence[Target], model: str, iterations: int, warmup: int) -> Section:
    section = Section("overhead", "Proxy overhead, non-streaming (max_tokens = 1, sequential)")
    body = chat_body(model, 1, stream=False)
    connections = {t.name: Connection(LOCALHOST, t.port) for t in targets}
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    try:
        for order in rotations(list(targets), warmup):
            for target in order:
                _send(connections[target.name], target, body)
        for order in rotations(list(targets), iterations):
            for target in order:
                samples[target.name].append(_send(connections[target.name], target, body) * 1000)
    finally:
        for connection in connections.values():
            connection.close()

    def added(name: str, q: float) -> Callable[[Samples], float]:
        return lambda s: percentile(s[name], q) - percentile(s["direct"], q)

    n = iterations
    for q in (50, 99):
        section.add(_figure(f"overhead.direct.p{q}_ms", f"engine alone: p{q} latency", samples,
                            lambda s, q=q: percentile(s["direct"], q), n))
    for name in ("nginx", "relay", "llmd"):
        if name not in samples:
            continue
        for q in (50, 99):
            figure = _figure(f"overhead.{name}.added_p{q}_ms", f"{name}: added p{q} latency", samples, added(name, q), n)
            if name == "llmd" and q == 50:
                figure.goal, figure.met = f"<= {P50_GOAL_MS:g} ms", figure.value <= P50_GOAL_MS
            section.add(figure)
    if "nginx" in samples:
        figure = _figure(
            "overhead.llmd.p99_over_nginx_ms", "llmd p99 minus nginx p99", samples,
            lambda s: percentile(s["llmd"], 99) - percentile(s["nginx"], 99), n,
        )
        figure.goal = f"<= {P99_SLACK_OVER_NGINX_MS:g} ms"
        figure.met = figure.value <= P99_SLACK_OVER_NGINX_MS
        section.add(figure)
    else:
        section.notes.append("llmd's p99 goal is relative to nginx's p99, which was not measured: nginx is missing")
    section.details = {
        "iterations": iterations,
        "pooled_percentiles_ms": {
            name: {f"p{q}": percentile(values, q) for q in (1, 10, 50, 90, 99)} | {"max": max(values)}
            for name, values in samples.items()
        },
    }
    section.notes.append(
        f"{iterations} iterations in {BLOCKS} consecutive blocks; each figure is its median over the blocks, "
        "the spread its range"
    )
    return section


def _send(connection: Connection, target: Target, body: bytes) -> float:
    status, elapsed, reply = connection.request(PATH, body)
    if status != 200:
        raise BenchError(f"{target.name} answered {status}: {reply[:300]!r}")
    return elapsed


def _figure(key: str, label: str, samples: Samples, compute: Callable[[Samples], float], n: int) -> Figure:
    values = over_blocks(samples, compute, BLOCKS)
    return Figure(key, label, median(values), "ms", min(values), max(values), samples=n)
