"""The proxy's request handling under arbitrary input: never a 5xx, always an OpenAI-shaped error.

Runs in-process against the real Starlette app with a fake manager and engine (tests/fakes.py).
"""

from __future__ import annotations

import json
import string
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from support import assert_openai_error, fake_proxy_app
from llmd.daemon.errors import EngineStartError, NoRoomError
from llmd.daemon.http.proxy import MAX_MODEL_CHARS, BadRequest, parse_request

KEY = "fuzz-key-0123456789"
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
content_types = st.none() | st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
     "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", ";", "json"]
) | st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=30)


# ----- parse_request -----


@given(body=st.binary(max_size=300), content_type=content_types)
def test_parse_model_returns_a_model_or_a_4xx(body: bytes, content_type: str | None) -> None:
    try:
        model = parse_request(body, content_type)[0]
    except BadRequest as exc:
        assert exc.status in (400, 415)
        assert exc.message
    else:
        assert isinstance(model, str) and 0 < len(model) <= MAX_MODEL_CHARS


@given(model=json_values, rest=st.dictionaries(st.text(max_size=8), json_values, max_size=3))
def test_parse_model_accepts_exactly_the_non_empty_string_models(model: object, rest: dict) -> None:
    body = json.dumps({**rest, "model": model}).encode()
    if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_CHARS:
        assert parse_request(body, "application/json")[0] == model
        return
    with pytest.raises(BadRequest) as caught:
        parse_request(body, "application/json")
    assert caught.value.status == 400 and caught.value.param == "model"
    assert "'model'" in caught.value.message


@given(payload=json_values.filter(lambda value: not isinstance(value, dict)))
def test_parse_model_rejects_bodies_that_are_not_objects(payload: object) -> None:
    with pytest.raises(BadRequest, match="must be a JSON object"):
        parse_request(json.dumps(payload).encode(), "application/json")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 200_000, "nested too deeply"),
        (b'{"model": "tiny", "n": ' + b"1" * 10_000 + b"}", "not valid JSON"),  # beyond Python's int digit limit
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"model": "tiny"} trailing', "not valid JSON"),
        (b'{"model": "' + b"m" * (MAX_MODEL_CHARS + 1) + b'"}', "longer than any model name"),
    ],
)
def test_parse_model_edge_cases(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        parse_request(body, "application/json")
    assert caught.value.status == 400


# ----- the whole app -----


@pytest.fixture(scope="module")
def open_app() -> Iterator[tuple[TestClient, object]]:
    app, manager, _ = fake_proxy_app()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, manager


@pytest.fixture(scope="module")
def keyed_app() -> Iterator[TestClient]:
    app, _, _ = fake_proxy_app(api_keys=[KEY, "second-key-abcdefgh"])
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
paths = st.sampled_from(ROUTES) | st.text(alphabet=string.ascii_letters + string.digits + "/._-~%", max_size=40).map(
    lambda text: "/" + text
)
header_names = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=20).filter(
    lambda name: name not in ("content-length", "transfer-encoding", "host", "connection")
)
# Any byte a header value may carry on the wire (HTTP allows obs-text), as raw latin-1 bytes.
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40
).map(lambda text: text.encode("latin-1"))
models = st.sampled_from(["tiny", "nope", "", "../etc", "a/b"]) | json_values
bodies = (
    st.binary(max_size=500)
    | st.builds(lambda model, rest: json.dumps({**rest, "model": model}).encode(), models,
                st.dictionaries(st.text(max_size=8), json_values, max_size=3))
    | st.builds(lambda model: json.dumps({"model": model, "stream": True}).encode(), models)
)
fuzz_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _assert_not_a_crash(response: httpx.Response, method: str) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and method != "HEAD":
        assert_openai_error(response)


@fuzz_settings
@given(method=methods, path=paths, body=bodies, content_type=content_types,
       headers=st.dictionaries(header_names, header_values, max_size=4))
def test_any_request_gets_a_reply_or_an_openai_error(open_app, method, path, body, content_type, headers) -> None:  # type: ignore[no-untyped-def]
    client, manager = open_app
    if content_type is not None:
        headers["content-type"] = content_type
    response = client.request(method, path, content=body, headers=headers)
    _assert_not_a_crash(response, method)
    assert manager.in_flight == 0  # every acquire was released, whatever happened


def test_a_header_value_above_ascii_reaches_the_engine(open_app) -> None:  # type: ignore[no-untyped-def]
    client, manager = open_app
    headers = {"content-type": "application/json", "x-odd": b"\x80\xff"}
    response = client.post("/v1/chat/completions", content=b'{"model":"tiny"}', headers=headers)
    assert response.status_code == 200, response.text
    # (The test client re-encodes the value as UTF-8 on its way in; the proxy passes on the bytes it got.)
    odd = [value for name, value in manager.engine.requests[-1].headers.raw if name == b"x-odd"]
    assert odd and max(odd[0]) > 0x7F


