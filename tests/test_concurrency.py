"""Per-model concurrency caps, queues and swap grouping: the admission core on its own, and
through a real daemon with real llama-server engines."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest

from conftest import wait_until
from llmd.daemon.errors import QueueFullError
from llmd.daemon.http.error_status import status_of
from llmd.daemon.manager.admission import MAX_RETRY_AFTER, Gate
from llmd.daemon.models.tinymodel import write_tiny_gguf

# ----- the admission core -----


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_slots_then_queue_then_refusal() -> None:
    gate = Gate("m", limit=2, max_queue=1)
    first, second = gate.enter(), gate.enter()
    assert first.granted and second.granted and gate.active == 2
    third = gate.enter()
    assert not third.granted and gate.queued == 1
    with pytest.raises(QueueFullError) as refused:
        gate.enter()
    assert refused.value.retry_after >= 1
    assert "max_concurrency = 2" in str(refused.value) and "max_queue = 1" in str(refused.value)
    meaning = status_of(refused.value)
    assert (meaning.status, meaning.code) == (429, "queue_full")
    assert meaning.headers == {"Retry-After": str(refused.value.retry_after)}
    # A refused request leaves nothing behind.
    assert gate.active == 2 and gate.queued == 1


def test_no_queue_cap_by_default_and_zero_refuses_at_once() -> None:
    unbounded = Gate("m", limit=1)
    unbounded.enter()
    for _ in range(100):
        unbounded.enter()
    assert unbounded.queued == 100
    strict = Gate("m", limit=1, max_queue=0)
    strict.enter()
    with pytest.raises(QueueFullError):
        strict.enter()


def test_a_freed_slot_goes_to_the_head_of_the_queue_in_the_same_call() -> None:
    gate = Gate("m", limit=1)
    gate.enter()
    waiting = [gate.enter() for _ in range(3)]
    gate.leave()
    # No moment without a slot taken: the model never looks idle while requests wait.
    assert gate.active == 1 and not gate.idle
    assert [t.granted for t in waiting] == [True, False, False]
    assert waiting[0].event.is_set()
    gate.leave()
    gate.leave()
    assert [t.granted for t in waiting] == [True, True, True]
    gate.leave()
    assert gate.idle and gate.queued == 0


def test_a_new_request_does_not_jump_the_queue() -> None:
    gate = Gate("m", limit=1)
    gate.enter()
    queued = gate.enter()
    gate.configure(1, None)
    late = gate.enter()
    assert not late.granted
    gate.leave()
    assert queued.granted and not late.granted


def test_withdraw_leaves_the_queue_or_gives_back_the_slot_once() -> None:
    gate = Gate("m", limit=1)
    held = gate.enter()
    queued = gate.enter()
    behind = gate.enter()
    gate.withdraw(queued)
    assert gate.queued == 1
    gate.withdraw(held)  # granted, then given up before reaching the engine
    assert behind.granted and gate.active == 1
    gate.withdraw(held)
    gate.withdraw(queued)
    assert gate.active == 1 and gate.queued == 0


def test_a_higher_limit_admits_waiting_requests() -> None:
    gate = Gate("m", limit=1)
    gate.enter()
    waiting = [gate.enter() for _ in range(3)]
    gate.configure(3, None)
    assert [t.granted for t in waiting] == [True, True, False]


def test_wait_times_out_and_leaves_the_queue() -> None:
    async def main() -> None:
        gate = Gate("m", limit=1)
        gate.enter()
        ticket = gate.enter()
        assert not await gate.wait(ticket, 0.05)
        assert gate.queued == 0
        gate.leave()
        assert gate.idle  # nothing was handed to the request that gave up

    anyio.run(main)


def test_waiters_are_served_in_the_order_they_were_admitted() -> None:
    async def main() -> None:
        gate = Gate("m", limit=1)
        order: list[int] = []

        async def request(i: int) -> None:
            ticket = gate.enter()
            assert await gate.wait(ticket, 5)
            order.append(i)
            await anyio.sleep(0.01)
            gate.leave()

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(request, i)
                await anyio.sleep(0)  # each enters before the next starts
        assert order == list(range(6))
        assert gate.idle

    anyio.run(main)


def test_a_cancelled_waiter_gives_its_slot_to_the_next() -> None:
    async def main() -> None:
        gate = Gate("m", limit=1)
        gate.enter()
        first, second = gate.enter(), gate.enter()
        with anyio.move_on_after(0.01):
            try:
                await gate.wait(first, 5)
            except BaseException:
                gate.withdraw(first)
                raise
        gate.leave()
        assert second.granted and not first.granted and gate.active == 1

    anyio.run(main)


def test_a_hold_serves_those_already_queued_and_queues_new_ones() -> None:
    gate = Gate("b", limit=1)
    gate.enter()
    before = gate.enter()
    gate.hold("a")
    gate.hold("a")  # holding again keeps the first cut-off
    after = gate.enter()
    gate.leave()
    assert before.granted  # queued before the hold: still goes first
    gate.leave()
    assert not after.granted and gate.idle  # drained: now it can be evicted
    gate.unhold("a")
    assert after.granted


def test_a_held_gate_queues_even_with_slots_free_and_each_holder_counts() -> None:
    gate = Gate("b", limit=4, max_queue=1)
    gate.hold("a")
    gate.hold("c")
    queued = gate.enter()
    assert not queued.granted and gate.idle
    with pytest.raises(QueueFullError) as refused:
        gate.enter()
    assert "making room for another model" in str(refused.value)
    gate.unhold("a")
    assert not queued.granted
    gate.unhold("c")
    gate.unhold("c")
    assert queued.granted


def test_retry_after_follows_how_long_requests_hold_a_slot() -> None:
    clock = Clock()
    gate = Gate("m", limit=1, max_queue=2, clock=clock)
    assert gate.retry_after() == 1  # nothing measured yet
    gate.enter()
    clock.now += 4
    gate.leave()  # one request held its slot 4 s
    assert gate.mean_hold_seconds() == pytest.approx(4)
    gate.enter()
    gate.enter()
    gate.enter()
    with pytest.raises(QueueFullError) as refused:
        gate.enter()
    assert refused.value.retry_after == 12  # two ahead in the queue plus the one running, 4 s each
    gate.configure(1000, 2)
    gate.configure(1, 1000)
    clock.now += 10_000
    assert gate.retry_after() <= MAX_RETRY_AFTER


# ----- through a real daemon -----

CARD_MIB = 2000


def _wide_model(tmp_path: Path, name: str = "wide") -> Path:
    # Wide enough to generate at hundreds (not thousands) of tokens/s on a CPU, so a long
    # stream keeps its engine busy for seconds.
    return write_tiny_gguf(tmp_path / f"{name}.gguf", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8)


def _profile(model: Path, policy: str = "", vram: int | None = None, ctx: int = 4096) -> str:
    lines = ['engine = "llama-cpp"', "[model]", f'path = "{model}"', "[launch]", f"ctx = {ctx}",
             'extra_args = ["--threads", "1"]']
    if vram is not None:
        lines += ["[placement]", f"vram_mib = {vram}"]
    lines += ["[policy]", policy]
    return "\n".join(lines) + "\n"


def _with_server_settings(daemon, settings: str) -> None:  # type: ignore[no-untyped-def]
    path = daemon.root / "llmd.toml"
    path.write_text(path.read_text().replace("stop_grace = 5", f"stop_grace = 5\n{settings}"))


class Stream(threading.Thread):
    """One streamed chat request, recording its status, headers and when things arrived."""

    def __init__(self, daemon, model: str, max_tokens: int, start: threading.Barrier | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.url = daemon.url + "/v1/chat/completions"
        self.body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens,
                     "stream": True, "ignore_eos": True}
        self.start_barrier = start
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self.content_type = ""
        self.raw = b""
        self.answered: float | None = None
        self.first_chunk: float | None = None
        self.done: float | None = None
        self.chunks = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.start_barrier is not None:
                self.start_barrier.wait(30)
            with httpx.stream("POST", self.url, json=self.body, timeout=180) as response:
                self.answered = time.monotonic()
                self.status, self.headers = response.status_code, response.headers
                self.content_type = response.headers.get("content-type", "")
                if response.status_code != 200:
                    self.raw = response.read()
                    return
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        self.chunks += 1
                        if self.first_chunk is None:
                            self.first_chunk = time.monotonic()
                    elif line == "data: [DONE]":
                        self.done = time.monotonic()
        except BaseException as exc:  # reported by the test
            self.error = exc


def _metric(daemon, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    text = httpx.get(daemon.url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    return 0.0


@pytest.mark.engine
def test_a_model_capped_at_one_without_a_queue_refuses_the_rest_at_once(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon({"m": _profile(_wide_model(tmp_path), "max_concurrency = 1\nmax_queue = 0")})
    daemon.llmctl("load", "m")
    barrier = threading.Barrier(6)
    streams = [Stream(daemon, "m", 1500, barrier) for _ in range(6)]
    for stream in streams:
        stream.start()
    for stream in streams:
        stream.join(180)
    assert all(s.error is None for s in streams), [s.error for s in streams]
    assert sorted(s.status for s in streams) == [200] + [429] * 5
    served = next(s for s in streams if s.status == 200)
    assert served.done is not None and served.chunks > 100  # it ran to the end
    for refused in (s for s in streams if s.status == 429):
        # Refused before any byte of a stream, while the one admitted still streamed.
        assert refused.content_type.startswith("application/json")
        assert refused.answered is not None and refused.answered < served.done
        assert int(refused.headers["retry-after"]) >= 1
        error = json.loads(refused.raw)["error"]
        assert error["type"] == "rate_limit_exceeded" and error["code"] == "queue_full"
        assert "max_concurrency = 1" in error["message"]
    assert _metric(daemon, "llmd_queue_refusals_total", model="m", reason="full") == 5
    assert _metric(daemon, "llmd_requests_total", model="m", endpoint="/v1/chat/completions", code="429") == 5


@pytest.mark.engine
def test_a_queue_lets_every_request_complete_in_the_order_admitted(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon({"m": _profile(_wide_model(tmp_path), "max_concurrency = 1\nmax_queue = 5")})
    daemon.llmctl("load", "m")
    # The first streams long enough for the other five to be admitted one by one behind it.
    streams = [Stream(daemon, "m", 1500)] + [Stream(daemon, "m", 60) for _ in range(5)]
    streams[0].start()
    wait_until(lambda: streams[0].first_chunk is not None, timeout=60, what="the first stream to start")
    for i, stream in enumerate(streams[1:], start=1):
        stream.start()
        wait_until(lambda i=i: _metric(daemon, "llmd_queue_depth", model="m") == i, timeout=30,
                   what=f"{i} requests queued")
    assert streams[0].done is None  # all five were admitted while the first still ran
    assert [row["slots_busy"] for row in daemon.ps()] == [1]
    for stream in streams:
        stream.join(180)
    assert all(s.error is None for s in streams), [s.error for s in streams]
    assert [s.status for s in streams] == [200] * 6
    assert all(s.done is not None for s in streams)
    # One at a time, first admitted first served.
    firsts = [s.first_chunk for s in streams]
    assert firsts == sorted(firsts)
    dones = [s.done for s in streams]
    assert dones == sorted(dones)
    assert _metric(daemon, "llmd_queue_depth", model="m") == 0
    assert _metric(daemon, "llmd_queue_refusals_total", model="m", reason="full") == 0


def _one_card_daemon(make_daemon, tmp_path: Path, profiles: dict[str, str], queue_timeout: float,  # type: ignore[no-untyped-def]
                     engine: Path | None = None):
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [{"name": "Sim", "total_mib": CARD_MIB, "free_mib": CARD_MIB}]}))
    daemon = make_daemon(profiles, extra_config=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n', start=False)
    _with_server_settings(daemon, f"queue_timeout = {queue_timeout}")
    if engine is not None:
        path = daemon.root / "llmd.toml"
        text = path.read_text()
        path.write_text(text.replace(text.split('command = ["')[1].split('"')[0], str(engine)))
    daemon.start()
    return daemon


def _arrived(daemon) -> int:  # type: ignore[no-untyped-def]
    """Requests the daemon has received so far: waiting or being served (a slot, or a queue
    place), or answered."""
    waiting = sum(row["slots_busy"] + row["queued"] for row in daemon.ps())
    text = httpx.get(daemon.url + "/metrics", timeout=30).text
    answered = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("llmd_requests_total{"))
    return waiting + int(answered)


def _loads(daemon) -> dict[str, int]:  # type: ignore[no-untyped-def]
    found: dict[str, int] = {}
    for name in re.findall(r"starting (\w+): pid", daemon.log()):
        found[name] = found.get(name, 0) + 1
    return found


@pytest.mark.engine
def test_interleaved_requests_for_two_models_that_cannot_both_fit_are_grouped(
    make_daemon, tmp_path: Path, slow_llama: Path
) -> None:
    model = _wide_model(tmp_path)
    # Each takes most of the one card; a slow start lets all six arrive while the first loads.
    profiles = {name: _profile(model, "", vram=1200, ctx=512).replace(
        "[launch]", "[launch]\nenv = { SLOW_START = \"2\" }") for name in ("a", "b")}
    daemon = _one_card_daemon(make_daemon, tmp_path, profiles, queue_timeout=120, engine=slow_llama)
    streams = []
    for name in ("a", "b", "a", "b", "a", "b"):
        stream = Stream(daemon, name, 200)
        stream.start()
        streams.append(stream)
        # Sent in this order: each has reached the daemon before the next one goes out.
        wait_until(lambda: _arrived(daemon) >= len(streams), timeout=60, what=f"request {len(streams)} to arrive")
    for stream in streams:
        stream.join(240)
    assert all(s.error is None for s in streams), [s.error for s in streams]
    assert [s.status for s in streams] == [200] * 6
    # One load each and one eviction, not a swap per request.
    assert _loads(daemon) == {"a": 1, "b": 1}
    assert daemon.log().count("evicted to make room") == 1
    assert _metric(daemon, "llmd_evictions_total", model="a") == 1
    # a's requests were served together, then b's.
    order = [name for _, name in sorted((s.first_chunk, s.body["model"]) for s in streams)]
    assert order == ["a", "a", "a", "b", "b", "b"]


@pytest.mark.engine
def test_a_busy_model_is_held_so_a_waiting_swap_is_served_within_queue_timeout(make_daemon, tmp_path: Path) -> None:
    model = _wide_model(tmp_path)
    profiles = {name: _profile(model, "", vram=1200, ctx=512) for name in ("a", "b")}
    # Half of queue_timeout for a to keep taking requests, the other half for them to drain.
    daemon = _one_card_daemon(make_daemon, tmp_path, profiles, queue_timeout=16)
    daemon.llmctl("load", "a")
    # Three clients keep a busy without a gap: requests always wait for its one slot.
    stop = threading.Event()
    a_results: list[int | None] = []

    def keep_a_busy() -> None:
        while not stop.is_set():
            stream = Stream(daemon, "a", 150)
            stream.run()
            a_results.append(stream.status)

    clients = [threading.Thread(target=keep_a_busy, daemon=True) for _ in range(3)]
    for client in clients:
        client.start()
    wait_until(lambda: _metric(daemon, "llmd_queue_depth", model="a") >= 2, timeout=60, what="requests queued for a")
    began = time.monotonic()
    b = Stream(daemon, "b", 20)
    b.run()
    waited = time.monotonic() - began
    stop.set()
    for client in clients:
        client.join(240)
    # Without the hold, a would never be idle and b would get 503 after queue_timeout.
    assert b.status == 200, b.raw
    assert waited < 16 + 30  # queue_timeout, plus b's own load
    assert "evicted to make room" in daemon.log()
    assert 200 in a_results
