"""The request log: what the metrics middleware hands it for each request, `[server] request_log`
and `log_bodies`, `GET /v1/requests`, and a real daemon with llama-server behind API keys."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from conftest import BIN
from llmd.daemon.config import load_config
from llmd.daemon.errors import ConfigError
from llmd.daemon.http.metrics import MODEL_SCOPE_KEY, Metrics
from llmd.daemon.http.request_log import MAX_BODY_BYTES, RequestLog, RequestRecord
from llmd.daemon.util.request_cells import COLUMNS, format_seconds, request_cells
from llmd.daemon.web.playground import PlaygroundChat
from support import daemon_with_server_settings, fake_proxy_app

CHAT = "/v1/chat/completions"
KEY = "request-log-key-0123456789"
TIMINGS = {"prompt_n": 5, "cache_n": 3, "prompt_per_second": 400.0, "predicted_n": 4, "predicted_per_second": 25.0}


def _record(**fields: Any) -> RequestRecord:
    values: dict[str, Any] = {
        "time": 1_700_000_000.0, "api": "openai", "method": "POST", "path": CHAT, "model": "m", "status": 200,
        "client": "127.0.0.1", "stream": False, "ttft_s": None, "prompt_tokens": 3, "completion_tokens": 4,
        "duration_s": 0.5, "error": None,
    }
    return RequestRecord(**{**values, **fields})


# ----- the log itself -----


def test_the_log_keeps_the_last_n_newest_first() -> None:
    log = RequestLog(3)
    for status in (200, 201, 202, 203):
        log.add(_record(status=status))
    assert [r.status for r in log.newest()] == [203, 202, 201]
    assert [r.status for r in log.newest(2)] == [203, 202] and log.newest(0) == []
    assert [r.id for r in log.newest()] == [4, 3, 2]
    assert [r.status for r in log.after(2)] == [202, 203] and log.after(4) == [] and log.last_id() == 4
    assert [r.status for r in log.after(0)] == [201, 202, 203]  # older ones are gone
    assert log.newest()[0].to_json()["id"] == 4 and list(log.newest()[0].to_json())[0] == "id"


def test_a_log_of_size_0_keeps_nothing_and_is_not_installed() -> None:
    off = RequestLog(0, keep_bodies=True)
    assert not off.enabled and not off.keep_bodies
    metrics = Metrics(False, models=list, gpus=lambda: {"gpus": []})
    app = _engine()
    assert metrics.instrument(app, off) is app and metrics.instrument(app) is app
    assert metrics.instrument(app, RequestLog(5)) is not app  # the log alone needs the middleware


def test_the_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "llmd.toml"
    assert load_config(None).server.request_log == 200 and load_config(None).server.log_bodies is False
    path.write_text("[server]\nrequest_log = 0\nlog_bodies = true\n")
    server = load_config(path).server
    assert server.request_log == 0 and server.log_bodies is True
    for bad in ("-1", '"lots"', "1000000"):
        path.write_text(f"[server]\nrequest_log = {bad}\n")
        with pytest.raises(ConfigError, match="request_log"):
            load_config(path)


def test_cells_read_as_a_table_row() -> None:
    cells = request_cells(_record(stream=True, ttft_s=0.0851, duration_s=75.2, error="client_gone", status=499).to_json())
    assert list(cells) == list(COLUMNS)
    assert cells["endpoint"] == "chat/completions" and cells["ttft"] == "85 ms" and cells["duration"] == "1m15s"
    assert cells["status"] == "499 (client gone)" and cells["prompt"] == "3" and cells["generated"] == "4"
    odd = request_cells(_record(api=None, method="GET", path="/api/tags", model=None, client=None,
                                prompt_tokens=None, completion_tokens=None).to_json())
    assert (odd["api"], odd["endpoint"], odd["model"], odd["client"], odd["prompt"]) == ("-", "GET /api/tags", "-", "-", "-")
    assert format_seconds(None) == "-" and format_seconds(1.234) == "1.23 s"


# ----- what the middleware records -----


def _start(status: int = 200, stream: bool = False) -> dict[str, Any]:
    kind = b"text/event-stream" if stream else b"application/json"
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]}


def _body(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _engine(*messages: dict[str, Any], model: str | None = "m", pause: float = 0.0) -> Any:
    """An app that reads the body, names `model` as the proxy does, and sends `messages`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        if model is not None:
            scope[MODEL_SCOPE_KEY] = model
        for message in messages:
            if message["type"] == "http.response.body" and message["body"] and pause:
                await anyio.sleep(pause)
            await send(message)

    return app


