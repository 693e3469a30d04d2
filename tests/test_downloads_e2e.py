"""Downloads through the daemon: `llmctl pull` and on-demand loads from a local Hub stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hub_standin import HubStandin

pytestmark = pytest.mark.engine

REPO = "acme/tiny-gguf"


@pytest.fixture
def hub(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    with HubStandin(token="GOOD") as standin:
        standin.add_commit(REPO, {"tiny-Q8_0.gguf": tiny_gguf.read_bytes(), "README.md": b"tiny"})
        # The daemon is a child process: it takes the Hub address, token and cache from its environment.
        standin.use_in_env(monkeypatch, tmp_path / "hf-home")
        yield standin


def _profile(file: str = "tiny-Q8_0.gguf") -> str:
    return f'engine = "llama-cpp"\n[model]\nhf_repo = "{REPO}"\nhf_file = "{file}"\n[launch]\nctx = 512\n'


def test_pull_then_load_from_the_cache(make_daemon, hub: HubStandin) -> None:
    daemon = make_daemon({"hf-tiny": _profile()})
    # Planned before the download, from the file's header read by range requests (tests/test_plan_remote.py).
    plan = daemon.llmctl("plan", "hf-tiny")
    assert "placement:" in plan.stdout
    assert all(r.range is not None for r in hub.gets("tiny-Q8_0.gguf"))
    hub.clear()
    pulled = daemon.llmctl("pull", "hf-tiny")
    assert "model files are complete" in pulled.stdout
    assert len(hub.gets("tiny-Q8_0.gguf")) == 1
    response = httpx.post(daemon.url + "/v1/chat/completions",
                          json={"model": "hf-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                          timeout=60)
    assert response.status_code == 200
    assert len(hub.gets("tiny-Q8_0.gguf")) == 1  # served from the cache, not fetched again
    argv = daemon.ps()[0]["argv"]
    assert "models--acme--tiny-gguf" in argv[argv.index("--model") + 1]


def test_a_request_downloads_the_model_on_demand(make_daemon, hub: HubStandin) -> None:
    daemon = make_daemon({"hf-tiny": _profile()})
    response = httpx.post(daemon.url + "/v1/chat/completions",
                          json={"model": "hf-tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                          timeout=60)
    assert response.status_code == 200
    assert len(hub.gets("tiny-Q8_0.gguf")) == 1


def test_a_missing_file_fails_the_load_with_a_clear_error(make_daemon, hub: HubStandin) -> None:
    daemon = make_daemon({"hf-missing": _profile("nope.gguf")})
    result = daemon.llmctl("load", "hf-missing", check=False)
    assert result.returncode == 1
    assert "nope.gguf" in result.stderr and "hf_file" in result.stderr
