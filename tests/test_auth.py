"""Auth: API keys on the proxy, the management socket's permissions, the TCP management listener
and its token, and engines listening on 127.0.0.1 only."""

from __future__ import annotations

import hmac
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from starlette.testclient import TestClient

from conftest import BIN, tiny_profile
from llmd.daemon.config import load_config
from llmd.daemon.errors import ConfigError
from llmd.daemon.models.profiles import load_profile
from llmd.daemon.engines.supervisor import free_port
from support import FakeEngine, assert_openai_error, daemon_with_server_settings, fake_proxy_app

KEY = "k-0123456789abcdef"
OTHER_KEY = "k-fedcba9876543210"
WRONG_KEY = "k-wrong-wrong-wrong"
TOKEN = "t-0123456789abcdef0123"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# ----- the proxy's API keys, in-process -----


@pytest.fixture
def keyed() -> Iterator[tuple[TestClient, FakeEngine]]:
    app, _, engine = fake_proxy_app(api_keys=[KEY, OTHER_KEY])
    with TestClient(app) as client:
        yield client, engine


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "authentication required: send the header 'Authorization: Bearer SECRET'"),
        (f"Basic {KEY}", "the Authorization header must read 'Bearer SECRET'"),
        ("Bearer", "the Authorization header must read 'Bearer SECRET'"),
        (f"Bearer {WRONG_KEY}", "the Bearer token was not accepted"),
        (f"Bearer {KEY}x", "the Bearer token was not accepted"),
        (f"Bearer {KEY[:-1]}", "the Bearer token was not accepted"),
    ],
)
def test_requests_without_a_valid_key_get_401(keyed, authorization: str | None, message: str) -> None:  # type: ignore[no-untyped-def]
    client, engine = keyed
    headers = {} if authorization is None else {"authorization": authorization}
    for response in (client.post("/v1/chat/completions", json=CHAT, headers=headers), client.get("/v1/models", headers=headers)):
        text = assert_openai_error(response, 401)
        assert message in text and "one of the keys in [server] api_keys" in text
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == 'Bearer realm="llmd"'
        assert response.headers["connection"] == "close"  # an unread body is not read to its end
        assert KEY not in response.text and WRONG_KEY not in response.text
    assert engine.requests == []


def test_unknown_routes_are_hidden_behind_the_key(keyed) -> None:  # type: ignore[no-untyped-def]
    client, _ = keyed
    assert client.get("/admin").status_code == 401
    assert client.get("/admin", headers={"authorization": f"Bearer {KEY}"}).status_code == 404


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_any_configured_key_works_and_is_not_forwarded(keyed, key: str) -> None:  # type: ignore[no-untyped-def]
    client, engine = keyed
    headers = {"authorization": f"bearer  {key} ", "proxy-authorization": "Basic eHh4", "x-trace": "kept"}
    response = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200, response.text
    assert client.get("/v1/models", headers=headers).json()["data"][0]["id"] == "tiny"
    (forwarded,) = engine.requests
    assert "authorization" not in forwarded.headers and "proxy-authorization" not in forwarded.headers
    assert key.encode() not in b"".join(k + v for k, v in forwarded.headers.raw)
    assert forwarded.headers["x-trace"] == "kept"


def test_a_key_is_also_accepted_as_x_api_key_and_not_forwarded(keyed) -> None:  # type: ignore[no-untyped-def]
    client, engine = keyed
    assert client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": OTHER_KEY}).status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200
    # A wrong x-api-key is refused, unless the Authorization header carries a good key.
    refused = client.get("/v1/models", headers={"x-api-key": WRONG_KEY})
    assert "the x-api-key header was not accepted" in assert_openai_error(refused, 401) and WRONG_KEY not in refused.text
    assert client.get("/v1/models", headers={"x-api-key": WRONG_KEY, "authorization": f"Bearer {KEY}"}).status_code == 200
    (forwarded,) = engine.requests
    assert "x-api-key" not in forwarded.headers and "authorization" not in forwarded.headers


def test_every_key_is_compared_in_constant_time(keyed, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    client, _ = keyed
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for key in (KEY, OTHER_KEY, WRONG_KEY, "x"):
        calls.clear()
        client.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        # Both configured keys, every time: no early exit on the first match, and digests of equal length.
        assert len(calls) == 2
        assert all(len(a) == len(b) == 32 for a, b in calls)


# ----- config: keys and tokens are checked and never echoed -----


def _config(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "llmd.toml"
    path.write_text("[server]\n" + server)
    return path


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ('api_keys = ["short"]\n', "api_keys: key number 1 is too short (5 characters); use at least 8"),
        (f'api_keys = ["{KEY}", "has spaces in it"]\n', "api_keys: key number 2 contains spaces"),
        ('api_keys = "single-string-key"\n', "server.api_keys: Input should be a valid list"),
        ('management_listen = "127.0.0.1:9999"\n', "management_listen needs management_token"),
        ('management_listen = "127.0.0.1:9999"\nmanagement_token = "tooshort"\n', "management_token is too short (8 characters); use at least 16"),
        (f'management_listen = "9999"\nmanagement_token = "{TOKEN}"\n', 'management_listen must be "HOST:PORT"'),
    ],
)
def test_bad_secrets_are_refused_without_quoting_them(tmp_path: Path, server: str, message: str) -> None:
    path = _config(tmp_path, server)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert text.startswith(str(path)) and message in text
    for secret in ("short", "has spaces in it", "single-string-key", "tooshort", KEY, TOKEN):
        assert repr(secret) not in text and f'"{secret}"' not in text