async def _call(app: Any, log: RequestLog, *, metrics_on: bool = True, body: bytes = b'{"model": "m"}',
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """One request from 10.1.2.3 through the metrics middleware with `log`, the body in two pieces."""
    metrics = Metrics(metrics_on, models=list, gpus=lambda: {"gpus": []})
    scope = {"type": "http", "method": "POST", "path": CHAT, "headers": headers or [], "client": ("10.1.2.3", 5555)}
    half = len(body) // 2
    pieces = [{"type": "http.request", "body": body[half:], "more_body": False},
              {"type": "http.request", "body": body[:half], "more_body": True}]

    async def receive() -> dict[str, Any]:
        if pieces:
            return pieces.pop()
        await anyio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    await metrics.instrument(app, log)(scope, receive, send)


@pytest.mark.anyio
@pytest.mark.parametrize("metrics_on", [True, False])
async def test_a_stream_is_kept_with_its_time_to_first_token_and_tokens(metrics_on: bool) -> None:
    log = RequestLog(10)
    app = _engine(_start(stream=True), _body(_event({"choices": [{"delta": {"content": "hi"}}]})),
                  _body(_event({"choices": [], "timings": TIMINGS}) + b"data: [DONE]\n\n"), _body(b"", more=False),
                  pause=0.05)
    began = time.time()
    await _call(app, log, metrics_on=metrics_on)
    (record,) = log.newest()
    assert record.model == "m" and record.status == 200 and record.stream and record.api == "openai"
    assert record.client == "10.1.2.3" and record.method == "POST" and record.path == CHAT and record.error is None
    assert record.ttft_s is not None and 0.05 <= record.ttft_s < record.duration_s
    assert (record.prompt_tokens, record.completion_tokens) == (8, 4)  # from llama-server's timings
    assert began - 0.01 <= record.time <= began + 0.05  # when it arrived, not when it ended
    assert record.request_body is None and record.response_body is None  # log_bodies is off


@pytest.mark.anyio
async def test_a_whole_reply_has_usage_and_no_time_to_first_token() -> None:
    log = RequestLog(10)
    reply = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    await _call(_engine(_start(), _body(json.dumps(reply).encode(), more=False)), log)
    (record,) = log.newest()
    assert (record.prompt_tokens, record.completion_tokens, record.ttft_s, record.stream) == (7, 2, None, False)


@pytest.mark.anyio
async def test_bodies_are_kept_only_when_asked_and_cut_and_headers_never() -> None:
    secret = b"Bearer " + KEY.encode()
    headers = [(b"authorization", secret), (b"content-type", b"application/json")]
    reply = b'{"choices": [{"message": {"content": "hello"}}]}'
    prompt = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 10)}]}).encode()

    kept = RequestLog(10, keep_bodies=True)
    await _call(_engine(_start(), _body(reply[:10]), _body(reply[10:], more=False)), kept, body=prompt, headers=headers)
    (record,) = kept.newest()
    assert record.response_body == reply.decode()
    assert record.request_body is not None and record.request_body.startswith('{"model": "m"')
    assert f"cut: {len(prompt)} bytes in all, the first {MAX_BODY_BYTES} kept" in record.request_body
    assert len(record.request_body) < MAX_BODY_BYTES + 100

    plain = RequestLog(10)
    await _call(_engine(_start(), _body(reply, more=False)), plain, body=prompt, headers=headers)
    for log in (kept, plain):
        text = json.dumps([r.to_json() for r in log.newest()])
        assert KEY not in text and "Bearer" not in text and "authorization" not in text.lower()
    assert plain.newest()[0].request_body is None and plain.newest()[0].response_body is None


