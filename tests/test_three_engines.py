"""One daemon, three engines at once: llama.cpp, fastllm and vLLM, each behind its own profile."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from conftest import engine_processes, tiny_profile, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_each_request_lands_on_its_engine(  # type: ignore[no-untyped-def]
    make_daemon, llama_server_bin: Path, fastllm_command: list[str], vllm_command: list[str],
    tiny_gguf: Path, tiny_hf_dir: Path,
) -> None:
    profiles = {
        "llama": tiny_profile(tiny_gguf),
        "fast": tiny_profile(tiny_gguf, engine="fastllm"),
        "vl": tiny_profile(tiny_hf_dir, engine="vllm", extra_args=["--load-format", "dummy", "--enforce-eager"]),
    }
    # One core each, so that the three CPU engines stay loaded together (with an even share of the
    # cores, each new one would stop the idle ones).
    profiles = {name: profile.replace("ctx = 512", "ctx = 512\nthreads = 1") for name, profile in profiles.items()}
    config = (
        f"[engines.fastllm]\ncommand = {json.dumps(fastllm_command)}\n"
        f"[engines.vllm]\ncommand = {json.dumps(vllm_command)}\n"
    )
    daemon = make_daemon(profiles, extra_config=config)
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=900)  # vLLM starts slowly on a busy machine
    assert sorted(m.id for m in client.models.list().data) == ["fast", "llama", "vl"]

    prefixes = {"llama": [str(llama_server_bin)], "fast": fastllm_command, "vl": vllm_command}
    engines = {"llama": "llama-cpp", "fast": "fastllm", "vl": "vllm"}
    # vLLM first: it takes longest to load, and the others must not wait on it or disturb it.
    for model in ("vl", "fast", "llama"):
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.model == model
        assert reply.choices[0].message.role == "assistant"

    rows = {row["model"]: row for row in daemon.ps()}
    assert set(rows) == {"llama", "fast", "vl"}
    for model, row in rows.items():
        assert row["state"] == "ready", row
        assert row["engine"] == engines[model]
        assert row["argv"][: len(prefixes[model])] == prefixes[model], row["argv"]
    assert len({row["port"] for row in rows.values()}) == 3

    # Each engine serves only its own model: asking one engine's port for another's name fails.
    for model, row in rows.items():
        other = next(m for m in rows if m != model)
        served = openai.OpenAI(base_url=f"http://127.0.0.1:{row['port']}/v1", api_key="unused", max_retries=0)
        names = [m.id for m in served.models.list().data]
        assert model in names and other not in names

    # All three still answer, streaming, after the others loaded.
    for model in ("llama", "fast", "vl"):
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "again"}], max_tokens=4, stream=True
        ))
        assert chunks and all(c.model == model for c in chunks if c.model)

    daemon.llmctl("unload", "--all")
    wait_until(lambda: not engine_processes(daemon.state_dir), timeout=60, what="all three engines to exit")
