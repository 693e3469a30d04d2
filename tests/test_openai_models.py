"""The OpenAI surface clients expect: `GET /v1/models/{id}`, aliases in `/v1/models`, and a
profile that serves `/v1/embeddings`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from conftest import tiny_profile
from support import assert_openai_error

pytestmark = pytest.mark.engine


def _embedding_profile(model: Path) -> str:
    # A generative model has no pooling of its own: mean pooling makes its embeddings OpenAI's.
    return f"""\
        engine = "llama-cpp"
        [model]
        path = "{model}"
        [launch]
        ctx = 512
        embeddings = true
        extra_args = ["--pooling", "mean"]
        """


def test_models_by_id_and_aliases(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"chat": tiny_profile(tiny_gguf, aliases=["chat-alias", "gpt-4o"]), "emb": _embedding_profile(tiny_gguf)})
    listed = httpx.get(daemon.url + "/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["chat", "chat-alias", "emb", "gpt-4o"]
    assert all(m["object"] == "model" and m["owned_by"] == "llmd" for m in listed["data"])

    for name in ("chat", "gpt-4o"):
        one = httpx.get(f"{daemon.url}/v1/models/{name}")
        assert one.status_code == 200
        body = one.json()
        assert body["id"] == name and body["object"] == "model" and isinstance(body["created"], int)

    missing = httpx.get(f"{daemon.url}/v1/models/nope")
    message = assert_openai_error(missing, 404)
    assert "model 'nope' does not exist" in message
    error = missing.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_an_embeddings_profile_answers_v1_embeddings(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"emb": _embedding_profile(tiny_gguf)})
    reply = httpx.post(daemon.url + "/v1/embeddings", json={"model": "emb", "input": ["hello", "world"]}, timeout=120)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and [item["index"] for item in body["data"]] == [0, 1]
    vector = body["data"][0]["embedding"]
    assert len(vector) > 1 and all(isinstance(value, float) for value in vector)
    row = next(r for r in daemon.ps() if r["model"] == "emb")
    assert "--embeddings" in row["argv"]
