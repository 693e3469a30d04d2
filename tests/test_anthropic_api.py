"""Anthropic's Messages API (and OpenAI's Responses passed through) on the proxy listener, checked
with the official `anthropic` client, unchanged.

- In-process: the translation both ways (requests, whole replies, streams), and the real proxy app
  over a scripted OpenAI engine, for the translated path, the pass-through path (an engine
  whose driver declares the routes), errors in Anthropic's shape, API keys and the metrics.
  The tool-use round trip runs here, against the scripted engine: the tiny random-weight
  models never choose to call a tool.
- Real engines: llama-server serves the routes itself (messages streamed and not, token counts,
  a tool-use history through its jinja template, /v1/responses); fastllm goes through the
  translation (messages streamed and not, a tool-use history) and has no token counting.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import httpx
import openai
import pytest
from starlette.testclient import TestClient

from conftest import tiny_profile
from llmd.daemon.errors import NoRoomError
from llmd.daemon.http.anthropic import anthropic_api
from llmd.daemon.http.anthropic_translate import (
    SseReader,
    StreamTranslator,
    TranslationError,
    to_anthropic_message,
    to_openai_request,
)
from llmd.daemon.http.metrics import Metrics
from llmd.daemon.http.proxy import Proxy, build_proxy_app
from llmd.daemon.http.request_log import RequestLog
from llmd.daemon.http.responses_api import responses_api
from llmd.drivers.base import ANTHROPIC_COUNT_TOKENS, ANTHROPIC_MESSAGES, OPENAI_RESPONSES, native_routes
from support import FakeEngine, FakeManager, daemon_with_server_settings

KEY = "k-0123456789abcdef"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


# ----- the translation, request side -----


def test_a_request_becomes_a_chat_completion_request() -> None:
    payload = {
        "model": "claude-ish",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "stream": True,
        "messages": [
            {"role": "user", "content": "What is in this picture?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Let me look."}]},
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}},
                {"type": "text", "text": "There."},
            ]},
        ],
    }
    request = to_openai_request(payload, "tiny")
    assert request == {
        "model": "tiny",
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Be brief.\n\nBe kind."},
            {"role": "user", "content": "What is in this picture?"},
            {"role": "assistant", "content": "Let me look."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PIXEL}"}},
                {"type": "text", "text": "There."},
            ]},
        ],
    }


def test_tools_and_their_results_become_openai_tool_calls() -> None:
    payload = {
        "model": "m",
        "max_tokens": 10,
        "system": "You check the weather.",
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "x"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no such city", "is_error": True},
                {"type": "text", "text": "And tomorrow?"},
            ]},
        ],
    }
    request = to_openai_request(payload, "m")
    assert request["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_TOOL["input_schema"],
    }}]
    assert request["tool_choice"] == "required" and request["parallel_tool_calls"] is False
    assert request["messages"][1:] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        # The tool results come first, right after the assistant's calls, as OpenAI wants them.
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no such city"},
        {"role": "user", "content": "And tomorrow?"},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "tool", "name": "get_weather"}, {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    request = to_openai_request({"messages": [], "tools": [WEATHER_TOOL], "tool_choice": choice}, "m")
    assert {key: request[key] for key in expected} == expected and "parallel_tool_calls" not in request


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "request body has no 'messages' field"),
        ({"messages": [{"role": "system", "content": "x"}]}, "'messages.0.role' must be \"user\" or \"assistant\""),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "content blocks of type 'document'"),
        ({"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool 'web_search_20250305'"),
        ({"messages": [], "tool_choice": {"type": "tool"}}, "'tool_choice.type' must be"),
        ({"messages": [], "stop_sequences": "END"}, "'stop_sequences' must be an array of strings"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
         "'messages.0.content.0.source.type' must be \"base64\" or \"url\""),
    ],
)
def test_requests_that_cannot_be_translated_say_what_to_change(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(TranslationError, match=re.escape(message)):
        to_openai_request(payload, "m")


# ----- the translation, reply side -----


def test_a_chat_completion_becomes_a_message() -> None:
    reply = {
        "choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}},
        ]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 20}},
    }
    message = to_anthropic_message(reply, "tiny")
    assert message["id"].startswith("msg_") and message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "tiny" and message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    text, first, second = message["content"]
    assert text == {"type": "text", "text": "Let me check."}
    assert first == {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {"city": "Paris"}}
    assert second["id"].startswith("toolu_") and second["input"] == {"arguments": "not json"}
    # Anthropic counts the prompt read from the cache apart from the rest of the input.
    assert message["usage"] == {"input_tokens": 10, "output_tokens": 7, "cache_read_input_tokens": 20, "cache_creation_input_tokens": 0}


@pytest.mark.parametrize(("finish", "reason"), [("stop", "end_turn"), ("length", "max_tokens"), (None, "end_turn")])
def test_stop_reasons(finish: str | None, reason: str) -> None:
    reply = {"choices": [{"finish_reason": finish, "message": {"content": "hi"}}]}
    assert to_anthropic_message(reply, "m")["stop_reason"] == reason


def _events(stream: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in stream.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_a_streamed_chat_completion_becomes_anthropic_events() -> None:
    translator = StreamTranslator("tiny")
    chunks = [
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "Let me "}}]},
        {"choices": [{"delta": {"content": "check."}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9}},
    ]
    stream = translator.start() + b"".join(translator.chunk(chunk) for chunk in chunks) + translator.finish()
    events = _events(stream)
    assert [name for name, _ in events] == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["model"] == "tiny" and events[0][1]["message"]["content"] == []
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [e[1]["delta"] for e in events[3:5]] == [{"type": "text_delta", "text": "Let me "}, {"type": "text_delta", "text": "check."}]
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    assert "".join(e[1]["delta"]["partial_json"] for e in events[7:9]) == '{"city": "Paris"}'
    assert all(e[1]["index"] == 1 for e in events[6:10])
    assert events[10][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[10][1]["usage"]["input_tokens"] == 12 and events[10][1]["usage"]["output_tokens"] == 9


def test_sse_reader_joins_events_split_across_pieces() -> None:
    reader = SseReader()
    assert list(reader.feed(b'data: {"a"')) == []
    assert list(reader.feed(b': 1}\r\n\r\ndata: [DONE]\n\n: comment\n\n')) == ['{"a": 1}', "[DONE]"]


# ----- the proxy app, in-process, over a scripted OpenAI engine -----


# An Anthropic stream as llama-server sends it when its first token is part of a character: with
# no message_start.
NATIVE_STREAM_WITHOUT_START = b"".join(
    f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
    for event in (
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "native"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None}, "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    )
)


class ScriptedEngine(FakeEngine):
    """An OpenAI (and, where `native`, Anthropic) server with scripted answers: a chat request
    with tools whose last message is the user's calls `get_weather`; any other answers text.
    Every request is kept, so tests see what the engine was sent."""

    answer_text = "It is sunny in Paris."

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content)
        path = request.url.path
        if path == "/v1/messages" and body.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=NATIVE_STREAM_WITHOUT_START)
        if path == "/v1/messages":
            return httpx.Response(200, json={"type": "message", "native": True, "content": [], "usage": {"input_tokens": 4, "output_tokens": 2}})
        if path == "/v1/messages/count_tokens":
            return httpx.Response(200, json={"input_tokens": 42})
        if path == "/v1/responses":
            return httpx.Response(200, json={"object": "response", "output": []})
        if body.get("model") == "overloaded":
            return httpx.Response(429, json={"error": {"message": "the engine is busy", "type": "rate_limit"}})
        calls_tool = bool(body.get("tools")) and body["messages"][-1]["role"] == "user"
        if body.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._stream(calls_tool))
        message: dict[str, Any] = {"role": "assistant", "content": None if calls_tool else self.answer_text}
        if calls_tool:
            message["tool_calls"] = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls_tool else "stop"}
        usage = {"prompt_tokens": 25, "completion_tokens": 6, "prompt_tokens_details": {"cached_tokens": 5}}
        return httpx.Response(200, json={"object": "chat.completion", "choices": [choice], "usage": usage})

    def _stream(self, calls_tool: bool) -> bytes:
        if calls_tool:
            deltas: list[dict[str, Any]] = [
                {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": ': "Paris"}'}}]},
            ]
        else:
            deltas = [{"content": word} for word in ("It is ", "sunny ", "in Paris.")]
        chunks = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in deltas]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if calls_tool else "stop"}]})
        chunks.append({"choices": [], "usage": {"prompt_tokens": 25, "completion_tokens": 6}})
        return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


class NativeDriver:
    name = "native"
    native_routes = frozenset({ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS, OPENAI_RESPONSES})


class ScriptedManager(FakeManager):
    """The test support's manager, with the engine each profile runs on and their drivers:
    "tiny" runs on an engine llmd translates for, "native" on one serving Anthropic's routes."""

    def __init__(self, engine: FakeEngine, names: Sequence[str]) -> None:
        super().__init__(engine, names)
        for name, profile in self.profiles.profiles.items():
            profile.engine = "native" if name == "native" else "plain"  # type: ignore[attr-defined]
        self.drivers = {"native": NativeDriver(), "plain": SimpleNamespace(name="plain")}


