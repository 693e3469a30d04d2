"""The core loop against a real llama-server: on-demand load, streaming, llmctl, TTL, shutdown."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import engine_processes, tiny_profile, wait_until

pytestmark = pytest.mark.engine


def _starts(daemon) -> int:  # type: ignore[no-untyped-def]
    log = daemon.state_dir / "logs" / "tiny.log"
    return log.read_text().count("===== llmd: starting") if log.exists() else 0


def test_openai_client_loads_on_demand_and_streams(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf, aliases=["tiny-alias"])})
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused")

    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]  # aliases are served names too
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    assert daemon.state("tiny") is None  # listed, but nothing started yet

    reply = client.chat.completions.create(
        model="tiny-alias", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        extra_body={"ignore_eos": True},  # random weights may pick the end token at once
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 8
    assert daemon.state("tiny") == "ready"

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=16, stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    # About one chunk per token, passed through as they came (bytes of one UTF-8 character share a chunk).
    assert len(content) >= 4
    assert chunks[-1].choices[0].finish_reason == "length"

    completion = client.completions.create(model="tiny", prompt="abc", max_tokens=4)
    assert completion.choices[0].text is not None
    assert _starts(daemon) == 1


def test_stream_chunks_arrive_before_the_reply_is_complete(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    arrivals = []
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    assert len(arrivals) > 100
    # A buffering proxy would deliver everything in one burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.0
    assert len({round(t, 4) for t in arrivals}) > 10


def test_concurrent_first_requests_trigger_one_launch(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    results: list[int] = []

    def request() -> None:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        results.append(httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 8
    assert _starts(daemon) == 1
    assert len([p for p in engine_processes(daemon.state_dir)]) == 1


def test_llmctl_load_ps_unload(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    loaded = daemon.llmctl("load", "tiny")
    assert "tiny is ready" in loaded.stdout

    (row,) = daemon.ps()
    assert row["model"] == "tiny" and row["engine"] == "llama-cpp" and row["state"] == "ready"
    assert row["pid"] > 0 and row["port"] > 0 and row["uptime_s"] >= 0 and row["idle_s"] >= 0
    argv = row["argv"]
    assert argv[argv.index("--alias") + 1] == "tiny"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(row["port"])
    assert argv[argv.index("--ctx-size") + 1] == "512"
    assert ["--fit", "off"] == argv[argv.index("--fit"): argv.index("--fit") + 2]

    table = daemon.llmctl("ps").stdout
    assert "tiny" in table and "ready" in table and str(row["pid"]) in table

    assert "unloaded" in daemon.llmctl("unload", "tiny").stdout
    assert daemon.state("tiny") == "stopped"
    wait_until(lambda: not engine_processes(daemon.state_dir), what="engine to exit")

    daemon.llmctl("load", "tiny")
    assert "tiny" in daemon.llmctl("unload", "--all").stdout
    assert daemon.state("tiny") == "stopped"

    unknown = daemon.llmctl("load", "nope", check=False)
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr


def test_llmctl_ls_shows_valid_and_invalid_profiles_and_logs(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon(
        {"tiny": tiny_profile(tiny_gguf), "broken": 'engine = "llama-cpp"\n[model]\npath = "/x.gguf"\n[launch]\nctx = -1\n'}
    )
    profiles = {p["name"]: p for p in json.loads(daemon.llmctl("ls", "--json").stdout)}
    assert profiles["tiny"]["valid"] is True
    assert profiles["broken"]["valid"] is False
    assert "broken.toml: launch.ctx" in profiles["broken"]["error"]
    daemon.llmctl("load", "tiny")
    logs = daemon.llmctl("logs", "tiny", "-n", "200").stdout
    assert "llmd: starting tiny" in logs


def test_idle_ttl_unloads(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf, ttl="2s")})
    daemon.llmctl("load", "tiny")
    assert daemon.state("tiny") == "ready"
    wait_until(lambda: daemon.state("tiny") == "stopped", timeout=10, what="TTL unload")
    wait_until(lambda: not engine_processes(daemon.state_dir), what="engine to exit")
    assert "idle for 2s" in daemon.log()


def test_errors_are_openai_shaped(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)})
    unknown = httpx.post(daemon.url + "/v1/chat/completions", json={"model": "nope", "messages": []})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert "nope" in unknown.json()["error"]["message"]

    bad = httpx.post(daemon.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert "not valid JSON" in bad.json()["error"]["message"]

    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert daemon.state("tiny") is None  # nothing was started by bad requests


def test_engine_that_fails_to_start_reports_its_log(make_daemon, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 100)
    daemon = make_daemon({"broken": tiny_profile(garbage)})
    response = httpx.post(
        daemon.url + "/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]}, timeout=60
    )
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "exited with code" in message and "Last lines of" in message
    result = daemon.llmctl("load", "broken", check=False)
    assert result.returncode == 1 and "exited with code" in result.stderr
    assert daemon.state("broken") == "failed"
    assert not engine_processes(daemon.state_dir)


def test_a_whole_reply_from_the_engine_reaches_the_client_in_one_piece(make_daemon, tiny_gguf: Path) -> None:
    # llmd writes a non-streamed reply's head together with its body (`client_link`): with a
    # real engine behind it, the first read after the reply starts arriving holds all of it,
    # and the connection carries the next request.
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf, ctx=4096)})
    daemon.llmctl("load", "tiny")
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%b" % (len(body), body))
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        for _ in range(2):
            sock.sendall(request)
            first = sock.recv(1 << 20)
            head, _, reply = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), first[:200]
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            assert len(reply) == length, f"first read held {len(reply)} of {length} body bytes"
            assert json.loads(reply)["choices"][0]["message"]["role"] == "assistant"


def test_client_disconnect_cancels_upstream(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf, ctx=4096)})
    daemon.llmctl("load", "tiny")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4000, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 5:
                break
    # The engine is released at once, not after it generated all 4000 tokens.
    wait_until(lambda: daemon.ps()[0]["in_flight"] == 0, timeout=30, what="request to be released")
    log = daemon.state_dir / "logs" / "tiny.log"
    port = daemon.ps()[0]["port"]

    def engine_stopped_generating() -> bool:
        text = log.read_text().lower()
        if "cancel" in text or "connection closed" in text:
            return True
        # The engine's own view, for when its log line has not reached the file yet.
        slots = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=5).json()
        return not any(slot.get("is_processing") for slot in slots)

    wait_until(engine_stopped_generating, timeout=60, what="llama-server to notice the cancelled request")


def test_sigterm_leaves_no_engine(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_gguf.read_bytes())
    # One core each, so that both CPU engines run at once (with an even share, the second would
    # stop the idle first one to get cores of its own).
    one_core = {name: tiny_profile(path).replace("ctx = 512", "ctx = 512\nthreads = 1")
                for name, path in (("tiny", tiny_gguf), ("other", other))}
    daemon = make_daemon(one_core)
    daemon.llmctl("load", "tiny")
    daemon.llmctl("load", "other")
    assert len(engine_processes(daemon.state_dir)) == 2
    assert daemon.stop(signal.SIGTERM) == 0
    assert engine_processes(daemon.state_dir) == []
    assert not daemon.socket.exists()
