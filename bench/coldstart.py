"""Cold start: what llmd adds between a request for a model that is not running and its first token.

Each repetition does both, in alternating order:

- through llmd: the model is unloaded, then one streaming request is timed from sending it to
  its first event (llmd plans, spawns the engine, waits for it to be ready, forwards);
- directly: the same engine command line (taken from llmd's own `ps`) is spawned by the suite,
  /health is polled every millisecond until it answers 200, and the same request is sent; the
  time runs from the spawn to the first event.

The overhead is the difference, per repetition. The engine's own start-to-ready time is
reported beside it, to show how long the model takes to load.
"""

from __future__ import annotations

import time
from pathlib import Path

from .harness import LOCALHOST, Daemon, DirectEngine
from .httpclient import chat_body, first_event
from .report import Section
from .stats import Figure, median

PATH = "/v1/chat/completions"
GOAL_MS = 50.0


def measure(daemon: Daemon, model: str, reps: int, log_dir: Path) -> Section:
    section = Section("coldstart", "Cold-start overhead")
    body = chat_body(model, 1, stream=True)
    argv = daemon.load(model)["argv"]  # also puts the model file in the page cache for both sides
    daemon.unload(model)
    direct = DirectEngine(argv, log_dir / f"direct-{model}.log")
    through_llmd: list[float] = []
    engine_alone: list[float] = []
    ready: list[float] = []
    try:
        for rep in range(reps):
            for side in (("llmd", "direct") if rep % 2 == 0 else ("direct", "llmd")):
                if side == "llmd":
                    started = time.perf_counter()
                    through_llmd.append(first_event(LOCALHOST, daemon.port, PATH, body, started))
                    daemon.unload(model)
                else:
                    started = time.perf_counter()
                    ready.append(direct.start())
                    engine_alone.append(first_event(LOCALHOST, direct.port, PATH, body, started))
                    direct.stop()
    finally:
        direct.close()
    overhead = [(a - b) * 1000 for a, b in zip(through_llmd, engine_alone)]
    section.add(Figure("coldstart.engine.ready_ms", "engine alone: start to ready", median(ready) * 1000, "ms",
                       min(ready) * 1000, max(ready) * 1000, samples=reps))
    section.add(Figure("coldstart.engine.first_token_ms", "engine alone: start to first token",
                       median(engine_alone) * 1000, "ms", min(engine_alone) * 1000, max(engine_alone) * 1000, samples=reps))
    section.add(Figure("coldstart.llmd.first_token_ms", "llmd: request for a cold model to first token",
                       median(through_llmd) * 1000, "ms", min(through_llmd) * 1000, max(through_llmd) * 1000, samples=reps))
    section.add(Figure("coldstart.llmd.overhead_ms", "llmd: cold-start overhead", median(overhead), "ms",
                       min(overhead), max(overhead), goal=f"<= {GOAL_MS:g} ms", met=median(overhead) <= GOAL_MS,
                       samples=reps))
    section.details = {
        "reps": reps,
        "argv": argv,
        "through_llmd_ms": [x * 1000 for x in through_llmd],
        "engine_first_token_ms": [x * 1000 for x in engine_alone],
        "engine_ready_ms": [x * 1000 for x in ready],
        "overhead_ms": overhead,
    }
    section.notes.append(
        "overhead = (llmd: request to first token) - (engine alone: spawn to first token), paired per repetition; "
        "median over repetitions, spread their range"
    )
    return section