@pytest.mark.anyio
async def test_an_unknown_model_is_kept_under_the_name_asked_for() -> None:
    log = RequestLog(10)
    app, manager, engine = fake_proxy_app(names=("tiny",))
    metrics = Metrics(True, models=list, gpus=lambda: {"gpus": []})
    transport = httpx.ASGITransport(app=metrics.instrument(app, log), client=("10.9.8.7", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://llmd") as client:
        missing = await client.post(CHAT, json={"model": "nope", "messages": []})
        found = await client.post(CHAT, json={"model": "tiny", "messages": []})
        bad = await client.post(CHAT, content=b"not json", headers={"content-type": "application/json"})
        listed = await client.get("/v1/models")
    assert (missing.status_code, found.status_code, bad.status_code, listed.status_code) == (404, 200, 400, 200)
    records = log.newest()
    assert [(r.model, r.status, r.path, r.error) for r in records] == [
        (None, 200, "/v1/models", None), (None, 400, CHAT, "client_error"), ("tiny", 200, CHAT, None),
        ("nope", 404, CHAT, "client_error"),
    ]
    assert {r.client for r in records} == {"10.9.8.7"} and {r.api for r in records} == {"openai"}


@pytest.mark.anyio
async def test_the_playground_hands_the_proxy_only_the_body_and_its_type() -> None:
    seen: dict[str, Any] = {}

    async def proxy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    transport = httpx.ASGITransport(app=PlaygroundChat(proxy))
    async with httpx.AsyncClient(transport=transport, base_url="http://llmd") as client:
        reply = await client.post("/dashboard/playground/chat?x=1", json={"model": "m"}, headers={
            "authorization": f"Bearer {KEY}", "cookie": "llmd_session=abc", "x-other": "1",
        })
    assert reply.text == "ok"
    assert seen["path"] == CHAT and seen["raw_path"] == CHAT.encode() and seen["query_string"] == b""
    assert {name for name, _ in seen["headers"]} == {b"content-type", b"content-length", b"accept"}


# ----- a real daemon -----


def _tiny(model: Path) -> str:
    return f'engine = "llama-cpp"\n[model]\npath = "{model}"\n[launch]\nctx = 512\n[policy]\nttl = "30m"\n'


def _chat(daemon: Any, model: str, *, stream: bool, key: str | None = KEY) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(daemon.url + CHAT, json=body, headers=headers, timeout=120)


def _management(daemon: Any, path: str) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(daemon.socket))
    with httpx.Client(transport=transport, base_url="http://llmd", timeout=30) as client:
        return client.get(path)


@pytest.mark.engine
def test_the_request_log_of_a_real_daemon(make_daemon: Any, tiny_gguf: Path) -> None:
    daemon = daemon_with_server_settings(make_daemon, f'api_keys = ["{KEY}"]\n', {"tiny": _tiny(tiny_gguf)})
    for stream in (True, False, True):
        reply = _chat(daemon, "tiny", stream=stream)
        assert reply.status_code == 200, reply.text
    assert _chat(daemon, "nope", stream=False).status_code == 404
    assert _chat(daemon, "tiny", stream=False, key="wrong-key-0123456789").status_code == 401

    answer = _management(daemon, "/v1/requests")
    assert answer.status_code == 200
    body = answer.json()
    assert body["kept"] == 200 and body["bodies"] is False
    records = body["requests"]
    refused, missing, *chats = records
    assert (refused["status"], refused["model"], refused["prompt_tokens"]) == (401, None, None)
    assert (missing["status"], missing["model"], missing["api"]) == (404, "nope", "openai")
    assert missing["completion_tokens"] is None and missing["ttft_s"] is None
    assert [c["stream"] for c in chats] == [True, False, True]  # newest first
    for chat in chats:
        assert chat["status"] == 200 and chat["model"] == "tiny" and chat["path"] == CHAT and chat["api"] == "openai"
        assert chat["client"] == "127.0.0.1" and chat["error"] is None
        assert chat["prompt_tokens"] > 0 and chat["completion_tokens"] > 0 and chat["duration_s"] > 0
        assert (chat["ttft_s"] is not None) == chat["stream"]
        assert chat["ttft_s"] is None or 0 < chat["ttft_s"] <= chat["duration_s"]
        assert chat["request_body"] is None and chat["response_body"] is None  # log_bodies is off
    assert [r["id"] for r in records] == sorted((r["id"] for r in records), reverse=True)
    assert [r["id"] for r in _management(daemon, "/v1/requests?limit=2").json()["requests"]] == [r["id"] for r in records[:2]]
    assert _management(daemon, "/v1/requests?limit=-1").status_code == 400

    printed = daemon.llmctl("requests", "--json").stdout
    assert [r["id"] for r in json.loads(printed)] == [r["id"] for r in records]
    table = daemon.llmctl("requests", "-n", "2").stdout.splitlines()
    assert table[0].split()[:4] == ["TIME", "API", "MODEL", "ENDPOINT"] and len(table) == 3
    assert "401" in table[1] and "nope" in table[2] and "404" in table[2]
    for text in (answer.text, printed, "\n".join(table)):
        assert KEY not in text and "Bearer" not in text and "wrong-key" not in text

    # -f prints the last ones, then each new request as it finishes.
    follower = subprocess.Popen([str(BIN / "llmctl"), "--socket", str(daemon.socket), "requests", "-f", "--json", "-n", "1"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["id"] == records[0]["id"]
        assert _chat(daemon, "tiny", stream=True).status_code == 200
        latest = json.loads(follower.stdout.readline())
        assert latest["id"] > records[0]["id"] and latest["model"] == "tiny" and latest["ttft_s"] > 0
    finally:
        follower.terminate()
        follower.wait(timeout=10)


@pytest.mark.engine
def test_request_log_0_keeps_nothing(make_daemon: Any, tiny_gguf: Path) -> None:
    daemon = daemon_with_server_settings(make_daemon, "request_log = 0\nlog_bodies = true\n", {"tiny": _tiny(tiny_gguf)})
    assert _chat(daemon, "tiny", stream=True, key=None).status_code == 200
    assert _chat(daemon, "nope", stream=False, key=None).status_code == 404
    assert _management(daemon, "/v1/requests").json() == {"requests": [], "kept": 0, "bodies": False}
    assert json.loads(daemon.llmctl("requests", "--json").stdout) == []
    assert "request log is off" in daemon.llmctl("requests").stderr
    following = daemon.llmctl("requests", "-f", check=False)
    assert following.returncode == 1 and "nothing to follow" in following.stderr
    # The metrics still count what the log does not keep.
    assert 'llmd_requests_total{code="200",endpoint="/v1/chat/completions",model="tiny"} 1.0' in _management(daemon, "/metrics").text