def test_secrets_stay_out_of_reprs(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, f'api_keys = ["{KEY}"]\nmanagement_listen = "127.0.0.1:9"\nmanagement_token = "{TOKEN}"\n'))
    assert config.server.api_key_values() == [KEY]
    for text in (repr(config), str(config), config.model_dump_json()):
        assert KEY not in text and TOKEN not in text


def test_model_dirs_resolve_against_the_config_file(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, 'model_dirs = ["models", "/srv/models"]\n'))
    assert config.server.model_dirs == [tmp_path / "models", Path("/srv/models")]


def test_model_paths_must_resolve_inside_model_dirs(tmp_path: Path) -> None:
    allowed, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    (allowed / "link.gguf").symlink_to(elsewhere / "x.gguf")

    def load(model: str) -> Path | None:
        path = tmp_path / "m.toml"
        path.write_text(f'engine = "llama-cpp"\n[model]\npath = "{model}"\n')
        return load_profile(path, {"llama-cpp"}, [allowed]).model.path

    assert load(f"{allowed}/sub/x.gguf") == allowed / "sub" / "x.gguf"
    assert load("models/x.gguf") == allowed / "x.gguf"  # relative to the profile's directory
    for outside in (f"{elsewhere}/x.gguf", f"{allowed}/../elsewhere/x.gguf", f"{allowed}/link.gguf", "/etc/passwd"):
        with pytest.raises(ConfigError, match=rf"m.toml: model.path: .* is outside the allowed model directories \({allowed}\)"):
            load(outside)


@pytest.mark.parametrize("arg", ["--host", "--port", "--host=0.0.0.0"])
def test_profiles_cannot_move_an_engine_off_loopback(tmp_path: Path, arg: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(f'engine = "llama-cpp"\n[model]\npath = "/x.gguf"\n[launch]\nextra_args = ["{arg}", "0.0.0.0"]\n')
    with pytest.raises(ConfigError, match=r"launch.extra_args: --(host|port) is set by llmd .*; remove it"):
        load_profile(path, {"llama-cpp"})


# ----- a real daemon -----


@pytest.mark.engine
def test_api_keys_on_a_real_daemon(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_with_server_settings(make_daemon, f'api_keys = ["{KEY}", "{OTHER_KEY}"]\n', {"tiny": tiny_profile(tiny_gguf)})

    for key in (None, WRONG_KEY):
        headers = {} if key is None else {"authorization": f"Bearer {key}"}
        assert_openai_error(httpx.get(daemon.url + "/v1/models", headers=headers), 401)
        assert_openai_error(httpx.post(daemon.url + "/v1/chat/completions", json=CHAT, headers=headers), 401)
    with pytest.raises(openai.AuthenticationError, match="not accepted"):
        openai.OpenAI(base_url=daemon.url + "/v1", api_key=WRONG_KEY, max_retries=0).models.list()
    assert daemon.state("tiny") is None  # refused requests start nothing

    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=OTHER_KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert reply.choices[0].message.role == "assistant"
    assert len(list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2, stream=True))) > 0

    # llmctl needs no key: the unix socket's permissions guard management.
    assert daemon.ps()[0]["state"] == "ready"
    logs = daemon.log() + (daemon.state_dir / "logs" / "tiny.log").read_text()
    for secret in (KEY, OTHER_KEY, WRONG_KEY):
        assert secret not in logs


@pytest.mark.engine
def test_management_socket_is_0660(make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon()
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


@pytest.mark.engine
def test_management_over_tcp_requires_the_token(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    daemon = daemon_with_server_settings(
        make_daemon, f'management_listen = "127.0.0.1:{port}"\nmanagement_token = "{TOKEN}"\n', {"tiny": tiny_profile(tiny_gguf)}
    )
    url = f"http://127.0.0.1:{port}"
    for headers in ({}, {"authorization": f"Bearer {WRONG_KEY}"}, {"authorization": TOKEN}):
        refused = httpx.get(url + "/v1/ps", headers=headers)
        assert refused.status_code == 401
        assert "[server] management_token" in refused.json()["error"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert httpx.post(url + "/v1/models/tiny/load", headers=headers).status_code == 401
    assert daemon.state("tiny") is None

    auth = {"authorization": f"Bearer {TOKEN}"}
    loaded = httpx.post(url + "/v1/models/tiny/load", headers=auth, timeout=60)
    assert loaded.status_code == 200 and '"event": "ready"' in loaded.text
    assert httpx.get(url + "/v1/ps", headers=auth).json()["models"][0]["state"] == "ready"
    assert daemon.ps()[0]["state"] == "ready"  # the unix socket still needs no token
    assert f"127.0.0.1:{port} (token required)" in daemon.log()
    assert TOKEN not in daemon.log()


@pytest.mark.engine
def test_management_over_tcp_without_a_token_is_refused(make_daemon) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    daemon = daemon_with_server_settings(make_daemon, f'management_listen = "127.0.0.1:{port}"\n', start=False)
    result = subprocess.run(
        [str(BIN / "llmd"), "serve", "--config", str(daemon.root / "llmd.toml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "server: management_listen needs management_token" in result.stderr
    assert "set management_token to a random secret of at least 16 characters" in result.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/ps")


@pytest.mark.engine
def test_engines_listen_on_loopback_only(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    daemon.llmctl("load", "tiny")
    (row,) = daemon.ps()
    argv = row["argv"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    listening = [c for c in psutil.Process(row["pid"]).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}


def test_a_held_management_address_is_reported_under_its_own_setting() -> None:
    import socket

    from llmd.daemon.errors import AddressInUseError
    from llmd.daemon.http.listeners import bind_tcp

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(AddressInUseError, match=rf"^\[server\] management_listen: 127.0.0.1:{port} is already in use"):
            bind_tcp("127.0.0.1", port, "[server] management_listen")