def _app(api_keys: Sequence[str] = (), metrics: Metrics | None = None, requests: RequestLog | None = None):  # type: ignore[no-untyped-def]
    engine = ScriptedEngine()
    manager = ScriptedManager(engine, ("tiny", "native", "overloaded"))
    proxy = Proxy(manager)  # type: ignore[arg-type]
    app = build_proxy_app(proxy, api_keys, apis=[anthropic_api(proxy), responses_api(proxy)])
    if metrics is not None:
        app = metrics.instrument(app, requests)
    return app, manager, engine


@pytest.fixture
def scripted() -> Iterator[tuple[anthropic.Anthropic, ScriptedManager, ScriptedEngine, TestClient]]:
    app, manager, engine = _app()
    with TestClient(app) as http:
        client = anthropic.Anthropic(base_url="http://testserver", api_key="unused", http_client=http, max_retries=0)
        yield client, manager, engine, http


def _sent(engine: ScriptedEngine) -> dict[str, Any]:
    return json.loads(engine.requests[-1].content)


def test_a_message_through_the_translation(scripted) -> None:  # type: ignore[no-untyped-def]
    client, manager, engine, _ = scripted
    # Sampling settings the client has no argument for go in `extra_body`, as Anthropic's API takes them.
    message = client.messages.create(
        model="tiny", max_tokens=32, system="Be brief.", stop_sequences=["\n\n"], extra_body={"temperature": 0.1, "top_k": 3},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert message.content[0].type == "text" and message.content[0].text == ScriptedEngine.answer_text
    assert message.stop_reason == "end_turn" and message.model == "tiny"
    assert (message.usage.input_tokens, message.usage.output_tokens, message.usage.cache_read_input_tokens) == (20, 6, 5)
    (request,) = engine.requests
    assert request.url.path == "/v1/chat/completions"
    sent = _sent(engine)
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (sent["max_tokens"], sent["temperature"], sent["top_k"], sent["stop"]) == (32, 0.1, 3, ["\n\n"])
    assert manager.in_flight == 0


def test_a_streamed_message_through_the_translation(scripted) -> None:  # type: ignore[no-untyped-def]
    client, manager, engine, _ = scripted
    with client.messages.stream(model="tiny", max_tokens=32, messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == ScriptedEngine.answer_text == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 6 and final.usage.input_tokens == 25
    assert _sent(engine)["stream_options"] == {"include_usage": True}
    assert manager.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_use_round_trip_through_the_translation(scripted, stream: bool) -> None:  # type: ignore[no-untyped-def]
    client, _, engine, _ = scripted
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
    asked = {"model": "tiny", "max_tokens": 64, "tools": [WEATHER_TOOL], "tool_choice": {"type": "auto"}}
    if stream:
        with client.messages.stream(**asked, messages=messages) as events:  # type: ignore[arg-type]
            kinds = {event.type for event in events}
            first = events.get_final_message()
        assert "input_json" in kinds  # the arguments arrived as input_json_delta events
    else:
        first = client.messages.create(**asked, messages=messages)  # type: ignore[arg-type]
    assert first.stop_reason == "tool_use"
    (call,) = [block for block in first.content if block.type == "tool_use"]
    assert (call.id, call.name, call.input) == ("call_1", "get_weather", {"city": "Paris"})
    assert _sent(engine)["tools"][0]["function"]["name"] == "get_weather"
    assert _sent(engine)["tool_choice"] == "auto"

    messages += [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 24 C"}]},
    ]
    second = client.messages.create(**asked, messages=messages)  # type: ignore[arg-type]
    assert second.stop_reason == "end_turn" and second.content[0].text == ScriptedEngine.answer_text
    sent = _sent(engine)["messages"]
    assert sent[-2]["tool_calls"][0]["id"] == "call_1"
    assert json.loads(sent[-2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert sent[-1] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}


def test_an_engine_that_serves_the_routes_gets_the_request_as_it_came(scripted) -> None:  # type: ignore[no-untyped-def]
    client, _, engine, _ = scripted
    raw = client.messages.with_raw_response.create(model="native", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert raw.http_response.json()["native"] is True  # the engine's own reply, relayed
    assert engine.requests[-1].url.path == "/v1/messages"
    assert _sent(engine) == {"model": "native", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    assert engine.requests[-1].headers["anthropic-version"]  # the client's own headers go along
    assert client.messages.count_tokens(model="native", messages=[{"role": "user", "content": "hi"}]).input_tokens == 42
    assert engine.requests[-1].url.path == "/v1/messages/count_tokens"


def test_a_native_stream_without_message_start_gets_one(scripted) -> None:  # type: ignore[no-untyped-def]
    client, manager, _, _ = scripted
    with client.messages.stream(model="native", max_tokens=1, messages=[{"role": "user", "content": "hi"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and final.content[0].text == "native" and final.model == "native"
    assert final.stop_reason == "max_tokens" and manager.in_flight == 0


def test_counting_tokens_on_an_engine_that_cannot_is_a_404_naming_it(scripted) -> None:  # type: ignore[no-untyped-def]
    client, manager, engine, _ = scripted
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "model 'tiny' runs on the plain engine, which does not serve POST /v1/messages/count_tokens" in caught.value.message
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert engine.requests == [] and manager.acquired == 0  # nothing was loaded to say so


def test_responses_pass_through_or_a_404_naming_the_engine(scripted) -> None:  # type: ignore[no-untyped-def]
    _, _, engine, http = scripted
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    assert client.responses.create(model="native", input="hi").object == "response"
    assert engine.requests[-1].url.path == "/v1/responses"
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="tiny", input="hi")
    assert "model 'tiny' runs on the plain engine, which does not serve POST /v1/responses" in str(caught.value)
    assert caught.value.body["code"] == "route_not_served"  # type: ignore[index]


def test_errors_come_in_anthropics_shape(scripted) -> None:  # type: ignore[no-untyped-def]
    client, manager, _, http = scripted
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.NotFoundError, match="model 'nope' does not exist"):
        client.messages.create(model="nope", max_tokens=5, messages=hi)  # type: ignore[arg-type]
    with pytest.raises(anthropic.BadRequestError, match="'messages.0.role' must be"):
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "robot", "content": "x"}])  # type: ignore[arg-type]
    with pytest.raises(anthropic.RateLimitError, match="the engine is busy"):  # the engine's own error, reshaped
        client.messages.create(model="overloaded", max_tokens=5, messages=hi)  # type: ignore[arg-type]
    manager.acquire_error = NoRoomError("no room for 'tiny' now", retry_after=7)
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(model="tiny", max_tokens=5, messages=hi)  # type: ignore[arg-type]
    assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "no room for 'tiny' now"}}

    raw = http.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["type"] == "error"
    assert raw.json()["error"]["type"] == "invalid_request_error" and "not valid JSON" in raw.json()["error"]["message"]
    wrong = http.get("/v1/messages")
    assert wrong.status_code == 405 and wrong.json()["error"] == {
        "type": "invalid_request_error", "message": "method GET is not allowed on /v1/messages; use POST"
    }


def test_api_keys_are_accepted_as_x_api_key_or_bearer_and_never_forwarded() -> None:
    app, _, engine = _app(api_keys=[KEY])
    hi = [{"role": "user", "content": "hi"}]
    with TestClient(app) as http:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            anthropic.Anthropic(base_url="http://testserver", api_key="k-wrong-wrong", http_client=http, max_retries=0).messages.create(
                model="tiny", max_tokens=5, messages=hi  # type: ignore[arg-type]
            )
        assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        assert "was not accepted" in caught.value.message and "k-wrong" not in caught.value.message
        refused = http.post("/v1/messages", json={"model": "tiny", "messages": hi}, headers={"x-api-key": "k-wrong-wrong"})
        assert refused.status_code == 401 and refused.json()["type"] == "error"
        assert refused.json()["error"]["message"].startswith("the x-api-key header was not accepted")
        assert engine.requests == []

        # This client sends its key as a Bearer token; others (Claude Code) send x-api-key.
        bearer = anthropic.Anthropic(base_url="http://testserver", api_key=KEY, http_client=http, max_retries=0)
        assert bearer.messages.create(model="tiny", max_tokens=5, messages=hi).content  # type: ignore[arg-type]
        header = anthropic.Anthropic(
            base_url="http://testserver", api_key=None, default_headers={"x-api-key": KEY}, http_client=http, max_retries=0
        )
        assert header.messages.create(model="native", max_tokens=5, messages=hi)  # type: ignore[arg-type]
        assert len(engine.requests) == 2
        for request in engine.requests:
            assert KEY.encode() not in b"".join(k + v for k, v in request.headers.raw)
            assert "x-api-key" not in request.headers and "authorization" not in request.headers

        # Every route takes either header; the OpenAI routes keep OpenAI's 401.
        assert http.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200
        refused = http.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert "'Authorization: Bearer SECRET' (or 'x-api-key: SECRET')" in refused.json()["error"]["message"]


def test_requests_are_counted_by_api_with_their_tokens() -> None:
    metrics = Metrics(True, models=list, gpus=lambda: {"gpus": []})
    requests = RequestLog(10)
    app, _, _ = _app(metrics=metrics, requests=requests)
    hi = [{"role": "user", "content": "hi"}]
    with TestClient(app) as http:
        client = anthropic.Anthropic(base_url="http://testserver", api_key="unused", http_client=http, max_retries=0)
        client.messages.create(model="tiny", max_tokens=5, messages=hi)  # type: ignore[arg-type]
        with client.messages.stream(model="tiny", max_tokens=5, messages=hi) as stream:  # type: ignore[arg-type]
            stream.until_done()
        client.messages.create(model="native", max_tokens=5, messages=hi)  # type: ignore[arg-type]

    def value(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0.0

    assert value("llmd_api_requests_total", api="anthropic", code="200") == 3
    assert value("llmd_requests_total", model="tiny", endpoint="/v1/messages", code="200") == 2
    # The engine's own counts, though the replies were translated (25 + 25 prompt tokens, 6 + 6
    # generated), and the native engine's Anthropic usage (4 + 2).
    assert value("llmd_prompt_tokens_total", model="tiny") == 50 and value("llmd_completion_tokens_total", model="tiny") == 12
    assert value("llmd_prompt_tokens_total", model="native") == 4 and value("llmd_completion_tokens_total", model="native") == 2
    records = requests.newest()
    assert [r.api for r in records] == ["anthropic"] * 3
    assert records[1].stream and records[1].prompt_tokens == 25 and records[1].completion_tokens == 6


def test_an_anthropic_stream_with_both_usages_in_one_chunk_counts_both() -> None:
    from llmd.daemon.http.metrics import _EngineReport

    report = _EngineReport()
    report.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":3,"cache_read_input_tokens":17,"output_tokens":0}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":9}}\n\n'
    )
    assert report.token_counts() == (20.0, 9.0)


