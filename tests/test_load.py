"""Load: 64 concurrent streaming clients over 3 models with room for one, swaps all along.

Every request must complete or get a clean error; none may be lost (hang, cut stream without
an error, double launch)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import pytest

from conftest import engine_processes

pytestmark = pytest.mark.engine

CLIENTS = 64
REQUESTS_PER_CLIENT = 3
DEADLINE_SECONDS = 150


def _profile(model: Path) -> str:
    return f'engine = "llama-cpp"\n[model]\npath = "{model}"\n[launch]\nctx = 256\nparallel = 4\n[placement]\nvram_mib = 1500\n'


async def _one(client: httpx.AsyncClient, url: str, model: str, outcomes: dict[str, list], latencies: list[float]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True,
            "ignore_eos": True}
    began = time.monotonic()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                payload = json.loads(await response.aread())
                assert payload["error"]["message"]
                outcomes["errored"].append(f"{response.status_code}: {payload['error']['message'][:80]}")
                return
            saw_done = saw_error = False
            async for line in response.aiter_lines():
                saw_done = saw_done or line == "data: [DONE]"
                saw_error = saw_error or '"error"' in line
            if saw_done:
                outcomes["completed"].append(model)
                latencies.append(time.monotonic() - began)
            elif saw_error:
                outcomes["errored"].append("stream ended with an error event")
            else:
                outcomes["lost"].append(f"{model}: stream ended without [DONE] or an error")
    except (httpx.HTTPError, ValueError, KeyError, AssertionError) as exc:
        outcomes["lost"].append(f"{model}: {exc!r}")


def test_many_clients_over_three_models_with_room_for_one(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [{"name": "Sim", "total_mib": 2000, "free_mib": 2000}]}))
    models = {}
    for name in ("m1", "m2", "m3"):
        models[name] = tmp_path / f"{name}.gguf"
        models[name].write_bytes(tiny_gguf.read_bytes())
    daemon = make_daemon({n: _profile(p) for n, p in models.items()},
                         extra_config=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n')
    outcomes: dict[str, list] = {"completed": [], "errored": [], "lost": []}
    latencies: list[float] = []
    rng = random.Random(7)
    plan = [[rng.choice(list(models)) for _ in range(REQUESTS_PER_CLIENT)] for _ in range(CLIENTS)]

    async def client_task(client: httpx.AsyncClient, picks: list[str]) -> None:
        for model in picks:
            await _one(client, daemon.url + "/v1/chat/completions", model, outcomes, latencies)

    async def main() -> None:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
            with anyio_deadline(DEADLINE_SECONDS):
                await asyncio.gather(*(client_task(client, picks) for picks in plan))

    began = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - began
    total = CLIENTS * REQUESTS_PER_CLIENT
    latencies.sort()
    pct = {p: latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] for p in (50, 90, 99)} if latencies else {}
    print(f"\nload: {total} requests in {elapsed:.1f}s: completed {len(outcomes['completed'])}, "
          f"errored {len(outcomes['errored'])}, lost {len(outcomes['lost'])}; "
          + ", ".join(f"p{p} {v:.2f}s" for p, v in pct.items()))
    for message in sorted(set(outcomes["errored"]))[:5]:
        print("  error:", message)
    assert outcomes["lost"] == []
    assert len(outcomes["completed"]) + len(outcomes["errored"]) == total
    assert len(outcomes["completed"]) >= total // 2
    # Room for one: never two engines at once, and the daemon still serves afterwards.
    starts = sum((daemon.state_dir / "logs" / f"{n}.log").read_text().count("===== llmd: starting") for n in models)
    assert starts >= 3
    assert len(engine_processes(daemon.state_dir)) <= 1
    assert httpx.get(daemon.url + "/v1/models").status_code == 200


class anyio_deadline:  # noqa: N801  (reads like the context manager it is)
    """Fail the test, rather than hang it, if the whole run takes longer than `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        import signal

        def _timeout(signum, frame):  # type: ignore[no-untyped-def]
            raise TimeoutError(f"load test did not finish within {self.seconds}s")

        self._old = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(int(self.seconds))

    def __exit__(self, *exc: object) -> None:
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self._old)
