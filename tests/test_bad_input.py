"""Bad input, never a crash: every case gets a clear 4xx or CLI error, and the daemon keeps serving.

Each test runs a real daemon with a real llama-server, sends it one kind of bad input, checks the
status and the message, then checks that a normal chat request still succeeds and that nothing
raised inside the daemon.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import BIN, tiny_profile, wait_until
from support import assert_openai_error, daemon_with_server_settings

pytestmark = pytest.mark.engine

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
JSON = {"content-type": "application/json"}
MiB = 1024 * 1024


def assert_still_serves(daemon) -> None:  # type: ignore[no-untyped-def]
    """The daemon is alive, answers a normal chat request, and logged no traceback."""
    response = httpx.post(daemon.url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    assert daemon.process.poll() is None
    assert "Traceback" not in daemon.log(), daemon.log()


@pytest.fixture
def daemon(make_daemon, tiny_gguf: Path):  # type: ignore[no-untyped-def]
    return make_daemon({"tiny": tiny_profile(tiny_gguf, ctx=4096)})


# ----- requests -----


def _post(body: bytes, headers: dict[str, str] = JSON) -> tuple[str, str, bytes, dict[str, str]]:
    return "POST", "/v1/chat/completions", body, headers


def _body(payload: object) -> tuple[str, str, bytes, dict[str, str]]:
    return _post(json.dumps(payload).encode())


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        pytest.param(_post(b'{"model": "tiny",'), 400, "request body is not valid JSON: Expecting", id="malformed-json"),
        pytest.param(_post(b'{"model": "tiny"} {}'), 400, "not valid JSON: Extra data", id="trailing-data"),
        pytest.param(_post(b""), 400, "not valid JSON", id="empty-body"),
        pytest.param(_post(b'{"model": "\xff\xfe"}'), 400, "not valid JSON", id="invalid-utf8"),
        pytest.param(_post(b"[" * 100_000), 400, "nested too deeply", id="deeply-nested"),
        pytest.param(_post(b'{"model": "tiny", "n": ' + b"9" * 5000 + b"}"), 400, "not valid JSON", id="huge-integer"),
        pytest.param(_body([CHAT]), 400, 'must be a JSON object like {"model": "NAME", ...}, not an array', id="json-array"),
        pytest.param(_body("tiny"), 400, "must be a JSON object like", id="json-string"),
        pytest.param(_body({"messages": []}), 400, "request body has no 'model' field; name one of GET /v1/models", id="missing-model"),
        pytest.param(_body({"model": 7}), 400, "'model' must be a string naming one of GET /v1/models, not a number", id="model-number"),
        pytest.param(_body({"model": None}), 400, "'model' must be a string naming one of GET /v1/models, not null", id="model-null"),
        pytest.param(_body({"model": ["tiny"]}), 400, "'model' must be a string naming one of GET /v1/models, not an array", id="model-list"),
        pytest.param(_body({"model": {"id": "tiny"}}), 400, "not an object", id="model-object"),
        pytest.param(_body({"model": True}), 400, "not a boolean", id="model-bool"),
        pytest.param(_body({"model": ""}), 400, "'model' is an empty string; name one of GET /v1/models", id="model-empty"),
        pytest.param(_body({"model": "m" * 1000}), 400, "'model' is 1000 characters long", id="model-huge"),
        pytest.param(_body({"model": "nope"}), 404, "model 'nope' does not exist", id="model-unknown"),
        pytest.param(_body({"model": "../tiny"}), 404, "model '../tiny' does not exist", id="model-dotdot"),
        pytest.param(_body({"model": "x/tiny"}), 404, "model 'x/tiny' does not exist", id="model-slash"),
        pytest.param(_post(b'{"model": "tiny"}', {"content-type": "text/plain"}), 415,
                     "Content-Type must be application/json, not 'text/plain'", id="content-type-text"),
        pytest.param(_post(b"model=tiny", {"content-type": "application/x-www-form-urlencoded"}), 415,
                     "Content-Type must be application/json", id="content-type-form"),
        # What a page of another site can make a browser send without asking first.
        pytest.param(_post(b'{"model": "tiny"}', {}), 415,
                     "Content-Type must be application/json, and the request has none", id="content-type-missing"),
        pytest.param(("GET", "/v1/nope", b"", {}), 404, "no route GET /v1/nope; llmd serves /v1/chat/completions", id="unknown-route-get"),
        pytest.param(("POST", "/v2/chat/completions", b"{}", JSON), 404, "no route POST /v2/chat/completions", id="unknown-route-post"),
        pytest.param(("GET", "/v1/chat/completions", b"", {}), 405,
                     "method GET is not allowed on /v1/chat/completions; use POST", id="wrong-method-get"),
        pytest.param(("DELETE", "/v1/models", b"", {}), 405, "method DELETE is not allowed on /v1/models; use GET, HEAD", id="wrong-method-delete"),
    ],
)
def test_bad_request_gets_a_clear_4xx(daemon, request_: tuple, status: int, message: str) -> None:  # type: ignore[no-untyped-def]
    method, path, body, headers = request_
    response = httpx.request(method, daemon.url + path, content=body, headers=headers, timeout=30)
    assert message in assert_openai_error(response, status)
    assert daemon.state("tiny") is None  # bad requests start nothing
    assert_still_serves(daemon)


def test_huge_streamed_body_gets_413(daemon) -> None:  # type: ignore[no-untyped-def]
    chunk = b" " * MiB  # one buffer, sent again and again: the test never holds the whole body

    def body() -> Iterator[bytes]:
        yield b'{"model": "tiny", "pad": "'
        for _ in range(40):
            yield chunk
        yield b'"}'

    response = httpx.post(daemon.url + "/v1/chat/completions", content=body(), headers=JSON, timeout=60)
    assert "request body is larger than 32 MiB; send a shorter request" in assert_openai_error(response, 413)
    assert_still_serves(daemon)


def _raw_request(daemon, head: str, body: bytes = b"") -> socket.socket:  # type: ignore[no-untyped-def]
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def _read_reply(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the one reply on `sock`, read until the server closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_huge_declared_body_gets_413_before_it_is_sent(daemon) -> None:  # type: ignore[no-untyped-def]
    head = f"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\nContent-Length: {100 * MiB}\n"
    with _raw_request(daemon, head) as sock:
        status, body = _read_reply(sock)
    assert status == 413 and "larger than 32 MiB" in body["error"]["message"]
    assert_still_serves(daemon)


def test_slow_client_gets_408_and_holds_nothing(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_with_server_settings(make_daemon, "body_timeout = 2\n", {"tiny": tiny_profile(tiny_gguf)})
    body = json.dumps(CHAT).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\nContent-Length: {len(body)}\n"
    sock = _raw_request(daemon, head, body[:5])
    stop = threading.Event()

    def trickle() -> None:  # a byte every 0.3s: the whole body would take longer than body_timeout
        for byte in body[5:-1]:
            if stop.wait(0.3):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    trickler = threading.Thread(target=trickle)
    trickler.start()
    try:
        started = time.monotonic()
        assert_still_serves(daemon)  # other clients are served meanwhile
        status, reply = _read_reply(sock)
        assert 1.5 < time.monotonic() - started < 10
    finally:
        stop.set()
        trickler.join()
        sock.close()
    assert status == 408
    assert "request body did not arrive within 2s; send the whole body without pausing" in reply["error"]["message"]
    assert all(row["in_flight"] == 0 for row in daemon.ps())
    assert_still_serves(daemon)


def test_client_that_disconnects_mid_body(daemon) -> None:  # type: ignore[no-untyped-def]
    head = "POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\nContent-Length: 1000\n"
    _raw_request(daemon, head, b'{"model": "ti').close()
    time.sleep(0.3)
    assert_still_serves(daemon)


def test_client_that_gives_up_waiting_for_a_reply_releases_the_model(daemon) -> None:  # type: ignore[no-untyped-def]
    daemon.llmctl("load", "tiny")
    engine = psutil.Process(daemon.ps()[0]["pid"])
    engine.suspend()  # the engine takes the request but never answers, like one busy for minutes
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(daemon.url + "/v1/chat/completions", json=CHAT, timeout=httpx.Timeout(30, read=1.0))
        # Released as soon as the client left, not when the engine gets round to answering.
        wait_until(lambda: daemon.ps()[0]["in_flight"] == 0, timeout=30, what="the abandoned request to be released")
    finally:
        engine.resume()
    assert_still_serves(daemon)


def test_client_that_disconnects_mid_stream(daemon) -> None:  # type: ignore[no-untyped-def]
    long = {**CHAT, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=long, timeout=60) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i > 3:
                break
    wait_until(lambda: daemon.ps()[0]["in_flight"] == 0, timeout=30, what="the abandoned stream to be released")
    assert_still_serves(daemon)


# ----- profiles -----

GOOD_MODEL = 'engine = "llama-cpp"\n[model]\npath = "{model}"\n'


@pytest.mark.parametrize(
    ("name", "text", "messages"),
    [
        pytest.param("dotdot-alias", 'aliases = ["../etc"]\n' + GOOD_MODEL, ["aliases", "'../etc' is not a valid model name", "no '..'"], id="alias-dotdot"),
        pytest.param("slash-alias", 'aliases = ["a/b"]\n' + GOOD_MODEL, ["aliases", "'a/b' is not a valid model name", "no '/'"], id="alias-slash"),
        pytest.param("a..b", GOOD_MODEL, ["a..b.toml: file name: 'a..b' is not a valid model name", "rename the file"], id="file-name-dotdot"),
        pytest.param("broken-toml", 'engine = "llama-cpp"\n[model\n', ["broken-toml.toml: invalid TOML"], id="invalid-toml"),
        pytest.param("ollama", 'engine = "ollama"\n[model]\npath = "{model}"\n', ["engine: unknown engine 'ollama'; use one of: ", "llama-cpp"], id="unknown-engine"),
        pytest.param("neg-ctx", GOOD_MODEL + "[launch]\nctx = -512\n", ["launch.ctx", "(got -512)", "use a larger value"], id="negative-ctx"),
        pytest.param("huge-ctx", GOOD_MODEL + "[launch]\nctx = 1000000000000\n", ["launch.ctx", "use a smaller value"], id="absurd-ctx"),
        pytest.param("zero-parallel", GOOD_MODEL + "[launch]\nparallel = 0\n", ["launch.parallel", "use a larger value"], id="zero-parallel"),
        pytest.param("huge-vram", GOOD_MODEL + "[placement]\nvram_mib = 99999999999\n", ["placement.vram_mib", "use a smaller value"], id="absurd-vram"),
        pytest.param("neg-vram", GOOD_MODEL + "[placement]\nvram_mib = -1\n", ["placement.vram_mib", "use a larger value"], id="negative-vram"),
        pytest.param("text-ctx", GOOD_MODEL + '[launch]\nctx = "lots"\n', ["launch.ctx", "write a whole number"], id="text-ctx"),
        pytest.param("public", GOOD_MODEL + '[launch]\nextra_args = ["--host", "0.0.0.0"]\n', ["launch.extra_args: --host is set by llmd"], id="extra-args-host"),
    ],
)
def test_bad_profile_is_reported_and_the_rest_are_served(  # type: ignore[no-untyped-def]
    make_daemon, tiny_gguf: Path, name: str, text: str, messages: list[str]
) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf), name: text.format(model=tiny_gguf)})
    _assert_profile_refused(daemon, name, messages)


def _assert_profile_refused(daemon, name: str, messages: list[str]) -> None:  # type: ignore[no-untyped-def]
    """`name` is listed as invalid with `messages`, requests for it get 404, llmctl load fails with them."""
    listed = {row["name"]: row for row in json.loads(daemon.llmctl("ls", "--json").stdout)}
    assert listed[name]["valid"] is False
    for message in messages:
        assert message in listed[name]["error"]
    response = httpx.post(daemon.url + "/v1/chat/completions", json={**CHAT, "model": name}, timeout=30)
    text = assert_openai_error(response, 404)
    assert f"model {name!r} has an invalid profile" in text and all(m in text for m in messages)
    loaded = daemon.llmctl("load", name, check=False)
    if ".." in name:  # not a model id at all: llmctl refuses it before asking the daemon
        assert loaded.returncode == 2 and "is not a valid model name" in loaded.stderr
    else:
        assert loaded.returncode == 1 and all(m in loaded.stderr for m in messages)
    assert f"skipping invalid profile: {daemon.profiles_dir / name}.toml" in daemon.log()
    assert_still_serves(daemon)


def test_llmctl_refuses_names_with_slash_or_dotdot(daemon) -> None:  # type: ignore[no-untyped-def]
    daemon.llmctl("load", "tiny")
    for name in ("..", "../etc", "a/b", "tiny/../tiny"):
        for command in ("load", "unload", "logs"):
            result = daemon.llmctl(command, name, check=False)
            assert result.returncode == 2 and "is not a valid model name" in result.stderr, (command, name, result)
    assert daemon.state("tiny") == "ready"  # nothing was unloaded
    assert_still_serves(daemon)


def test_model_paths_outside_model_dirs_are_refused(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    allowed = tmp_path / "models"
    allowed.mkdir()
    shutil.copy(tiny_gguf, allowed / "tiny.gguf")
    outside = tmp_path / "elsewhere" / "secret.gguf"
    outside.parent.mkdir()
    shutil.copy(tiny_gguf, outside)
    (allowed / "link.gguf").symlink_to(outside)
    profiles = {
        "tiny": tiny_profile(allowed / "tiny.gguf"),
        "outside": tiny_profile(outside),
        "dotdot": tiny_profile(Path(f"{allowed}/../elsewhere/secret.gguf")),
        "symlink": tiny_profile(allowed / "link.gguf"),
    }
    daemon = daemon_with_server_settings(make_daemon, f'model_dirs = ["{allowed}"]\n', profiles)
    fix = f"is outside the allowed model directories ({allowed}); move the model into one of them, or add its directory to [server] model_dirs"
    _assert_profile_refused(daemon, "outside", [f"outside.toml: model.path: {outside} {fix}"])
    _assert_profile_refused(daemon, "dotdot", [f"model.path: {allowed}/../elsewhere/secret.gguf (which resolves to {outside}) {fix}"])
    _assert_profile_refused(daemon, "symlink", [f"model.path: {allowed}/link.gguf (which resolves to {outside}) {fix}"])
    assert not [row for row in daemon.ps() if row["model"] != "tiny"]


# ----- the daemon's own config -----


@pytest.mark.parametrize(
    ("server", "messages"),
    [
        pytest.param("listen = \n", ["invalid TOML"], id="invalid-toml"),
        pytest.param("shutdown_grace = -5\n", ["server.shutdown_grace", "(got -5)", "use a larger value"], id="negative-grace"),
        pytest.param("ready_timeout = 1e12\n", ["server.ready_timeout", "use a smaller value"], id="absurd-timeout"),
        pytest.param('management_listen = "127.0.0.1:70000"\nmanagement_token = "0123456789abcdef"\n',
                     ['server.management_listen: management_listen must be "HOST:PORT"'], id="bad-port"),
        pytest.param("body_timeout = 0\n", ["server.body_timeout", "use a larger value"], id="zero-body-timeout"),
        pytest.param('model_dirs = "/models"\n', ["server.model_dirs", "write a list"], id="model-dirs-not-a-list"),
        pytest.param("colour = 1\n", ["server.colour: unknown key", "check its spelling"], id="unknown-key"),
    ],
)
def test_bad_config_is_a_cli_error(make_daemon, server: str, messages: list[str]) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_with_server_settings(make_daemon, server, start=False)
    config = daemon.root / "llmd.toml"
    result = subprocess.run([str(BIN / "llmd"), "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"llmd: {config}")
    for message in messages:
        assert message in result.stderr
    assert "Traceback" not in result.stderr


# ----- extra_args never pass through a shell -----


def _with_extra_args(profile: str, args: list[str]) -> str:
    """`profile` (a tiny_profile) with exactly `args` as its extra_args, quotes and all."""
    lines = [line for line in profile.splitlines() if not line.strip().startswith("extra_args")]
    profile = "\n".join(lines) + "\n"
    # A JSON array of strings is also a valid TOML array, escapes included.
    return profile.replace("[policy]", f"extra_args = {json.dumps(args)}\n[policy]")


def test_extra_args_reach_the_engine_verbatim(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    markers = [tmp_path / f"marker{i}" for i in range(5)]
    tags = f"$(touch {markers[0]}); touch {markers[1]} | touch {markers[2]} && `touch {markers[3]}` > {markers[4]} \"'"
    daemon = make_daemon({"tiny": _with_extra_args(tiny_profile(tiny_gguf), ["--tags", tags])})
    assert_still_serves(daemon)
    argv = daemon.ps()[0]["argv"]
    assert argv[-6:-4] == ["--tags", tags]  # verbatim, then llmd's own --host and --port
    assert not any(marker.exists() for marker in markers)


def test_unknown_extra_arg_fails_the_load_without_running_anything(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "marker"
    bad = _with_extra_args(tiny_profile(tiny_gguf), [f"; touch {marker}"])
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf), "bad": bad})
    response = httpx.post(daemon.url + "/v1/chat/completions", json={**CHAT, "model": "bad"}, timeout=60)
    text = assert_openai_error(response, 503)
    assert "exited with code" in text and f"; touch {marker}" in text  # llama-server's own complaint, from its log
    loaded = daemon.llmctl("load", "bad", check=False)
    assert loaded.returncode == 1 and "exited with code" in loaded.stderr
    assert not marker.exists()
    assert_still_serves(daemon)
