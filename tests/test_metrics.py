"""GET /metrics: the request middleware on small ASGI apps, and a real daemon with llama-server."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import wait_until
from llmd.daemon.config import load_config
from llmd.daemon.errors import ConfigError
from llmd.daemon.http.metrics import MIB, MODEL_SCOPE_KEY, Metrics, RequestMetrics, name_model
from prometheus_client.parser import text_string_to_metric_families
from support import daemon_with_server_settings

CHAT = "/v1/chat/completions"
TIMINGS = {"prompt_n": 5, "cache_n": 3, "prompt_per_second": 400.0, "predicted_n": 4, "predicted_per_second": 25.0}


def _metrics(models: Callable[[], list[dict[str, Any]]] = list, gpus: Callable[[], dict[str, Any]] = lambda: {"gpus": []}) -> Metrics:
    return Metrics(True, models=models, gpus=gpus)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


AsgiApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def _call(metrics: Metrics, app: AsgiApp, path: str = CHAT, disconnect: anyio.Event | None = None) -> list[dict[str, Any]]:
    """Run one request through RequestMetrics(app); return the messages the server was sent.
    After the body, `receive` waits for `disconnect` (never, when None)."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    sent: list[dict[str, Any]] = []
    bodies = [{"type": "http.request", "body": b'{"model": "m"}', "more_body": False}]

    async def receive() -> dict[str, Any]:
        if bodies:
            return bodies.pop()
        await (disconnect or anyio.Event()).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await RequestMetrics(app, metrics)(scope, receive, send)
    return sent


def _start(status: int = 200, stream: bool = False) -> dict[str, Any]:
    kind = b"text/event-stream" if stream else b"application/json"
    return {"type": "http.response.start", "status": status, "headers": [(b"Content-Type", kind)]}


