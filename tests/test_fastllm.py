"""fastllm (`ftllm server`) for real, on the CPU, on a tiny GGUF, through llmd's proxy."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from conftest import engine_processes, tiny_profile, wait_until
from llmd.drivers.base import load_progress
from llmd.drivers.fastllm import FastllmDriver

pytestmark = pytest.mark.engine


def _config(fastllm_command: list[str]) -> str:
    return f"[engines.fastllm]\ncommand = {json.dumps(fastllm_command)}\n"


def test_load_on_demand_chat_and_unload(make_daemon, fastllm_command: list[str], tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"fast": tiny_profile(tiny_gguf, engine="fastllm")}, extra_config=_config(fastllm_command))
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    assert daemon.state("fast") is None  # nothing runs before the first request

    reply = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert reply.model == "fast"
    assert reply.choices[0].message.role == "assistant"
    # Random weights may pick the end token early; never more than asked for.
    assert 1 <= reply.usage.completion_tokens <= 8
    assert daemon.state("fast") == "ready"

    chunks = list(client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hello"}], max_tokens=16, stream=True
    ))
    assert chunks and all(c.model == "fast" for c in chunks)
    assert any(c.choices and c.choices[0].finish_reason in ("length", "stop") for c in chunks)

    (row,) = daemon.ps()
    assert row["engine"] == "fastllm"
    argv = row["argv"]
    assert argv[: len(fastllm_command)] == fastllm_command
    assert argv[argv.index("--model_name") + 1] == "fast"
    assert argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(row["port"])

    # The engine's own startup progress, as the driver reads it from the log.
    log = (daemon.state_dir / "logs" / "fast.log").read_text().splitlines()
    progress = [p for p in (load_progress(FastllmDriver(), line) for line in log) if p]
    assert "loading weights 100%" in progress and progress[-1] == "ready"

    assert "unloaded" in daemon.llmctl("unload", "fast").stdout
    assert daemon.state("fast") == "stopped"
    wait_until(lambda: not engine_processes(daemon.state_dir), what="fastllm to exit")


def test_wrong_model_file_reports_the_engine_log(make_daemon, fastllm_command: list[str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model" * 100)
    daemon = make_daemon({"broken": tiny_profile(garbage, engine="fastllm")}, extra_config=_config(fastllm_command))
    response = httpx.post(daemon.url + "/v1/chat/completions",
                          json={"model": "broken", "messages": [{"role": "user", "content": "x"}]}, timeout=120)
    assert response.status_code == 503
    assert "exited with code" in response.json()["error"]["message"]
    assert not engine_processes(daemon.state_dir)


def test_alias_reaches_fastllm(make_daemon, fastllm_command: list[str], tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon = make_daemon({"fast": tiny_profile(tiny_gguf, engine="fastllm", aliases=["fast-alias"])},
                         extra_config=_config(fastllm_command))
    # fastllm answers 404 for any name but --model_name; the proxy sends it the profile's name.
    response = httpx.post(daemon.url + "/v1/chat/completions", timeout=120,
                          json={"model": "fast-alias", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert response.status_code == 200, response.text
