"""Footprint: the daemon's own memory and CPU (its engines not counted).

Idle: with three engines loaded and no requests, the daemon's CPU time over a window (health
probes, the idle reaper and its timers are all it does then), and its resident memory after
the streaming runs. Per chunk: the CPU time the daemon spent while it relayed the streaming
benchmark's events, per 1,000 events.
"""

from __future__ import annotations

import time

from .harness import Daemon, cpu_seconds
from .report import Section
from .stats import Figure
from .streaming import ChunkCpu

RSS_GOAL_MB = 80.0
IDLE_CPU_GOAL_PCT = 0.5
IDLE_WINDOWS = 5
SETTLE_SECONDS = 1.0
# Whose CPU per relayed chunk is reported, and how the report names them.
PROXIES = (
    ("llmd", "daemon"),
    ("nginx", "nginx (its worker and master)"),
    ("relay", "bare byte relay (Python on uvloop, the floor)"),
)


def measure(daemon: Daemon, models: list[str], idle_seconds: float, chunk_cpu: dict[str, ChunkCpu]) -> Section:
    """`chunk_cpu`: what the streaming measurement counted, by proxy (empty if it did not run)."""
    section = Section("footprint", "Daemon footprint")
    for model in models:
        daemon.load(model)
    ready = [row["model"] for row in daemon.ps() if row["state"] == "ready"]
    process = daemon.process()
    time.sleep(SETTLE_SECONDS)
    window = idle_seconds / IDLE_WINDOWS
    percents = []
    total_cpu, total_wall = 0.0, 0.0
    for _ in range(IDLE_WINDOWS):
        cpu0, wall0 = cpu_seconds(daemon.pid), time.perf_counter()
        time.sleep(window)
        cpu, wall = cpu_seconds(daemon.pid) - cpu0, time.perf_counter() - wall0
        percents.append(100 * cpu / wall)
        total_cpu += cpu
        total_wall += wall
    memory = process.memory_full_info()
    rss_mb = memory.rss / 1e6
    idle_pct = 100 * total_cpu / total_wall
    section.add(Figure("footprint.rss_mb", f"daemon RSS, {len(ready)} engines loaded", rss_mb, "MB",
                       goal=f"<= {RSS_GOAL_MB:g} MB", met=rss_mb <= RSS_GOAL_MB))
    section.add(Figure("footprint.idle_cpu_pct", f"daemon CPU while idle, {len(ready)} engines loaded", idle_pct,
                       "% of a core", min(percents), max(percents), goal=f"< {IDLE_CPU_GOAL_PCT:g}%",
                       met=idle_pct < IDLE_CPU_GOAL_PCT, samples=IDLE_WINDOWS))
    for name, who in PROXIES:
        counted = chunk_cpu.get(name)
        if counted is None or not counted.events:
            continue
        value, low, high = counted.ms_per_1000()
        section.add(Figure(f"footprint.{name}.cpu_ms_per_1000_chunks", f"{who} CPU per 1,000 proxied stream chunks",
                           value, "ms", low, high, samples=counted.events))
    section.details = {
        "engines_ready": ready,
        "idle_seconds": total_wall,
        "idle_cpu_pct_per_window": percents,
        "rss_mb": rss_mb,
        "uss_mb": memory.uss / 1e6,
        "chunk_cpu": {
            name: {"cpu_seconds": c.cpu_seconds, "chunks": c.events, "user_seconds": c.user_seconds,
                   "system_seconds": c.system_seconds}
            for name, c in chunk_cpu.items()
        },
    }
    section.notes.append(
        f"idle CPU over {total_wall:.0f} s in {IDLE_WINDOWS} windows (spread: their range); CPU per chunk over "
        "every streaming batch of the tiny model through that proxy (spread: range over batches)"
    )
    split = [
        f"{name} {1e6 * c.user_seconds / c.events:.1f} / {1e6 * c.system_seconds / c.events:.1f}"
        for name, _ in PROXIES if (c := chunk_cpu.get(name)) is not None and c.events
    ]
    if split:
        section.notes.append(
            "CPU per 1,000 stream chunks in user space / in the kernel, ms (clock ticks, sampled): " + ", ".join(split)
        )
    return section