def _body(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _engine(*messages: dict[str, Any], model: str | None = "m", pause: float = 0.0) -> AsgiApp:
    """An app that reads the body, names `model` as the proxy does, and sends `messages`
    (sleeping `pause` before the first body chunk)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        if model is not None:
            scope[MODEL_SCOPE_KEY] = model
        for message in messages:
            if message["type"] == "http.response.body" and message["body"] and pause:
                await anyio.sleep(pause)
            await send(message)

    return app


@pytest.mark.anyio
async def test_a_whole_reply_is_counted_with_its_status_speeds_and_tokens() -> None:
    metrics = _metrics()
    reply = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}, "timings": TIMINGS}
    await _call(metrics, _engine(_start(), _body(json.dumps(reply).encode(), more=False)))

    assert _value(metrics, "llmd_requests_total", model="m", endpoint=CHAT, code="200") == 1
    assert _value(metrics, "llmd_request_errors_total", model="m", endpoint=CHAT, reason="client_error") == 0
    assert _value(metrics, "llmd_generation_tokens_per_second_sum", model="m") == 25.0
    assert _value(metrics, "llmd_prompt_tokens_per_second_sum", model="m") == 400.0
    # usage wins over timings when both are there
    assert _value(metrics, "llmd_prompt_tokens_total", model="m") == 7
    assert _value(metrics, "llmd_completion_tokens_total", model="m") == 4
    assert _value(metrics, "llmd_time_to_first_token_seconds_count", model="m") == 0  # not a stream
    assert _value(metrics, "llmd_request_duration_seconds_count", model="m", endpoint=CHAT) == 1


@pytest.mark.anyio
async def test_a_request_that_never_names_a_model_counts_under_the_empty_model() -> None:
    metrics = _metrics()
    await _call(metrics, _engine(_start(404), _body(b'{"error": {}}', more=False), model=None))
    await _call(metrics, _engine(_start(200), _body(b"{}", more=False), model=None), path="/nowhere")

    assert _value(metrics, "llmd_requests_total", model="", endpoint=CHAT, code="404") == 1
    assert _value(metrics, "llmd_request_errors_total", model="", endpoint=CHAT, reason="client_error") == 1
    assert _value(metrics, "llmd_requests_total", model="", endpoint="other", code="200") == 1


@pytest.mark.anyio
async def test_a_stream_gets_its_time_to_first_token_and_speeds_split_across_chunks() -> None:
    metrics = _metrics()
    last = _event({"choices": [], "timings": TIMINGS})
    cut = last.index(b"predicted_per_second")
    app = _engine(
        _start(stream=True),
        _body(_event({"choices": [{"delta": {"content": "hi"}}]})),
        _body(last[:cut]),
        _body(last[cut:] + b"data: [DONE]\n\n"),
        _body(b"", more=False),
        pause=0.05,
    )
    began = time.perf_counter()
    await _call(metrics, app)
    took = time.perf_counter() - began

    ttft = _value(metrics, "llmd_time_to_first_token_seconds_sum", model="m")
    assert _value(metrics, "llmd_time_to_first_token_seconds_count", model="m") == 1
    assert 0.05 <= ttft < took - 0.05  # the first chunk, not the last
    assert _value(metrics, "llmd_generation_tokens_per_second_sum", model="m") == 25.0
    # no usage in a llama-server stream: tokens come from timings (processed + cached prompt)
    assert _value(metrics, "llmd_prompt_tokens_total", model="m") == 8
    assert _value(metrics, "llmd_completion_tokens_total", model="m") == 4
    assert _value(metrics, "llmd_request_errors_total", model="m", endpoint=CHAT, reason="stream_broken") == 0


@pytest.mark.anyio
async def test_in_flight_moves_to_the_model_once_named_and_returns_to_zero() -> None:
    metrics = _metrics()
    named, finish = anyio.Event(), anyio.Event()
    seen: dict[str, float] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        seen["before"] = _value(metrics, "llmd_requests_in_flight", model="")
        name_model(scope, "m")  # as the proxy does, before the model loads
        named.set()
        await finish.wait()
        await send(_start())
        await send(_body(b"{}", more=False))

    async with anyio.create_task_group() as tg:
        tg.start_soon(_call, metrics, app)
        await named.wait()
        assert _value(metrics, "llmd_requests_in_flight", model="m") == 1  # before any reply
        assert _value(metrics, "llmd_requests_in_flight", model="") == 0
        finish.set()
    assert seen["before"] == 1
    assert _value(metrics, "llmd_requests_in_flight", model="m") == 0
    assert _value(metrics, "llmd_requests_in_flight", model="") == 0


@pytest.mark.anyio
async def test_broken_streams_count_as_errors() -> None:
    metrics = _metrics()
    # the engine broke off: the proxy ends the stream with an error event
    await _call(metrics, _engine(_start(stream=True), _body(b'data: {"x": 1}\n\n'),
                                 _body(_event({"error": {"message": "broke off", "type": "upstream_error"}})),
                                 _body(b"", more=False)))
    # llmd failed mid-reply
    async def failing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _engine(_start(stream=True), _body(b'data: {"x": 1}\n\n'))(scope, receive, send)
        raise RuntimeError("llmd failed mid-reply")

    with pytest.raises(RuntimeError):
        await _call(metrics, failing)
    assert _value(metrics, "llmd_request_errors_total", model="m", endpoint=CHAT, reason="stream_broken") == 2
    assert _value(metrics, "llmd_requests_total", model="m", endpoint=CHAT, code="200") == 2
    assert _value(metrics, "llmd_requests_in_flight", model="m") == 0


@pytest.mark.anyio
async def test_a_client_leaving_mid_stream_counts_as_client_gone() -> None:
    metrics = _metrics()
    gone = anyio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        scope[MODEL_SCOPE_KEY] = "m"
        await send(_start(stream=True))
        await send(_body(b'data: {"x": 1}\n\n'))
        gone.set()
        assert (await receive())["type"] == "http.disconnect"  # and the reply stops unfinished

    await _call(metrics, app, disconnect=gone)
    assert _value(metrics, "llmd_request_errors_total", model="m", endpoint=CHAT, reason="client_gone") == 1
    assert _value(metrics, "llmd_request_errors_total", model="m", endpoint=CHAT, reason="stream_broken") == 0


@pytest.mark.anyio
async def test_scrapes_are_not_counted_and_disabled_metrics_serve_nothing() -> None:
    metrics = _metrics()
    await _call(metrics, _engine(_start(), _body(b"x", more=False), model=None), path="/metrics")
    assert "llmd_requests_total{" not in metrics.exposition().decode()

    off = Metrics(False, models=list, gpus=lambda: {"gpus": []})
    app = _engine()
    assert off.routes() == [] and off.instrument(app) is app
    assert [route.path for route in metrics.routes()] == ["/metrics"]  # type: ignore[attr-defined]


def test_states_and_gpus_are_read_at_scrape_time() -> None:
    rows = [{"model": "a", "state": "ready"}]
    card = {"index": 0, "uuid": "GPU-x", "name": "Sim", "total_mib": 2000, "free_mib": 800, "foreign_mib": 0,
            "models": [{"model": "a", "vram_mib": 1200, "state": "ready"}]}
    metrics = _metrics(lambda: rows, lambda: {"gpus": [card]})
    assert _value(metrics, "llmd_model_state", model="a", state="ready") == 1
    assert _value(metrics, "llmd_model_state", model="a", state="stopped") == 0
    assert _value(metrics, "llmd_gpu_memory_total_bytes", gpu="0") == 2000 * MIB
    assert _value(metrics, "llmd_gpu_memory_placed_bytes", gpu="0", model="a") == 1200 * MIB
    assert _value(metrics, "llmd_model_state", model="a", state="sleeping") == 0
    rows[0]["state"] = "hibernating"  # a state this module does not know of still shows
    assert _value(metrics, "llmd_model_state", model="a", state="hibernating") == 1
    assert _value(metrics, "llmd_model_state", model="a", state="ready") == 0


def test_a_failing_source_does_not_fail_the_scrape() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("NVML went away")

    metrics = _metrics(lambda: [{"model": "a", "state": "ready"}], broken)
    metrics.load_finished("a", 1.5, ok=True)
    text = metrics.exposition().decode()
    assert 'llmd_scrape_source_ok{source="gpus"} 0.0' in text
    assert 'llmd_scrape_source_ok{source="models"} 1.0' in text
    assert 'llmd_load_duration_seconds_sum{model="a",result="ready"} 1.5' in text


def _exported_names() -> set[str]:
    """Every metric a busy daemon exports, as docs and PromQL name them (counters with _total)."""
    card = {"index": 0, "uuid": "GPU-x", "name": "Sim", "total_mib": 1, "free_mib": 1, "foreign_mib": 0, "models": []}
    metrics = _metrics(lambda: [{"model": "a", "state": "ready"}], lambda: {"gpus": [card]})
    return {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(metrics.exposition().decode())
    }


def test_docs_list_every_metric_and_the_dashboard_uses_only_real_ones() -> None:
    docs = Path(__file__).parent.parent / "docs"
    exported = _exported_names()
    documented = set(re.findall(r"^\| `(llmd_[a-z_]+)` \|", (docs / "metrics.md").read_text(), re.MULTILINE))
    assert documented == exported

    dashboard = json.loads((docs / "grafana-llmd.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for e in exprs for name in re.findall(r"llmd_[a-z_]+", e)}
    assert used and used <= exported, used - exported


def test_the_metrics_setting_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "llmd.toml"
    path.write_text("[metrics]\nenabled = false\n")
    assert load_config(path).metrics.enabled is False
    path.write_text("[metrics]\nenable = false\n")
    with pytest.raises(ConfigError, match="enable"):
        load_config(path)


def test_per_chunk_cost_is_small() -> None:
    """The hot path: what RequestMetrics adds to sending one ordinary stream chunk."""
    from llmd.daemon.http.metrics import _Exchange

    metrics = _metrics()
    chunk = _event({"choices": [{"index": 0, "delta": {"content": "word"}}], "object": "chat.completion.chunk",
                    "id": "chatcmpl-0123456789abcdef", "model": "m", "created": 1})

    async def nothing(message: Any) -> None:
        pass

    async def measure() -> tuple[float, float]:
        exchange = _Exchange(metrics, {"type": "http", "path": CHAT, MODEL_SCOPE_KEY: "m"}, nothing, nothing)
        await exchange.send(_start(stream=True))
        message = _body(chunk)
        n = 20000
        began = time.perf_counter()
        for _ in range(n):
            await exchange.send(message)
        wrapped = (time.perf_counter() - began) / n
        began = time.perf_counter()
        for _ in range(n):
            await nothing(message)
        bare = (time.perf_counter() - began) / n
        return wrapped, bare

    wrapped, bare = anyio.run(measure)
    extra_us = (wrapped - bare) * 1e6
    print(f"per chunk of {len(chunk)} bytes: {extra_us:.2f} µs over a bare send")
    assert extra_us < 20  # generous: a shared CPU; the measured figure is in docs/metrics.md


# ----- a real daemon with llama-server -----


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _scrape_proxy(daemon: Any, headers: dict[str, str] | None = None) -> Samples:
    response = httpx.get(daemon.url + "/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


def _scrape_management(daemon: Any) -> Samples:
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://llmd", timeout=10) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return _samples(response.text)


def _chat(daemon: Any, model: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    return httpx.post(daemon.url + CHAT, json=body, timeout=120)


def _profile(model: Path, slow_start: int = 0) -> str:
    return (f'engine = "llama-cpp"\n[model]\npath = "{model}"\n[launch]\nctx = 512\nenv = {{SLOW_START = "{slow_start}"}}\n'
            '[placement]\nvram_mib = 1200\n[policy]\nttl = "30m"\n')




@pytest.mark.engine
def test_metrics_of_a_real_daemon(make_daemon: Any, tiny_gguf: Path, tmp_path: Path, slow_llama: Path) -> None:
    sim = tmp_path / "gpus.json"  # one card with room for one model at a time
    sim.write_text(json.dumps({"gpus": [{"name": "Sim", "total_mib": 2000, "free_mib": 2000}]}))
    models = {}
    for name in ("a", "b"):
        models[name] = tmp_path / f"{name}.gguf"
        models[name].write_bytes(tiny_gguf.read_bytes())
    # b's engine takes 2 s to start, long enough to look at a request waiting for it
    profiles = {"a": _profile(models["a"]), "b": _profile(models["b"], slow_start=2)}
    daemon = make_daemon(profiles, extra_config=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n', start=False)
    config = daemon.root / "llmd.toml"
    config.write_text(re.sub(r'command = \["[^"]*"\]', f'command = ["{slow_llama}"]', config.read_text()))
    daemon.start()

    streamed = _chat(daemon, "a", stream=True)
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
    assert _chat(daemon, "a").status_code == 200
    assert _chat(daemon, "nope").status_code == 404

    s = _scrape_proxy(daemon)
    assert _get(s, "llmd_requests_total", model="a", endpoint=CHAT, code="200") == 2
    assert _get(s, "llmd_requests_total", model="", endpoint=CHAT, code="404") == 1
    assert _get(s, "llmd_request_errors_total", model="", endpoint=CHAT, reason="client_error") == 1
    assert _get(s, "llmd_requests_in_flight", model="a") == 0
    assert _get(s, "llmd_time_to_first_token_seconds_count", model="a") == 1
    assert (_get(s, "llmd_time_to_first_token_seconds_sum", model="a") or 0) > 0
    assert _get(s, "llmd_generation_tokens_per_second_count", model="a") == 2  # from both replies' timings
    assert (_get(s, "llmd_generation_tokens_per_second_sum", model="a") or 0) > 0
    assert (_get(s, "llmd_completion_tokens_total", model="a") or 0) >= 2
    assert _get(s, "llmd_load_duration_seconds_count", model="a", result="ready") == 1
    assert (_get(s, "llmd_load_duration_seconds_sum", model="a", result="ready") or 0) > 0
    assert _get(s, "llmd_model_state", model="a", state="ready") == 1
    assert _get(s, "llmd_gpu_memory_total_bytes", gpu="0") == 2000 * MIB
    assert _get(s, "llmd_gpu_memory_free_bytes", gpu="0") == 800 * MIB  # simulated memory follows placement
    assert _get(s, "llmd_gpu_memory_placed_bytes", gpu="0", model="a") == 1200 * MIB

    with ThreadPoolExecutor(1) as pool:
        cold = pool.submit(_chat, daemon, "b")  # no room for both: a is evicted
        def loading() -> Samples | None:
            s = _scrape_proxy(daemon)
            return s if _get(s, "llmd_model_state", model="b", state="starting") == 1 else None

        s = wait_until(loading, timeout=30, what="b to start loading")
        assert _get(s, "llmd_requests_in_flight", model="b") == 1  # counted under its model while it loads
        assert _get(s, "llmd_requests_in_flight", model="") == 0
        assert cold.result().status_code == 200
    s = _scrape_management(daemon)
    assert _get(s, "llmd_requests_in_flight", model="b") == 0
    assert _get(s, "llmd_evictions_total", model="a") == 1
    assert _get(s, "llmd_eviction_duration_seconds_count") == 1
    assert _get(s, "llmd_model_state", model="a", state="stopped") == 1
    assert _get(s, "llmd_gpu_memory_placed_bytes", gpu="0", model="b") == 1200 * MIB
    assert _get(s, "llmd_gpu_memory_placed_bytes", gpu="0", model="a") is None

    daemon.llmctl("load", "a", "--replace", "b")
    s = _scrape_management(daemon)
    assert _get(s, "llmd_swap_duration_seconds_count", model="a") == 1
    assert (_get(s, "llmd_swap_duration_seconds_sum", model="a") or 0) > 0
    assert _get(s, "llmd_load_duration_seconds_count", model="a", result="ready") == 2
    assert _get(s, "llmd_model_state", model="b", state="stopped") == 1


def test_metrics_on_the_proxy_need_an_api_key_when_keys_are_set(make_daemon: Any) -> None:
    key = "metrics-key-0123456789"
    daemon = daemon_with_server_settings(make_daemon, f'api_keys = ["{key}"]\n')
    refused = httpx.get(daemon.url + "/metrics", timeout=10)
    assert refused.status_code == 401
    s = _scrape_proxy(daemon, {"Authorization": f"Bearer {key}"})
    assert _get(s, "llmd_scrape_source_ok", source="models") == 1
    assert not any(name == "llmd_requests_total" for name, _ in s)  # scrapes, refused or not, are not requests


def test_metrics_can_be_turned_off(make_daemon: Any) -> None:
    daemon = make_daemon(extra_config="[metrics]\nenabled = false\n")
    assert httpx.get(daemon.url + "/metrics", timeout=10).status_code == 404
