"""Runs the measurements in order, against one set of processes, and assembles the report.

Order matters on a small machine: the in-process placement benchmark runs first, while nothing
else does; then one daemon (with nginx in front of its engines, and for the tiny model also a bare
byte relay, the floor for a proxy in Python) serves the overhead, streaming, footprint and
cold-start measurements; the swap measurement gets a daemon of its own, because
it needs a simulated one-card inventory, and so does the swap-back measurement, whose profiles
keep (or not) their prompt cache across a reload.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from . import coldstart, footprint, overhead, placement, streaming, swap, swapback
from .byte_relay import ByteRelay
from .harness import (
    NGINX_MISSING,
    Daemon,
    ModelShape,
    Nginx,
    Profile,
    Target,
    default_models_dir,
    find_llama_server,
    find_nginx,
)
from .report import Section, machine, markdown_table, text_table, write_json
from .stats import Figure
from .streaming import ChunkCpu

Log = Callable[[str], None]

MEASUREMENTS = ("placement", "overhead", "streaming", "footprint", "coldstart", "swap", "swapback")

# The default shape: thousands of tokens per second, so the proxy's per-chunk cost shows.
TINY = ModelShape("tiny", "overhead, streaming at thousands of tok/s, footprint")
# About 60 tok/s on one thread: the proxy's share of the time per token is small here.
LARGE = ModelShape("large", "streaming at tens of tok/s", n_layers=8, n_embd=768, n_ff=2048, n_head=12)
# About 820 MB: read into memory (not mapped) on load, which takes most of a second.
COLD = ModelShape("cold", "cold start (~1 s to load)", n_layers=16, n_embd=1024, n_ff=2816, n_head=16)
# Seconds to process a 3,000-token prompt on one thread: a saved prompt cache shows.
KV = ModelShape("kv", "swap-back (a 3,000-token prompt takes seconds)", n_layers=8, n_embd=512, n_ff=1024, n_head=8,
                ctx=4096)

# One generation thread per engine: on a small shared machine, llama.cpp's spinning worker
# threads would otherwise fight the proxies and the client for the same cores, and the runs
# would measure that fight instead of the proxies.
ENGINE_THREADS = ("-t", "1")
# Loading with read() rather than mmap, so that a cached model still takes time to load.
READ_ON_LOAD = ("--load-mode", "none")


@dataclass(frozen=True)
class Settings:
    smoke: bool
    tiny: ModelShape = TINY
    large: ModelShape = LARGE
    cold: ModelShape = COLD
    swap: ModelShape = LARGE
    swapback: ModelShape = KV
    overhead_iterations: int = 3000
    overhead_warmup: int = 20
    stream_tokens: int = 256
    # (clients, rounds): more rounds where a batch is short, so every level gets its spread. The
    # large model's speed drifts from batch to batch by more than a proxy costs: 8 rounds at one
    # client keep one slow batch from deciding the median, and 3 at 16 clients make it a median
    # at all (of 2 it is the mean).
    tiny_levels: tuple[tuple[int, int], ...] = ((1, 60), (16, 10), (64, 3))
    large_levels: tuple[tuple[int, int], ...] = ((1, 8), (16, 3))
    cold_reps: int = 10
    swap_reps: int = 12
    swapback_reps: int = 3
    # The conversation's length, in tokens, and the context each profile gets for it.
    swapback_tokens: int = 3000
    swapback_ctx: int = 4096
    idle_seconds: float = 10.0
    placement_rounds: int = 20
    grid_gpus: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    grid_profiles: tuple[int, ...] = (50, 200, 800)
    grid_rounds: int = 3


FULL = Settings(smoke=False)
# A few seconds of everything, the same figures: checks the suite works, says nothing about speed.
SMOKE = Settings(
    smoke=True,
    large=TINY,
    cold=TINY,
    swap=TINY,
    swapback=TINY,
    overhead_iterations=40,
    overhead_warmup=3,
    stream_tokens=32,
    tiny_levels=((1, 2), (4, 2)),
    large_levels=((1, 1),),
    cold_reps=2,
    swap_reps=2,
    swapback_reps=1,
    swapback_tokens=400,
    swapback_ctx=1024,
    idle_seconds=1.0,
    placement_rounds=2,
    grid_gpus=(1, 8),
    grid_profiles=(20, 200),
    grid_rounds=1,
)


@dataclass
class Run:
    settings: Settings
    only: Sequence[str] = MEASUREMENTS
    llama_server: Path | None = None
    models_dir: Path | None = None
    keep: bool = False
    log: Log = field(default=lambda message: print(message, file=sys.stderr, flush=True))


def nginx_version(binary: Path) -> str | None:
    try:
        result = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return (result.stderr or result.stdout).strip().removeprefix("nginx version: ") or None


def run(spec: Run) -> dict:
    """Run the measurements `spec.only` names; return the report as a JSON-ready document."""
    settings = spec.settings
    began, started_at = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    log = spec.log
    sections: list[Section] = []
    notes: list[str] = []
    nginx_bin = find_nginx()
    nginx = {"available": nginx_bin is not None, "path": str(nginx_bin) if nginx_bin else None,
             "version": nginx_version(nginx_bin) if nginx_bin else None}
    if nginx_bin is None:
        log(f"WARNING: {NGINX_MISSING}")
        notes.append(NGINX_MISSING)
    else:
        log(f"nginx {nginx['version']} at {nginx_bin}: measured as the reference proxy")
    if settings.smoke:
        notes.append("smoke run: a few seconds of each measurement, to check that the suite works; "
                     "its figures say nothing about speed")

    needs_engines = [name for name in spec.only if name != "placement"]
    llama_server = find_llama_server(spec.llama_server) if needs_engines else None
    root = Path(tempfile.mkdtemp(prefix="llmd-bench-"))
    models: dict[str, dict] = {}
    try:
        if "placement" in spec.only:
            log("placement: timing scheduler.plan")
            sections.append(_timed(lambda: placement.measure(
                settings.placement_rounds, settings.grid_gpus, settings.grid_profiles, settings.grid_rounds)))
        if needs_engines:
            assert llama_server is not None
            models_dir = root / "models" if settings.smoke else (spec.models_dir or default_models_dir())
            paths = _models(settings, needs_engines, models_dir, models, log)
            sections += _with_engines(settings, spec.only, llama_server, nginx_bin, paths, root, log)
    finally:
        if spec.keep:
            log(f"kept the run's files in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    figures = {f.key: f.as_dict() for s in sections for f in s.figures}
    judged = [f for f in figures.values() if f["goal"]]
    return {
        "mode": "smoke" if settings.smoke else "full",
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - began, 1),
        "machine": machine(),
        "nginx": nginx,
        "llama_server": str(llama_server) if llama_server else None,
        "models": models,
        "notes": notes,
        "goals": {
            "met": sum(1 for f in judged if f["met"] is True),
            "missed": sum(1 for f in judged if f["met"] is False),
            "not_judged": sum(1 for f in judged if f["met"] is None),
        },
        "sections": [s.as_dict() for s in sections],
        "figures": figures,
    }


def _models(settings: Settings, wanted: Sequence[str], directory: Path, info: dict, log: Log) -> dict[str, Path]:
    """The model file for each role the wanted measurements need, written if missing; `info`
    gets each one's description for the report."""
    shapes = {"tiny": settings.tiny}
    if "streaming" in wanted or "footprint" in wanted:
        shapes["large"] = settings.large
    if "coldstart" in wanted:
        shapes["cold"] = settings.cold
    if "swap" in wanted:
        shapes["swap"] = settings.swap
    if "swapback" in wanted:
        shapes["swapback"] = settings.swapback
    paths = {}
    for role, shape in shapes.items():
        path = directory / shape.file_name
        if not path.exists():
            log(f"writing the {role} model ({shape.purpose}) to {path}")
        paths[role] = shape.ensure(directory)
        info[role] = {"file": str(paths[role]), "size_mb": round(paths[role].stat().st_size / 1e6, 1),
                      "n_layers": shape.n_layers, "n_embd": shape.n_embd, "n_ff": shape.n_ff, "n_head": shape.n_head,
                      "purpose": shape.purpose}
    return paths


