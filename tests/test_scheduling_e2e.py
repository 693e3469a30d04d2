"""Scheduling end to end: a simulated 2-card inventory, real llama-server engines."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import engine_processes, wait_until
from llmd.daemon.models.tinymodel import write_tiny_gguf

pytestmark = pytest.mark.engine

CARD_MIB = 2000


def _sim(tmp_path: Path, cards: list[tuple[int, int]]) -> Path:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": [{"name": "Sim", "total_mib": t, "free_mib": f} for t, f in cards]}))
    return path


def _profile(model: Path, *, vram: int | None = None, tp: str | int = 1, offload: str = "none",
             env: dict[str, str] | None = None, ttl: str = "30m", ctx: int = 512, threads: int | None = None) -> str:
    lines = ['engine = "llama-cpp"', "[model]", f'path = "{model}"', "[launch]", f"ctx = {ctx}",
             f"tensor_parallel = {json.dumps(tp)}", f'offload = "{offload}"']
    if threads:
        lines.append(f'extra_args = ["--threads", "{threads}"]')
    if env:
        lines.append("env = {" + ", ".join(f'{k} = "{v}"' for k, v in env.items()) + "}")
    if vram is not None:
        lines += ["[placement]", f"vram_mib = {vram}"]
    lines += ["[policy]", f'ttl = "{ttl}"']
    return "\n".join(lines) + "\n"


def _chat(daemon, model: str, max_tokens: int = 2, timeout: float = 120) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=timeout)


def _rows(daemon) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {row["model"]: row for row in daemon.ps()}


def _copies(tiny: Path, tmp_path: Path, names: list[str]) -> dict[str, Path]:
    paths = {}
    for name in names:
        paths[name] = tmp_path / f"{name}.gguf"
        paths[name].write_bytes(tiny.read_bytes())
    return paths




def _two_card_daemon(make_daemon, tmp_path: Path, profiles: dict[str, str], engine: Path | None = None,
                     queue_timeout: float = 30):  # type: ignore[no-untyped-def]
    sim = _sim(tmp_path, [(CARD_MIB, CARD_MIB), (CARD_MIB, CARD_MIB)])
    extra = f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n'
    daemon = make_daemon(profiles, extra_config=extra, start=False)
    text = (daemon.root / "llmd.toml").read_text().replace("stop_grace = 5", f"stop_grace = 5\nqueue_timeout = {queue_timeout}")
    if engine is not None:
        configured = text.split('command = ["')[1].split('"')[0]
        text = text.replace(configured, str(engine))
    (daemon.root / "llmd.toml").write_text(text)
    daemon.start()
    return daemon


def test_two_models_land_on_different_cards_and_a_third_evicts_lru(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    models = _copies(tiny_gguf, tmp_path, ["a", "b", "c"])
    daemon = _two_card_daemon(make_daemon, tmp_path, {n: _profile(p, vram=1200) for n, p in models.items()})

    daemon.llmctl("load", "a")
    daemon.llmctl("load", "b")
    rows = _rows(daemon)
    assert {tuple(rows["a"]["gpus"]), tuple(rows["b"]["gpus"])} == {(0,), (1,)}
    assert rows["a"]["vram_mib"] == 1200
    env_a = next(p for p in engine_processes(daemon.state_dir) if p.environ().get("LLMD_MODEL") == "a").environ()
    assert env_a["CUDA_VISIBLE_DEVICES"].startswith("GPU-")

    gpus = json.loads(daemon.llmctl("gpus", "--json").stdout)["gpus"]
    assert sorted(g["free_mib"] for g in gpus) == [CARD_MIB - 1200] * 2  # simulated memory follows placement

    assert _chat(daemon, "b").status_code == 200  # b is now the most recently used
    plan = json.loads(daemon.llmctl("plan", "c", "--json").stdout)
    assert plan["fits"] and plan["evict"] == ["a"]

    assert _chat(daemon, "c").status_code == 200
    rows = _rows(daemon)
    assert rows["a"]["state"] == "stopped"
    assert rows["b"]["state"] == "ready" and rows["c"]["state"] == "ready"
    assert rows["c"]["gpus"] == [next(g["index"] for g in gpus if g["models"] and g["models"][0]["model"] == "a")]
    assert "evicted to make room" in daemon.log()


def test_tensor_parallel_profile_takes_both_cards(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    models = _copies(tiny_gguf, tmp_path, ["small", "big"])
    daemon = _two_card_daemon(
        make_daemon, tmp_path, {"small": _profile(models["small"], vram=600), "big": _profile(models["big"], vram=3000, tp="auto")}
    )
    daemon.llmctl("load", "small")
    assert _chat(daemon, "big").status_code == 200
    rows = _rows(daemon)
    assert rows["big"]["gpus"] == [0, 1]
    assert rows["big"]["vram_mib"] == 3000
    argv = rows["big"]["argv"]
    assert argv[argv.index("--tensor-split") + 1] == "1500,1500"
    assert argv[argv.index("-ngl") + 1] == "999"
    assert rows["small"]["state"] == "stopped"  # it stood in the way and was idle


def test_offload_profile_gets_a_partial_layer_count(make_daemon, tmp_path: Path) -> None:
    from llmd.daemon.placement.estimate import estimate_gguf

    model = write_tiny_gguf(tmp_path / "deep.gguf", n_layers=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=4)
    estimate = estimate_gguf(model, 512)
    mib = 1024 * 1024
    fixed = estimate.gpu_overhead_mib + (estimate.compute_bytes + estimate.non_layer_bytes) / mib
    per_layer = (sum(estimate.layer_bytes) + estimate.kv_bytes) / estimate.n_layers / mib
    card = int(fixed + per_layer * 4.5) + 1  # room for about half the layers
    sim = _sim(tmp_path, [(card, card)])
    daemon = make_daemon({"deep": _profile(model, offload="auto")}, extra_config=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n')

    plan = json.loads(daemon.llmctl("plan", "deep", "--json").stdout)
    assert plan["fits"] and plan["estimate"]["n_layers"] == 8
    assert _chat(daemon, "deep").status_code == 200
    row = _rows(daemon)["deep"]
    assert 0 < row["gpu_layers"] < 8
    assert row["argv"][row["argv"].index("-ngl") + 1] == str(row["gpu_layers"])
    assert f"{row['gpu_layers']} layers" in daemon.llmctl("ps").stdout


def _stream(daemon, model: str, max_tokens: int, results: list, started: threading.Event) -> None:  # type: ignore[no-untyped-def]
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    chunks, done = 0, False
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            done = done or line == "data: [DONE]"
            if line.startswith("data: {"):
                chunks += 1
                started.set()
    results.append((response.status_code, chunks if done else -1))


def test_busy_model_survives_a_swap_request(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    # A model wide enough to generate at hundreds (not thousands) of tokens/s, so that a stream
    # keeps its engine busy for seconds rather than landing in socket buffers at once.
    slow = write_tiny_gguf(tmp_path / "wide.gguf", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8)
    models = _copies(slow, tmp_path, ["a", "b", "c"])
    # One thread each: two engines spinning two threads apiece on two cores crawl.
    profiles = {n: _profile(p, vram=1200, ctx=4096, threads=1) for n, p in models.items()}
    daemon = _two_card_daemon(make_daemon, tmp_path, profiles, queue_timeout=1)
    daemon.llmctl("load", "a")
    daemon.llmctl("load", "b")
    results: list = []
    streams = []
    for name in ("a", "b"):
        started = threading.Event()
        thread = threading.Thread(target=_stream, args=(daemon, name, 1500, results, started))
        thread.start()
        assert started.wait(30)
        streams.append(thread)
    # Both cards are busy: c waits for room, then gets 503 with Retry-After; nothing is evicted.
    response = _chat(daemon, "c")
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    assert "no room for 'c'" in response.json()["error"]["message"]
    for thread in streams:
        thread.join(60)
    assert [status for status, _ in results] == [200, 200]
    # Both ran to the end ([DONE]); bytes of one character share a chunk, so there are fewer chunks than tokens.
    assert all(chunks > 100 for _, chunks in results), results
    rows = _rows(daemon)
    assert rows["a"]["state"] == "ready" and rows["b"]["state"] == "ready"
    # Once they are idle, c gets a card.
    assert _chat(daemon, "c").status_code == 200


def test_running_model_answers_while_another_loads_and_evicted_model_request_completes(
    make_daemon, tiny_gguf: Path, tmp_path: Path, slow_llama: Path
) -> None:
    models = _copies(tiny_gguf, tmp_path, ["a", "b", "slow"])
    profiles = {
        "a": _profile(models["a"], vram=1200),
        "b": _profile(models["b"], vram=1200),
        # Long enough that b's answer below, even on a busy machine, comes well before slow is ready.
        "slow": _profile(models["slow"], vram=1200, env={"SLOW_START": "8"}),
    }
    daemon = _two_card_daemon(make_daemon, tmp_path, profiles, engine=slow_llama)
    daemon.llmctl("load", "a")
    daemon.llmctl("load", "b")
    assert _chat(daemon, "b").status_code == 200  # a is now least recently used

    slow_result: list = []
    loader = threading.Thread(target=lambda: slow_result.append(_chat(daemon, "slow").status_code))
    loader.start()
    wait_until(lambda: _rows(daemon).get("slow", {}).get("state") == "starting", what="slow to start loading")
    assert _rows(daemon)["a"]["state"] in ("stopping", "stopped")  # evicted for slow

    # b is running: it answers at once, not after slow's 8 s load (on a busy machine "at once"
    # may take seconds; slow still starting below is the proof).
    began = time.monotonic()
    assert _chat(daemon, "b").status_code == 200
    assert time.monotonic() - began < 8
    assert _rows(daemon)["slow"]["state"] == "starting"

    # a was evicted: a request for it waits for room and completes.
    assert _chat(daemon, "a").status_code == 200
    loader.join(60)
    assert slow_result == [200]
    assert _rows(daemon)["a"]["state"] == "ready"


def test_replace_starts_the_new_model_first_when_both_fit(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    models = _copies(tiny_gguf, tmp_path, ["a", "b", "c"])
    profiles = {"a": _profile(models["a"], vram=1200), "b": _profile(models["b"], vram=1200),
                "c": _profile(models["c"], vram=1200)}
    daemon = _two_card_daemon(make_daemon, tmp_path, profiles)
    daemon.llmctl("load", "a")
    assert "b is ready" in daemon.llmctl("load", "b", "--replace", "a").stdout
    rows = _rows(daemon)
    assert rows["a"]["state"] == "stopped" and rows["b"]["state"] == "ready"
    log = daemon.log()
    assert log.index("starting b") < log.index("stopping a (replaced by b)")

    # No room for both: the old one makes room first.
    daemon.llmctl("load", "a")  # a and b now fill both cards
    assert "c is ready" in daemon.llmctl("load", "c", "--replace", "b").stdout
    rows = _rows(daemon)
    assert rows["b"]["state"] == "stopped" and rows["c"]["state"] == "ready" and rows["a"]["state"] == "ready"
    log = daemon.log()
    assert log.index("stopping b (replaced by c)") < log.index("starting c")