def test_the_builtin_drivers_declare_what_their_engines_serve() -> None:
    from llmd.drivers.fastllm import FastllmDriver
    from llmd.drivers.llama_cpp import LlamaCppDriver
    from llmd.drivers.vllm import VllmDriver

    every = {ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS, OPENAI_RESPONSES}
    assert native_routes(LlamaCppDriver()) == every and native_routes(VllmDriver()) == every  # type: ignore[arg-type]
    assert native_routes(FastllmDriver()) == {OPENAI_RESPONSES}  # type: ignore[arg-type]
    assert native_routes(SimpleNamespace(native_routes={"/admin", ANTHROPIC_MESSAGES})) == {ANTHROPIC_MESSAGES}  # type: ignore[arg-type]
    assert native_routes(SimpleNamespace()) == frozenset()  # type: ignore[arg-type]


# ----- real engines -----

# ChatML with tools, in the style of Qwen 2.5's template: llama-server (with --jinja) renders a
# tool-use history through it and recognises its tool-call format.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{%- endif %}"
    "# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Call a tool as <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant{%- if message.content %}\n{{ message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "\n<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
TOOL_HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 24 C"}]},
]


def _check_messages(client: anthropic.Anthropic, model: str) -> None:
    """A message, whole and streamed, with a system prompt and sampling settings."""
    asked: dict[str, Any] = {
        "model": model, "max_tokens": 8, "system": [{"type": "text", "text": "Be brief."}], "stop_sequences": ["\n\n\n"],
        "extra_body": {"temperature": 0.7, "top_p": 0.9, "top_k": 20}, "messages": [{"role": "user", "content": "hello"}],
    }
    message = client.messages.create(**asked)
    assert message.type == "message" and message.role == "assistant" and message.model == model
    assert message.stop_reason in ("end_turn", "max_tokens", "stop_sequence")
    # Random weights may pick the end token early; never more than asked for.
    assert 1 <= message.usage.output_tokens <= 8 and message.usage.input_tokens >= 1
    with client.messages.stream(**asked) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert final.stop_reason in ("end_turn", "max_tokens", "stop_sequence") and 1 <= final.usage.output_tokens <= 8