def _timed(measure: Callable[[], Section]) -> Section:
    """Run one measurement; its wall time goes into its details."""
    began = time.perf_counter()
    section = measure()
    section.details["seconds"] = round(time.perf_counter() - began, 1)
    return section


def engine_args(max_clients: int) -> tuple[str, ...]:
    """llama-server flags for an engine that serves up to `max_clients` streams at once."""
    # Every target keeps its own connections to the engine open (nginx's, the relay's and llmd's,
    # the client's), and llama-server serves each open connection with a thread of its own.
    return (*ENGINE_THREADS, "--threads-http", str(4 * max_clients + 8))


def _with_engines(settings: Settings, only: Sequence[str], llama_server: Path, nginx_bin: Path | None,
                  paths: dict[str, Path], root: Path, log: Log) -> list[Section]:
    sections: list[Section] = []
    if {"overhead", "streaming", "footprint", "coldstart"} & set(only):
        sections += _main_daemon(settings, only, llama_server, nginx_bin, paths, root, log)
    if "swap" in only:
        log(f"swap: {settings.swap_reps} repetitions")
        sections.append(_timed(lambda: _swap(settings, llama_server, paths["swap"], root)))
    if "swapback" in only:
        log(f"swap-back: {settings.swapback_reps} repetitions of a {settings.swapback_tokens}-token conversation")
        sections.append(_timed(lambda: _swapback(settings, llama_server, paths["swapback"], root)))
    return sections


