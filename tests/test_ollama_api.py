"""Ollama's API on llmd's proxy listener: the official `ollama` client, unchanged, against a real
daemon running llama-server and fastllm; and in-process, the translation both ways, model name
resolution and the error shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import ollama
import pytest

from conftest import tiny_profile, wait_until
from support import FakeEngine, FakeManager
from llmd.daemon.http.ollama import ollama_api
from llmd.daemon.http.ollama_models import human_parameters, quantization_name
from llmd.daemon.http.ollama_replies import Clock, StreamTranslator, chat_reply, generate_reply
from llmd.daemon.http.ollama_requests import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    OPTION_FIELDS,
    OllamaRequestError,
    chat_call,
    embed_call,
    generate_call,
    names_to_try,
    parse_keep_alive,
    sampling_fields,
)
from llmd.daemon.http.proxy import Proxy, build_proxy_app
from llmd.daemon.models.profiles import ModelSource, Profile

KEY = "ollama-key-0123456789"
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
]


# ----- requests: Ollama's in OpenAI's terms -----


def test_a_tag_resolves_to_the_profile_unless_a_profile_has_that_very_name() -> None:
    assert names_to_try("demo") == ["demo"]
    assert names_to_try("demo:latest") == ["demo:latest", "demo"]
    assert names_to_try("demo:q4_K_M") == ["demo:q4_K_M", "demo"]
    assert names_to_try(":latest") == [":latest"]


def test_options_become_the_engines_sampling_fields() -> None:
    options = {
        "num_predict": 32, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["\n", "User:"],
        "min_p": 0.05, "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
        "num_gpu": 99, "num_thread": 8, "use_mmap": True,  # load-time options: the profile's business
    }
    fields, warnings = sampling_fields(options, ctx=4096)
    assert fields == {
        "max_tokens": 32, "temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["\n", "User:"],
        "min_p": 0.05, "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.25,
    }
    assert not warnings
    assert set(OPTION_FIELDS) >= {"num_predict", "temperature", "top_p", "top_k", "stop", "seed"}
    assert sampling_fields({"stop": "END", "num_predict": -1, "seed": 3.0}, ctx=4096)[0] == {"stop": ["END"], "seed": 3}


def test_a_num_ctx_beyond_the_profiles_is_served_with_a_warning() -> None:
    assert sampling_fields({"num_ctx": 2048}, ctx=4096) == ({}, [])
    fields, warnings = sampling_fields({"num_ctx": 8192}, ctx=4096)
    assert fields == {} and len(warnings) == 1
    assert "8192" in warnings[0] and "4096" in warnings[0] and "[launch] ctx" in warnings[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("hot", "options must be an object"),
        ({"temperature": "hot"}, "options.temperature must be a number"),
        ({"temperature": True}, "options.temperature must be a number"),
        ({"top_k": 1.5}, "options.top_k must be a whole number"),
        ({"stop": [1]}, "options.stop must be a string or a list of strings"),
        ({"num_ctx": "big"}, "options.num_ctx must be a whole number"),
    ],
)
def test_bad_options_are_a_400_naming_the_option(options: object, message: str) -> None:
    with pytest.raises(OllamaRequestError, match=message) as caught:
        sampling_fields(options, ctx=4096)
    assert caught.value.status == 400


def test_keep_alive_in_seconds() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0 and parse_keep_alive("0s") == 0
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive(90) == 90
    assert parse_keep_alive("120") == 120
    assert parse_keep_alive(-1) == math.inf and parse_keep_alive("-1m") == math.inf
    for bad in ("soon", True, [], "never"):
        with pytest.raises(OllamaRequestError, match="keep_alive"):
            parse_keep_alive(bad)


def test_chat_becomes_a_chat_completion() -> None:
    payload = {
        "model": "demo:latest",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is this?", "images": [PIXEL]},
            *TOOL_HISTORY,
        ],
        "tools": [WEATHER_TOOL],
        "format": {"type": "object", "properties": {"answer": {"type": "string"}}},
        "options": {"num_predict": 8},
        "keep_alive": "10m",
        "think": False,
    }
    call = chat_call(payload, "demo", ctx=4096)
    assert call.path == CHAT_COMPLETIONS and call.stream and call.keep_alive == 600
    body = call.body
    assert body["model"] == "demo" and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 8 and body["tools"] == [WEATHER_TOOL]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == payload["format"]
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    system, user, _, assistant, tool = body["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"][0] == {"type": "text", "text": "What is this?"}
    assert user["content"][1]["image_url"]["url"] == f"data:image/png;base64,{PIXEL}"
    (call_made,) = assistant["tool_calls"]
    assert call_made["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert tool["tool_call_id"] == call_made["id"] and tool["content"] == "sunny"

    plain = chat_call({"model": "demo", "messages": [], "stream": False, "format": "json"}, "demo", ctx=4096)
    assert not plain.stream and "stream_options" not in plain.body and plain.keep_alive is None
    assert plain.body["response_format"] == {"type": "json_object"}


def test_generate_is_a_chat_turn_unless_raw() -> None:
    call = generate_call({"model": "demo", "prompt": "Why?", "system": "Answer in French."}, "demo", ctx=4096)
    assert call.path == CHAT_COMPLETIONS
    assert call.body["messages"] == [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Why?"}]
    raw = generate_call({"model": "demo", "prompt": "<s>[INST] Why? [/INST]", "raw": True, "stream": False}, "demo", ctx=4096)
    assert raw.path == COMPLETIONS and raw.body["prompt"] == "<s>[INST] Why? [/INST]" and raw.body["stream"] is False
    for payload, message in (
        ({"prompt": "x", "context": [1, 2, 3]}, "context is not supported"),
        ({"prompt": "x", "suffix": "y"}, "suffix is not supported"),
        ({"prompt": "x", "raw": True, "images": [PIXEL]}, "images need the model's chat template"),
        ({"prompt": 3}, "prompt must be a string"),
    ):
        with pytest.raises(OllamaRequestError, match=message):
            generate_call({"model": "demo", **payload}, "demo", ctx=4096)


def test_embed_takes_a_string_or_a_list() -> None:
    assert embed_call({"input": "hi"}, "demo").body == {"model": "demo", "input": ["hi"]}
    assert embed_call({"input": ["a", "b"], "dimensions": 8}, "demo").body == {"model": "demo", "input": ["a", "b"], "dimensions": 8}
    assert embed_call({"prompt": "hi"}, "demo", legacy=True).body["input"] == ["hi"]
    with pytest.raises(OllamaRequestError, match="input must be"):
        embed_call({"input": []}, "demo")


# ----- replies: OpenAI's in Ollama's shape -----

_CHUNK = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": None}]}


def _event(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    chunk = {**_CHUNK, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines()]


def test_a_stream_becomes_ndjson_whatever_the_cuts() -> None:
    stream = (
        _event({"role": "assistant", "content": None})
        + _event({"content": "Hel"})
        + _event({"reasoning_content": "hmm"})
        + _event({"content": "lo"})
        + _event(finish="length")
        + b'data: {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}, '
        + b'"timings": {"prompt_ms": 1.5, "predicted_ms": 4.0}}\n\n'
        + b"data: [DONE]\n\n"
    )
    for step in (1, 7, len(stream)):
        figures: list[tuple[Any, Any]] = []
        translator = StreamTranslator("demo:latest", Clock(), chat=True, on_figures=lambda t, u: figures.append((t, u)))
        out = b"".join(translator.feed(stream[i:i + step]) for i in range(0, len(stream), step)) + translator.finish()
        lines = _lines(out)
        assert [line["message"].get("content") for line in lines[:-1]] == ["Hel", "", "lo"]
        assert lines[1]["message"]["thinking"] == "hmm"
        assert all(line["model"] == "demo:latest" and line["done"] is False for line in lines[:-1])
        last = lines[-1]
        assert last["done"] is True and last["done_reason"] == "length" and last["message"]["content"] == ""
        assert (last["prompt_eval_count"], last["eval_count"]) == (11, 2)
        assert (last["prompt_eval_duration"], last["eval_duration"]) == (1_500_000, 4_000_000)
        assert last["total_duration"] >= 0 and last["load_duration"] == 0
        assert figures == [({"prompt_ms": 1.5, "predicted_ms": 4.0}, {"prompt_tokens": 11, "completion_tokens": 2})]


def test_streamed_tool_calls_arrive_whole_before_the_last_line() -> None:
    stream = (
        _event({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
        + _event({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})
        + _event({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
        + _event(finish="tool_calls")
    )
    translator = StreamTranslator("demo", Clock(), chat=True)
    lines = _lines(translator.feed(stream) + translator.finish())  # no [DONE]: finish() ends it
    calls, last = lines
    assert calls["message"]["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert last["done"] is True and last["done_reason"] == "stop"


def test_an_error_in_the_stream_ends_it_with_an_error_line() -> None:
    translator = StreamTranslator("demo", Clock(), chat=False)
    out = translator.feed(_event({"content": "a"}) + b'data: {"error": {"message": "engine for \'demo\' broke off the stream"}}\n\n')
    out += translator.finish()
    first, error = _lines(out)
    assert first["response"] == "a" and error == {"error": "engine for 'demo' broke off the stream"}


def test_whole_replies_in_ollamas_shape() -> None:
    engine = {
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "Hi", "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        }}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1},
    }
    reply = chat_reply(engine, "demo", Clock())
    assert list(reply) == [
        "model", "created_at", "message", "done_reason", "done", "total_duration", "load_duration",
        "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration",
    ]
    assert reply["message"] == {"role": "assistant", "content": "Hi", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    assert reply["created_at"].endswith("Z") and reply["done"] and reply["prompt_eval_count"] == 5
    text = generate_reply({"choices": [{"text": "raw text", "finish_reason": "length"}]}, "demo", Clock())
    assert text["response"] == "raw text" and text["done_reason"] == "length" and text["eval_count"] == 0


def test_model_details_are_written_as_ollama_writes_them() -> None:
    assert [human_parameters(n) for n in (8_030_261_248, 7_000_000_000, 494_032_768, 116_160, 12)] == [
        "8.0B", "7B", "494.03M", "116K", "12",
    ]
    assert [quantization_name(n) for n in (0, 1, 15, 7, "x", 10_000)] == ["F32", "F16", "Q4_K_M", "Q8_0", "", ""]


# ----- the routes, in-process -----


class ChatEngine(FakeEngine):
    """Answers chat completions (whole and streamed), completions and embeddings as llama-server does."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content)
        if request.url.path == "/v1/embeddings":
            data = [{"index": i, "embedding": [0.5, float(i)]} for i, _ in enumerate(body["input"])]
            return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": 3}})
        if body.get("stream"):
            events = _event({"content": "Hel"}) + _event({"content": "lo"}) + _event(finish="stop") + b"data: [DONE]\n\n"
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events)
        message = {"role": "assistant", "content": "Hello"}
        return httpx.Response(200, json={"choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                                         "usage": {"prompt_tokens": 4, "completion_tokens": 2}})


class OllamaFakeManager(FakeManager):
    """The fake manager, with real profiles and the manager's calls the Ollama routes make."""

    def __init__(self, engine: FakeEngine, names: tuple[str, ...]) -> None:
        super().__init__(engine, names)
        profiles = {}
        for name in names:
            profile = Profile(engine="llama-cpp", model=ModelSource(path=Path(f"/nonexistent/{name}.gguf")))
            profile.name = name
            profiles[name] = profile
        self.profiles = SimpleNamespace(profiles=profiles, errors={"broken": "broken.toml: engine: unknown engine 'x'"})
        self.instances: dict[str, Any] = {}
        self.kept: list[tuple[str, float]] = []

    def keep_alive(self, name: str, seconds: float) -> None:
        self.kept.append((name, seconds))


def _client(api_keys: tuple[str, ...] = (), names: tuple[str, ...] = ("demo", "demo:q4")) -> tuple[ollama.AsyncClient, OllamaFakeManager]:
    engine = ChatEngine()
    manager = OllamaFakeManager(engine, names)
    proxy = Proxy(manager)  # type: ignore[arg-type]
    app = build_proxy_app(proxy, api_keys, apis=[ollama_api(proxy)])
    headers = {"Authorization": f"Bearer {api_keys[0]}"} if api_keys else None
    return ollama.AsyncClient(host="http://llmd.test", transport=httpx.ASGITransport(app), headers=headers), manager


@pytest.mark.anyio
async def test_the_official_client_in_process() -> None:
    client, manager = _client()
    reply = await client.chat(model="demo:latest", messages=[{"role": "user", "content": "hi"}], keep_alive="2m")
    assert reply.message.content == "Hello" and reply.model == "demo:latest" and reply.done_reason == "stop"
    assert reply.prompt_eval_count == 4 and reply.eval_count == 2
    parts = [part async for part in await client.chat(model="demo", messages=[{"role": "user", "content": "hi"}], stream=True)]
    assert "".join(part.message.content or "" for part in parts) == "Hello" and parts[-1].done
    generated = await client.generate(model="demo", prompt="hi", options={"temperature": 0.1, "num_predict": 5})
    assert generated.response == "Hello"
    embedded = await client.embed(model="demo", input=["a", "b"])
    assert embedded.embeddings == [[0.5, 0.0], [0.5, 1.0]]
    assert (await client.embeddings(model="demo", prompt="a")).embedding == [0.5, 0.0]

    # `demo:q4` is a profile of its own; `demo:latest` and `demo` are `demo`.
    await client.chat(model="demo:q4", messages=[{"role": "user", "content": "hi"}])
    sent = [json.loads(request.content) for request in manager.engine.requests]
    assert [body["model"] for body in sent] == ["demo", "demo", "demo", "demo", "demo", "demo:q4"]
    assert sent[2]["temperature"] == 0.1 and sent[2]["max_tokens"] == 5
    assert manager.kept == [("demo", 120.0)]
    assert manager.in_flight == 0  # every acquire was released


@pytest.mark.anyio
async def test_errors_come_in_ollamas_shape() -> None:
    client, manager = _client()
    with pytest.raises(ollama.ResponseError) as unknown:
        await client.chat(model="nope:latest", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.status_code == 404 and "model 'nope:latest' not found" in unknown.value.error
    with pytest.raises(ollama.ResponseError, match="invalid profile") as invalid:
        await client.show("broken")
    assert invalid.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="options.temperature must be a number") as bad:
        await client.generate(model="demo", prompt="hi", options={"temperature": "warm"})
    assert bad.value.status_code == 400
    for call in (client.delete("demo"), client.copy("demo", "other"), client.create(model="x", from_="demo")):
        with pytest.raises(ollama.ResponseError, match="llmd manages models through profiles") as refused:
            await call
        assert refused.value.status_code == 400

    transport = httpx.ASGITransport(build_proxy_app(Proxy(manager), apis=[ollama_api(Proxy(manager))]))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://llmd.test") as raw:
        for method, path, body, status in (
            ("POST", "/api/chat", b"{not json", 400),
            ("POST", "/api/chat", b"[]", 400),
            ("POST", "/api/chat", b"{}", 400),
            ("GET", "/api/chat", b"", 405),
            ("GET", "/api/nope", b"", 404),
        ):
            response = await raw.request(method, path, content=body)
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert isinstance(error, str) and error, response.text
        assert (await raw.get("/")).text == "Ollama is running"
        assert (await raw.get("/api/version")).json()["version"]
        # curl -d sends a form Content-Type; Ollama reads the body as JSON anyway.
        form = {"content-type": "application/x-www-form-urlencoded"}
        response = await raw.post("/api/chat", content=b'{"model": "demo", "messages": [{"role": "user", "content": "x"}]}', headers=form)
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
        assert [json.loads(line)["done"] for line in response.text.splitlines()] == [False, False, True]


@pytest.mark.anyio
async def test_api_keys_apply_to_ollamas_routes() -> None:
    client, _ = _client(api_keys=(KEY,))
    assert [model.model for model in (await client.list()).models] == ["demo:latest", "demo:q4"]
    keyless, _ = _client(api_keys=(KEY,))
    keyless._client.headers.pop("authorization")
    with pytest.raises(ollama.ResponseError, match="authentication required") as refused:
        await keyless.list()
    assert refused.value.status_code == 401


# ----- a real daemon: llama-server and fastllm -----


def _check_generation(client: ollama.Client, model: str) -> None:
    """Chat and generate, whole and streamed, through the official client."""
    hi = [{"role": "user", "content": "hello"}]
    reply = client.chat(model=model, messages=hi, options={"num_predict": 4, "temperature": 0.5, "seed": 1})
    assert reply.done and reply.done_reason in ("stop", "length") and reply.message.role == "assistant"
    assert 1 <= (reply.eval_count or 0) <= 4 and (reply.prompt_eval_count or 0) >= 1
    assert (reply.total_duration or 0) > 0 and reply.created_at
    parts = list(client.chat(model=model, messages=hi, stream=True, options={"num_predict": 4}))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length") and not any(part.done for part in parts[:-1])
    assert 1 <= (parts[-1].eval_count or 0) <= 4
    generated = client.generate(model=model, prompt="Once upon a time", options={"num_predict": 3})
    assert generated.done and generated.response is not None and 1 <= (generated.eval_count or 0) <= 3
    streamed = list(client.generate(model=model, prompt="Once upon a time", stream=True, options={"num_predict": 3}))
    assert streamed[-1].done
    # A tool-use history (Home Assistant's way) goes through; the random model answers anything.
    tooled = client.chat(model=model, messages=TOOL_HISTORY, tools=[WEATHER_TOOL], options={"num_predict": 3})
    assert tooled.done


def _not_running(client: ollama.Client, model: str) -> bool:
    return all(entry.model != model for entry in client.ps().models)


@pytest.mark.engine
def test_llama_server_through_the_official_client(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    # llama-server serves embeddings only with --embeddings; the tiny model needs a pooling type too.
    profile = tiny_profile(tiny_gguf, aliases=["little"], extra_args=["--embeddings", "--pooling", "mean"])
    daemon = make_daemon({"tiny": profile})
    client = ollama.Client(host=daemon.url)

    (listed,) = client.list().models
    assert listed.model == "tiny:latest" and listed.size == tiny_gguf.stat().st_size
    assert listed.details is not None and listed.details.format == "gguf" and listed.details.family == "llama"
    assert listed.details.parameter_size and listed.details.quantization_level == "F32"
    shown = client.show("tiny:latest")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.template and "num_ctx 512" in (shown.parameters or "")
    assert shown.capabilities is not None and "embedding" in shown.capabilities

    _check_generation(client, "tiny")
    little = client.chat(model="little:latest", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1})
    assert little.model == "little:latest"

    embedded = client.embed(model="tiny", input=["a cat", "a dog"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 64
    assert len(client.embeddings(model="tiny", prompt="a cat").embedding) == 64

    (running,) = client.ps().models
    assert running.model == "tiny:latest" and running.context_length == 512 and running.size == tiny_gguf.stat().st_size
    assert running.size_vram == 0  # the tests run on the CPU

    metrics = httpx.get(daemon.url + "/metrics").text
    assert 'llmd_requests_total{code="200",endpoint="/api/chat",model="tiny"}' in metrics
    assert 'llmd_api_requests_total{api="ollama",code="200"}' in metrics
    assert 'llmd_completion_tokens_total{model="tiny"}' in metrics
    logged = json.loads(daemon.llmctl("requests", "--json").stdout)
    chats = [row for row in logged if row["path"] == "/api/chat"]
    assert chats and all(row["api"] == "ollama" and row["model"] == "tiny" for row in chats)
    assert any(row["stream"] and row["completion_tokens"] for row in chats)

    # keep_alive 0: the model is stopped once the reply is sent.
    client.generate(model="tiny", prompt="bye", keep_alive=0, options={"num_predict": 1})
    wait_until(lambda: _not_running(client, "tiny:latest"), timeout=30, what="tiny to be unloaded after keep_alive 0")
    assert daemon.state("tiny") == "stopped"
    # A request with nothing to answer loads the model; with keep_alive 0 it unloads it.
    assert client.generate(model="tiny").done_reason == "load"
    assert daemon.state("tiny") == "ready"
    assert client.chat(model="tiny", messages=[], keep_alive=0).done_reason == "unload"
    wait_until(lambda: daemon.state("tiny") == "stopped", timeout=30, what="tiny to be unloaded")


@pytest.mark.engine
def test_fastllm_through_the_official_client(make_daemon, fastllm_command: list[str], tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    config = f"[engines.fastllm]\ncommand = {json.dumps(fastllm_command)}\n"
    daemon = make_daemon({"fast": tiny_profile(tiny_gguf, engine="fastllm")}, extra_config=config)
    client = ollama.Client(host=daemon.url)

    assert [model.model for model in client.list().models] == ["fast:latest"]
    _check_generation(client, "fast:latest")
    (running,) = client.ps().models
    assert running.model == "fast:latest" and running.details is not None and running.details.family == "llama"
    assert client.show("fast").details is not None
    # fastllm serves no plain completions: a raw prompt is refused in the engine's words.
    with pytest.raises(ollama.ResponseError, match="does not serve /v1/completions") as refused:
        client.generate(model="fast", prompt="x", raw=True)
    assert refused.value.status_code == 404

    client.chat(model="fast", messages=[{"role": "user", "content": "bye"}], keep_alive=0, options={"num_predict": 1})
    wait_until(lambda: _not_running(client, "fast:latest"), timeout=30, what="fast to be unloaded after keep_alive 0")