@fuzz_settings
@given(method=methods, path=paths, body=bodies, authorization=st.none() | header_values | header_values.map(lambda v: b"Bearer " + v))
def test_without_the_key_every_request_gets_401(keyed_app, method, path, body, authorization) -> None:  # type: ignore[no-untyped-def]
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    response = keyed_app.request(method, path, content=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    if method != "HEAD":
        assert "[server] api_keys" in assert_openai_error(response, 401)


@fuzz_settings
@given(method=methods, path=paths, body=bodies)
def test_with_the_key_nothing_is_refused_for_auth(keyed_app, method, path, body) -> None:  # type: ignore[no-untyped-def]
    headers = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    response = keyed_app.request(method, path, content=body, headers=headers)
    assert response.status_code != 401
    _assert_not_a_crash(response, method)


# ----- engine-side failures and slow or vanishing clients -----


def _chat(client: TestClient, model: str = "tiny") -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": []})


def test_no_room_is_503_with_retry_after() -> None:
    app, manager, _ = fake_proxy_app()
    manager.acquire_error = NoRoomError("'tiny' needs 8000 MiB and 3000 MiB are free; unload a model", retry_after=17)
    with TestClient(app) as client:
        response = _chat(client)
    assert "unload a model" in assert_openai_error(response, 503)
    assert response.headers["retry-after"] == "17"
    assert response.json()["error"]["code"] == "no_room"


def test_engine_that_cannot_start_is_503_without_retry_after() -> None:
    app, manager, _ = fake_proxy_app()
    manager.acquire_error = EngineStartError("engine for 'tiny' exited with code 1")
    with TestClient(app) as client:
        response = _chat(client)
    assert "exited with code 1" in assert_openai_error(response, 503)
    assert "retry-after" not in response.headers


def test_a_fault_of_llmds_own_is_a_500_in_openais_shape_and_the_traceback_is_logged(caplog) -> None:  # type: ignore[no-untyped-def]
    app, manager, _ = fake_proxy_app()
    bug = RuntimeError("a bug")
    manager.acquire_error = bug
    with TestClient(app) as client:
        response = _chat(client)
        message = assert_openai_error(response, 500)
        manager.acquire_error = None
        assert _chat(client).status_code == 200  # the next request is served
    # Generic: the exception's text stays in the daemon's log, with its traceback.
    assert message == "llmd failed on POST /v1/chat/completions; the daemon's log has the details"
    assert "a bug" not in response.text and "RuntimeError" not in response.text
    failures = [record for record in caplog.records if record.name.startswith("llmd") and record.exc_info is not None]
    assert len(failures) == 1 and "POST /v1/chat/completions" in failures[0].getMessage()
    assert failures[0].exc_info is not None and failures[0].exc_info[1] is bug


def test_a_fault_on_a_route_that_names_no_model_is_a_500_in_openais_shape() -> None:
    app, manager, _ = fake_proxy_app()
    manager.profiles = None  # listing the models now fails
    # Starlette raises the error again once the 500 is sent, for the server to log.
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/models")
    assert assert_openai_error(response, 500) == "llmd failed on GET /v1/models; the daemon's log has the details"
    assert "AttributeError" not in response.text


def test_wrong_method_says_which_to_use() -> None:
    app, _, _ = fake_proxy_app()
    with TestClient(app) as client:
        response = client.get("/v1/chat/completions")
    assert "method GET is not allowed on /v1/chat/completions; use POST" in assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"


@pytest.mark.anyio
async def test_a_body_that_trickles_in_gets_408_and_never_reaches_the_manager() -> None:
    app, manager, _ = fake_proxy_app(body_timeout=0.3)

    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"model": '
        await anyio.sleep(5)
        yield b'"tiny"}'

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://llmd.invalid") as client:
        with anyio.fail_after(3):
            response = await client.post("/v1/chat/completions", content=trickle(), headers={"content-type": "application/json"})
    assert "did not arrive within 0.3s" in assert_openai_error(response, 408)
    assert response.headers["connection"] == "close"
    assert manager.acquired == 0


@pytest.mark.anyio
async def test_a_client_that_leaves_while_the_engine_works_releases_the_model() -> None:
    app, manager, engine = fake_proxy_app()
    engine.hold = anyio.Event()  # never set: the engine is still generating when the client leaves
    body = json.dumps({"model": "tiny", "messages": []}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    disconnected = anyio.Event()
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8808)}
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(app, scope, receive, send)
            while not engine.requests:
                await anyio.sleep(0.01)
            assert manager.in_flight == 1
            disconnected.set()
    assert manager.in_flight == 0
    assert sent[0]["status"] == 499  # never delivered: the client is gone