def _main_daemon(settings: Settings, only: Sequence[str], llama_server: Path, nginx_bin: Path | None,
                 paths: dict[str, Path], root: Path, log: Log) -> list[Section]:
    """Overhead, streaming, footprint and cold start, on one daemon. The engine llmd starts for a
    model is also the one the direct and nginx targets talk to, so all three share one engine."""
    sections: list[Section] = []
    tiny_par = max(clients for clients, _ in settings.tiny_levels)
    large_par = max(clients for clients, _ in settings.large_levels)
    profiles = [
        Profile("tiny", paths["tiny"], parallel=tiny_par, extra_args=engine_args(tiny_par)),
        Profile("spare", paths["tiny"], extra_args=engine_args(1)),
    ]
    if "large" in paths:
        profiles.append(Profile("large", paths["large"], parallel=large_par, extra_args=engine_args(large_par)))
    if "cold" in paths:
        profiles.append(Profile("cold", paths["cold"], extra_args=(*engine_args(1), *READ_ON_LOAD)))
    chunk_cpu: dict[str, ChunkCpu] = {}
    with ExitStack() as stack:
        daemon = Daemon(root / "llmd", llama_server, profiles)
        log("starting llmd")
        daemon.start()
        stack.callback(daemon.stop)

        pids: dict[str, list[int]] = {"llmd": [daemon.pid]}

        def targets(model: str, *, with_relay: bool = False) -> list[Target]:
            port = daemon.load(model)["port"]
            found = [Target("direct", port)]
            if nginx_bin is not None:
                proxy = Nginx(nginx_bin, root / f"nginx-{model}", port)
                proxy.start()
                stack.callback(proxy.stop)
                found.append(Target("nginx", proxy.port))
                pids["nginx"] = proxy.pids()
            if with_relay:
                # The floor for a proxy on Python's event loop: where llmd's cost stops being its own.
                relay = ByteRelay(port)
                relay.start()
                stack.callback(relay.stop)
                found.append(Target("relay", relay.port))
                pids["relay"] = relay.pids()
            return found + [Target("llmd", daemon.port)]

        if "overhead" in only or "streaming" in only:
            tiny = targets("tiny", with_relay=True)
            if "overhead" in only:
                log(f"overhead: {settings.overhead_iterations} interleaved requests per target")
                sections.append(_timed(lambda: overhead.measure(
                    tiny, "tiny", settings.overhead_iterations, settings.overhead_warmup)))
            if "streaming" in only:
                log(f"streaming, tiny model: (clients, rounds) {settings.tiny_levels}")
                sections.append(_timed(lambda: streaming.measure(
                    tiny, "tiny", "tiny", settings.tiny_levels, settings.stream_tokens, cpu_of=dict(pids),
                    chunk_cpu=chunk_cpu, judged=False,
                )))
                large = targets("large")
                log(f"streaming, large model: (clients, rounds) {settings.large_levels}")
                sections.append(_timed(lambda: streaming.measure(
                    large, "large", "large", settings.large_levels, settings.stream_tokens,
                    ratio_floor=streaming.LARGE_RATIO_GOAL, report_engine_timed=True,
                )))
        if "footprint" in only:
            log(f"footprint: {settings.idle_seconds:g} s idle with 3 engines loaded")
            sections.append(_timed(lambda: footprint.measure(
                daemon, ["tiny", "large", "spare"], settings.idle_seconds, chunk_cpu)))
        if "coldstart" in only:
            log(f"cold start: {settings.cold_reps} repetitions")
            sections.append(_timed(lambda: coldstart.measure(daemon, "cold", settings.cold_reps, root)))
    return sections


