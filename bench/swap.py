"""Swap: one model out, another in, on a simulated card with room for only one of them.

The daemon sees one 2000 MiB card and two profiles that each claim 1500 MiB, so a request for
the one that is not loaded makes llmd evict the other first. Each repetition does both, in
alternating order:

- through llmd: one streaming request for the model that is not loaded, timed from sending it
  to its first event (plan, stop the other engine, start this one, wait, forward);
- directly: the suite stops the other engine (SIGTERM, wait for exit), spawns this one with the
  command line llmd used, polls /health every millisecond, and sends the same request.

The overhead is the difference, per repetition.
"""

from __future__ import annotations

import time
from pathlib import Path

from .harness import LOCALHOST, BenchError, Daemon, DirectEngine
from .httpclient import chat_body, first_event
from .report import Section
from .stats import Figure, median

PATH = "/v1/chat/completions"
GOAL_MS = 100.0
SIMULATED_CARD = {"name": "Sim", "total_mib": 2000, "free_mib": 2000}
MODEL_VRAM_MIB = 1500


def measure(daemon: Daemon, names: tuple[str, str], reps: int, log_dir: Path) -> Section:
    section = Section("swap", "Swap: evict one model and load another")
    a, b = names
    argv = {a: daemon.load(a)["argv"]}
    argv[b] = daemon.load(b)["argv"]  # evicts a
    row = daemon.row(a)
    if row is None or row["state"] != "stopped":
        raise BenchError(f"loading {b} did not evict {a}: the simulated card should have room for one")
    direct = {name: DirectEngine(argv[name], log_dir / f"direct-{name}.log") for name in names}
    loaded_llmd, loaded_direct = b, a
    direct[loaded_direct].start()
    through_llmd: list[float] = []
    engine_alone: list[float] = []
    try:
        for rep in range(reps):
            for side in (("llmd", "direct") if rep % 2 == 0 else ("direct", "llmd")):
                if side == "llmd":
                    wanted = a if loaded_llmd == b else b
                    body = chat_body(wanted, 1, stream=True)
                    started = time.perf_counter()
                    through_llmd.append(first_event(LOCALHOST, daemon.port, PATH, body, started))
                    loaded_llmd = wanted
                else:
                    wanted = a if loaded_direct == b else b
                    body = chat_body(wanted, 1, stream=True)
                    started = time.perf_counter()
                    direct[loaded_direct].stop()
                    direct[wanted].start()
                    engine_alone.append(first_event(LOCALHOST, direct[wanted].port, PATH, body, started))
                    loaded_direct = wanted
    finally:
        for engine in direct.values():
            engine.close()
    overhead = [(x - y) * 1000 for x, y in zip(through_llmd, engine_alone)]
    section.add(Figure("swap.engine.ms", "engines alone: stop one, start the other, first token",
                       median(engine_alone) * 1000, "ms", min(engine_alone) * 1000, max(engine_alone) * 1000, samples=reps))
    section.add(Figure("swap.llmd.ms", "llmd: request needing a swap to first token", median(through_llmd) * 1000, "ms",
                       min(through_llmd) * 1000, max(through_llmd) * 1000, samples=reps))
    section.add(Figure("swap.llmd.overhead_ms", "llmd: swap overhead", median(overhead), "ms", min(overhead),
                       max(overhead), goal=f"<= {GOAL_MS:g} ms", met=median(overhead) <= GOAL_MS, samples=reps))
    section.details = {
        "reps": reps,
        "through_llmd_ms": [x * 1000 for x in through_llmd],
        "engines_alone_ms": [x * 1000 for x in engine_alone],
        "overhead_ms": overhead,
    }
    section.notes.append(
        "overhead = (llmd: request to first token, evicting the other model) - (engines alone: stop, start, "
        "first token), paired per repetition; median over repetitions, spread their range"
    )
    return section
