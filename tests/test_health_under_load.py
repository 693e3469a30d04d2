"""Health checks on a saturated machine, through a real daemon with real llama-servers: a busy
engine answers its probes late but is never killed as hung, and a stopped one still is."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import wait_until

pytestmark = pytest.mark.engine

MODELS = ["a", "b", "c"]
# One simulated card that holds one of the models at a time: every switch is a swap.
CARD_MIB = 2000
MODEL_MIB = 1200
CLIENTS = 16
SOAK_SECONDS = 45.0
# The daemon's log lines that mean an engine was killed or lost, not swapped out by plan.
UNPLANNED = ("is hung", "killing it", "exited unexpectedly", "restarting ", "died while parked")


@pytest.fixture
def saturated_cpu() -> Iterator[None]:
    """One busy-loop process per core, for the length of the test."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait(timeout=30)


def _one_card_daemon(make_daemon, tmp_path: Path, tiny_gguf: Path):  # type: ignore[no-untyped-def]
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [{"name": "Sim", "total_mib": CARD_MIB, "free_mib": CARD_MIB}]}))
    profiles = {}
    for name in MODELS:
        model = tmp_path / f"{name}.gguf"
        model.write_bytes(tiny_gguf.read_bytes())
        profiles[name] = (f'engine = "llama-cpp"\n[model]\npath = "{model}"\n[launch]\nctx = 512\n'
                          f'[placement]\nvram_mib = {MODEL_MIB}\n[policy]\nttl = "30m"\n')
    daemon = make_daemon(profiles, extra_config=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n', start=False)
    config = daemon.root / "llmd.toml"
    # Requests wait their turn behind swaps; on a saturated machine that may take a while.
    config.write_text(config.read_text().replace("stop_grace = 5", "stop_grace = 5\nqueue_timeout = 300"))
    daemon.start()
    return daemon


def _client(daemon, index: int, deadline: float, outcomes: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Requests back to back until `deadline`, each to the next model, streamed every other time."""
    with httpx.Client(base_url=daemon.url, timeout=300) as http:
        turn = index
        while time.monotonic() < deadline:
            model = MODELS[turn % len(MODELS)]
            stream = turn % 2 == 0
            turn += 1
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                    "ignore_eos": True, "stream": stream}
            try:
                with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    text = response.read().decode(errors="replace")
                ended = not stream or "data: [DONE]" in text
                outcomes.append(str(response.status_code) if ended else f"{response.status_code} cut short: {text[-300:]}")
            except httpx.HTTPError as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")


def _starts_and_stops(log: str) -> tuple[Counter[str], Counter[str]]:
    starts = Counter(re.findall(r"starting (\w+): pid \d+", log))
    stops = Counter(re.findall(r"stopping (\w+) \(", log))
    return starts, stops


def test_a_soak_on_a_saturated_machine_kills_no_engine(make_daemon, tiny_gguf: Path, tmp_path: Path,
                                                       saturated_cpu: None) -> None:
    daemon = _one_card_daemon(make_daemon, tmp_path, tiny_gguf)
    outcomes: list[str] = []
    deadline = time.monotonic() + SOAK_SECONDS
    clients = [threading.Thread(target=_client, args=(daemon, i, deadline, outcomes)) for i in range(CLIENTS)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=SOAK_SECONDS + 330)
    assert not any(client.is_alive() for client in clients), "a client is still waiting for its reply"

    counts = Counter(outcomes)
    print(f"soak: {len(outcomes)} requests, {dict(counts)}")
    log = daemon.log()
    assert counts["200"] > 0 and set(counts) == {"200"}, f"outcomes: {counts}\n{log[-4000:]}"
    assert not [line for line in log.splitlines() if any(word in line for word in UNPLANNED)], log[-4000:]
    # Every engine that went away was stopped by plan (a swap): one stop per start but the last.
    starts, stops = _starts_and_stops(log)
    running = {row["model"] for row in daemon.ps() if row["state"] == "ready"}
    assert sum(starts.values()) > len(MODELS), f"the models did not swap: {starts}"
    for name in MODELS:
        assert stops[name] == starts[name] - (name in running), (name, starts, stops, running)


def test_a_stopped_engine_is_found_hung_on_a_saturated_machine(make_daemon, tiny_gguf: Path, tmp_path: Path,
                                                                 saturated_cpu: None) -> None:
    daemon = _one_card_daemon(make_daemon, tmp_path, tiny_gguf)
    daemon.llmctl("load", "a")
    pid = next(row["pid"] for row in daemon.ps() if row["model"] == "a")
    os.kill(pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        wait_until(lambda: f"a (pid {pid}) is hung: it is stopped" in daemon.log(), timeout=20, what="hang detection")
        assert time.monotonic() - began < 10
        wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                   timeout=10, what="the hung engine to be killed")
        # It failed and is started again on its own, as after a crash.
        wait_until(lambda: daemon.state("a") in ("failed", "starting", "ready"), timeout=10, what="a restart")
        assert "restarting a in" in daemon.log()
        wait_until(lambda: any(row["model"] == "a" and row["state"] == "ready" and row["pid"] != pid for row in daemon.ps()),
                   timeout=60, what="the restarted engine to be ready")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # if it is still there, it must be able to act on the SIGKILL of the teardown
        except ProcessLookupError:
            pass
