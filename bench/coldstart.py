"""Cold start: what llmd adds between a request for a model that is not running and its first token.

Each repetition does both, in alternating order:

- through llmd: the model is unloaded, then one streaming request is timed from sending it to
  its first event (llmd plans, spawns the engine, waits for it to be ready, forwards).
  Meanwhile a thread of the suite watches that engine as it watches its own: when the kernel
  started its process, and when its /health first answered 200 (`_EngineWatch`);
- directly: the same engine command line (taken from llmd's own `ps`) is spawned by the suite,
  /health is polled every 2 ms until it answers 200, and the same request is sent; the time runs
  from the spawn to the first event.

How long the model takes to load moves by a second or more between repetitions on a shared
machine, so the overhead is not the difference of the two sides' totals, which that noise
would decide. It is, per llmd repetition, its request-to-first-token time less the load time
of the engine llmd started (spawn to ready, watched in that same repetition), less what the
engine alone takes from ready to first token (the median of the direct repetitions): the time
llmd spends before the spawn, noticing the engine is ready, and forwarding.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

from .harness import DIRECT_POLL_SECONDS, LOCALHOST, BenchError, Daemon, DirectEngine, started_at
from .httpclient import chat_body, first_event, get_status
from .report import Section
from .stats import Figure, median

PATH = "/v1/chat/completions"
GOAL_MS = 50.0
WATCH_SECONDS = 300.0  # as long as `DirectEngine` waits for its own engine


def _boot_clock() -> float:
    """Seconds since boot, on the clock `harness.started_at` reads a process's start from."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class _EngineWatch:
    """Watches, from a thread of its own, the engine a daemon starts: when its process started
    and when its /health first answered 200, polled as `DirectEngine` polls its own."""

    def __init__(self, daemon_pid: int) -> None:
        self._deadline = time.monotonic() + WATCH_SECONDS
        self._daemon = psutil.Process(daemon_pid)
        self._before = {child.pid for child in self._daemon.children(recursive=True)}
        self.spawned: float | None = None  # both on _boot_clock
        self.ready: float | None = None
        self.error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-watch", daemon=True)
        self._thread.start()

    def _watching(self) -> bool:
        return not self._done.is_set() and time.monotonic() < self._deadline

    def _engine(self) -> tuple[int, int]:
        """The new engine's pid and port, once it has exec'd llama-server."""
        while self._watching():
            for child in self._daemon.children(recursive=True):
                if child.pid in self._before or "llama-server" not in child.name():
                    continue
                # Its name changes before its command line during exec: until then, look again.
                argv = child.cmdline()
                if "--port" in argv:
                    return child.pid, int(argv[argv.index("--port") + 1])
            time.sleep(0.01)  # its start time comes from the kernel: finding it late costs nothing
        raise BenchError("the daemon started no llama-server for the cold model")

    def _watch(self) -> None:
        try:
            pid, port = self._engine()
            self.spawned = started_at(pid)
            while get_status(LOCALHOST, port, "/health") != 200:
                if not self._watching():
                    return
                time.sleep(DIRECT_POLL_SECONDS)
            self.ready = _boot_clock()
        except (BenchError, psutil.Error, OSError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def load_seconds(self) -> float:
        """The engine's own start-to-ready time, once stopped; BenchError if it was not seen."""
        if self.spawned is None or self.ready is None:
            raise BenchError(f"could not watch the engine llmd started: {self.error or 'it was not seen ready'}")
        return self.ready - self.spawned


def measure(daemon: Daemon, model: str, reps: int, log_dir: Path) -> Section:
    section = Section("coldstart", "Cold-start overhead")
    body = chat_body(model, 1, stream=True)
    argv = daemon.load(model)["argv"]  # also puts the model file in the page cache for both sides
    daemon.unload(model)
    direct = DirectEngine(argv, log_dir / f"direct-{model}.log")
    through_llmd: list[float] = []
    llmd_engine_load: list[float] = []  # the load of the engine llmd started, in each llmd repetition
    engine_alone: list[float] = []
    ready: list[float] = []
    try:
        for rep in range(reps):
            for side in (("llmd", "direct") if rep % 2 == 0 else ("direct", "llmd")):
                if side == "llmd":
                    watch = _EngineWatch(daemon.pid)
                    try:
                        started = time.perf_counter()
                        through_llmd.append(first_event(LOCALHOST, daemon.port, PATH, body, started))
                    finally:
                        watch.stop()
                    llmd_engine_load.append(watch.load_seconds())
                    daemon.unload(model)
                else:
                    started = time.perf_counter()
                    ready.append(direct.start())
                    engine_alone.append(first_event(LOCALHOST, direct.port, PATH, body, started))
                    direct.stop()
    finally:
        direct.close()
    ready_to_first_token = median([a - b for a, b in zip(engine_alone, ready)])
    overhead = [(total - load - ready_to_first_token) * 1000 for total, load in zip(through_llmd, llmd_engine_load)]
    section.add(Figure("coldstart.engine.ready_ms", "engine alone: start to ready", median(ready) * 1000, "ms",
                       min(ready) * 1000, max(ready) * 1000, samples=reps))
    section.add(Figure("coldstart.engine.first_token_ms", "engine alone: start to first token",
                       median(engine_alone) * 1000, "ms", min(engine_alone) * 1000, max(engine_alone) * 1000, samples=reps))
    section.add(Figure("coldstart.llmd_engine.ready_ms", "the engine llmd started: start to ready",
                       median(llmd_engine_load) * 1000, "ms", min(llmd_engine_load) * 1000, max(llmd_engine_load) * 1000,
                       samples=reps))
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
        "llmd_engine_ready_ms": [x * 1000 for x in llmd_engine_load],
        "engine_ready_to_first_token_ms": ready_to_first_token * 1000,
        "overhead_ms": overhead,
    }
    section.notes.append(
        "overhead = (llmd: request to first token) - (the engine llmd started: spawn to ready, watched in the "
        "same repetition) - (engine alone: ready to first token, median); median over repetitions, spread their range"
    )
    return section