@pytest.mark.engine
def test_llama_server_serves_messages_itself(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    profile = tiny_profile(tiny_gguf, aliases=["claude-tiny"], extra_args=["--jinja", "--chat-template-file", str(template)])
    daemon = daemon_with_server_settings(make_daemon, f'api_keys = ["{KEY}"]\n', {"tiny": profile})
    client = anthropic.Anthropic(base_url=daemon.url, api_key=KEY, max_retries=0)

    _check_messages(client, "tiny")
    alias = client.messages.create(model="claude-tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert alias.model == "tiny"  # the engine answered under the profile's name

    hi = [{"role": "user", "content": "hi"}]
    plain = client.messages.count_tokens(model="tiny", messages=hi).input_tokens  # type: ignore[arg-type]
    assert plain > 1  # the chat template's tokens are counted too
    with_tools = client.messages.count_tokens(model="tiny", messages=hi, tools=[WEATHER_TOOL]).input_tokens  # type: ignore[arg-type, list-item]
    assert with_tools > plain + 20  # the template lists the tools in the prompt

    # A tool-use history goes through llama-server's jinja template (the random model answers anything).
    reply = client.messages.create(model="tiny", max_tokens=4, tools=[WEATHER_TOOL], messages=TOOL_HISTORY)  # type: ignore[arg-type, list-item]
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    history = client.messages.count_tokens(model="tiny", tools=[WEATHER_TOOL], messages=TOOL_HISTORY).input_tokens  # type: ignore[arg-type, list-item]
    assert history > with_tools  # the call and its result are in the prompt

    with pytest.raises(anthropic.NotFoundError, match="model 'nope' does not exist"):
        client.messages.create(model="nope", max_tokens=2, messages=hi)  # type: ignore[arg-type]

    responses = openai.OpenAI(base_url=daemon.url + "/v1", api_key=KEY, max_retries=0)
    response = responses.responses.create(model="tiny", input="hi", max_output_tokens=4)
    assert response.object == "response" and response.model == "tiny"

    metrics = httpx.get(daemon.url + "/metrics", headers={"x-api-key": KEY}).text
    assert 'llmd_api_requests_total{api="anthropic",code="200"}' in metrics
    assert 'llmd_requests_total{code="200",endpoint="/v1/messages",model="tiny"}' in metrics
    logs = daemon.log() + (daemon.state_dir / "logs" / "tiny.log").read_text()
    assert KEY not in logs


@pytest.mark.engine
def test_fastllm_answers_messages_through_the_translation(make_daemon, fastllm_command: list[str], tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    config = f"[engines.fastllm]\ncommand = {json.dumps(fastllm_command)}\n"
    daemon = make_daemon({"fast": tiny_profile(tiny_gguf, engine="fastllm")}, extra_config=config)
    client = anthropic.Anthropic(base_url=daemon.url, api_key="unused", max_retries=0)

    _check_messages(client, "fast")
    image = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PIXEL}}]
    # A tool-use history, translated to OpenAI's tool calls and tool messages, which fastllm takes.
    reply = client.messages.create(model="fast", max_tokens=4, tools=[WEATHER_TOOL], tool_choice={"type": "auto"}, messages=TOOL_HISTORY)  # type: ignore[arg-type, list-item]
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use") and reply.usage.output_tokens >= 1
    with pytest.raises(anthropic.NotFoundError, match="runs on the fastllm engine, which does not serve POST /v1/messages/count_tokens"):
        client.messages.count_tokens(model="fast", messages=[{"role": "user", "content": "hi"}])
    # A text-only engine refuses an image in its own words, passed on in Anthropic's shape.
    try:
        client.messages.create(model="fast", max_tokens=2, messages=[{"role": "user", "content": image}])  # type: ignore[arg-type, list-item]
    except anthropic.APIStatusError as exc:
        assert exc.body["type"] == "error" and exc.body["error"]["message"]  # type: ignore[index]

    # OpenAI's Responses, which fastllm serves itself.
    response = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0).responses.create(
        model="fast", input="hi", max_output_tokens=4
    )
    assert response.object == "response"