def _swap(settings: Settings, llama_server: Path, model: Path, root: Path) -> Section:
    pair = ("swap-a", "swap-b")
    daemon = Daemon(
        root / "llmd-swap", llama_server,
        [Profile(name, model, extra_args=engine_args(1), vram_mib=swap.MODEL_VRAM_MIB) for name in pair],
        simulate_gpus=[swap.SIMULATED_CARD],
    )
    daemon.start()
    try:
        return swap.measure(daemon, pair, settings.swap_reps, root)
    finally:
        daemon.stop()


def _swapback(settings: Settings, llama_server: Path, model: Path, root: Path) -> Section:
    profiles = [
        Profile(name, model, ctx=settings.swapback_ctx, extra_args=engine_args(1), persist_kv=keep)
        for name, keep in (("swapback-plain", False), ("swapback-kept", True))
    ]
    daemon = Daemon(root / "llmd-swapback", llama_server, profiles)
    daemon.start()
    try:
        return swapback.measure(daemon, "swapback-plain", "swapback-kept", settings.swapback_tokens, settings.swapback_reps)
    finally:
        daemon.stop()


def summary(document: dict) -> str:
    """The table, plus what a reader needs to know beside it."""
    sections = [_section_from(s) for s in document["sections"]]
    lines = [text_table(sections), ""]
    goals = document["goals"]
    lines.append(f"goals: {goals['met']} met, {goals['missed']} missed, {goals['not_judged']} not judged")
    for note in document["notes"]:
        lines.append(f"note: {note}")
    for section in document["sections"]:
        for note in section["notes"]:
            lines.append(f"{section['name']}: {note}")
    for section in document["sections"]:
        if section["name"] == "placement":
            lines += ["", "placement: time to decide every profile once", placement.grid_table(section["details"]["grid"])]
    return "\n".join(lines)


def markdown(document: dict) -> str:
    sections = [_section_from(s) for s in document["sections"]]
    parts = [markdown_table(sections)]
    for section in document["sections"]:
        if section["name"] == "placement":
            parts += ["", placement.grid_table(section["details"]["grid"])]
    return "\n".join(parts) + "\n"


def _section_from(data: dict) -> Section:
    return Section(data["name"], data["title"], [Figure(**f) for f in data["figures"]], data["details"], data["notes"])


def write(document: dict, json_path: Path | None, markdown_path: Path | None) -> None:
    if json_path is not None:
        write_json(json_path, document)
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown(document))
