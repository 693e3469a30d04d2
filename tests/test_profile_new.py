"""`llmctl profile new`: a written profile validates, a running daemon plans and serves it,
`--from-hf` chooses the engine and file from a Hub repo's listing, and bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import BIN, write_client_config
from hub_standin import HubStandin
from llmd.daemon.models.profile_writer import HubFile, choose_gguf, quant_of
from llmd.daemon.models.profiles import load_profile

GGUF_REPO = "acme/tiny-GGUF"
HF_REPO = "acme/tiny-hf"


def _chat(daemon, model: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(daemon.url + "/v1/chat/completions", timeout=60,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


@pytest.fixture
def offline(tmp_path: Path) -> dict[str, Path]:
    """A config with one profile dir and a socket nobody listens on: llmctl works on the files alone."""
    root = tmp_path / "offline"
    (root / "profiles").mkdir(parents=True)
    config = write_client_config(root, root / "nobody.sock", root / "profiles")
    return {"config": config, "profiles": root / "profiles"}


def llmctl(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if key not in ("LLMD_SOCKET", "LLMD_CONFIG")}
    return subprocess.run([str(BIN / "llmctl"), "--config", str(config), *args], check=False, capture_output=True, text=True,
                          timeout=120, env={**environment, **(env or {})})


@pytest.fixture
def hub(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    tiny = tiny_gguf.read_bytes()
    with HubStandin(token="GOOD") as standin:
        standin.add_commit(GGUF_REPO, {
            "tiny-Q8_0.gguf": tiny, "tiny-Q4_K_M.gguf": tiny, "tiny-F16.gguf": tiny,
            "mmproj-tiny-F16.gguf": b"projector", "README.md": b"tiny",
        })
        standin.add_commit(HF_REPO, {"config.json": b"{}", "model.safetensors": b"\0" * 16, "tokenizer.json": b"{}"})
        standin.use_in_env(monkeypatch, tmp_path / "hf-home")
        yield standin


# ----- with a running daemon -----


@pytest.mark.engine
def test_a_new_local_profile_is_planned_and_served_by_the_running_daemon(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon()
    config = daemon.root / "llmd.toml"
    result = daemon.llmctl("--config", str(config), "profile", "new", "fresh", "--model", str(tiny_gguf),
                           "--ctx", "512", "--alias", "fresh-alias", "--ttl", "5m")
    path = daemon.profiles_dir / "fresh.toml"
    assert f"wrote {path} (llama-cpp, {tiny_gguf})" in result.stdout
    assert "the running daemon now serves fresh" in result.stdout
    assert "placement: CPU only" in result.stdout  # the daemon's plan, printed for people

    text = path.read_text()
    assert "# context length in tokens" in text  # the keys are explained
    profile = load_profile(path, {"llama-cpp"})
    assert (profile.engine, profile.launch.ctx, profile.aliases, profile.policy.ttl) == ("llama-cpp", 512, ["fresh-alias"], "5m")
    assert profile.model.path == tiny_gguf.resolve()

    response = _chat(daemon, "fresh-alias")
    assert response.status_code == 200, response.text
    assert daemon.state("fresh") == "ready"


@pytest.mark.engine
def test_from_hf_with_a_running_daemon_plans_before_a_pull(make_daemon, hub: HubStandin) -> None:
    daemon = make_daemon()
    config = daemon.root / "llmd.toml"
    result = daemon.llmctl("--config", str(config), "profile", "new", "hf-tiny", "--from-hf", GGUF_REPO,
                           "--ctx", "512", "--json")
    report = json.loads(result.stdout)
    assert report["profile"]["model"] == {"hf_repo": GGUF_REPO, "hf_file": "tiny-Q4_K_M.gguf"}
    assert report["planned_by"] == "daemon"
    # Planned from the file's header, read by range requests (tests/test_plan_remote.py).
    assert report["plan"]["fits"] is True and report["plan_error"] is None

    hub.clear()
    daemon.llmctl("pull", "hf-tiny")
    assert len(hub.gets("tiny-Q4_K_M.gguf")) == 1 and not hub.gets("tiny-Q8_0.gguf")
    plan = json.loads(daemon.llmctl("plan", "hf-tiny", "--json").stdout)
    assert plan["fits"] is True
    assert _chat(daemon, "hf-tiny").status_code == 200


# ----- --from-hf, on the files alone -----


def test_from_hf_chooses_q4_k_m_and_lists_the_alternatives(offline: dict[str, Path], hub: HubStandin) -> None:
    result = llmctl(offline["config"], "profile", "new", "qwen", "--from-hf", GGUF_REPO)
    assert result.returncode == 0, result.stderr
    assert "llmd is not running: planned here" in result.stdout
    assert "placement: CPU only" in result.stdout  # planned from the header, before any download
    path = offline["profiles"] / "qwen.toml"
    data = tomllib.loads(path.read_text())
    assert data["engine"] == "llama-cpp"
    assert data["model"] == {"hf_repo": GGUF_REPO, "hf_file": "tiny-Q4_K_M.gguf"}
    text = path.read_text()
    assert "#   tiny-Q8_0.gguf  (Q8_0" in text and "#   tiny-F16.gguf  (F16" in text
    assert "mmproj" not in text  # a vision projector is not a model to run
    assert f'# revision = "{hub.repos[GGUF_REPO].refs["main"]}"' in text
    load_profile(path, {"llama-cpp"})


def test_from_hf_with_file_and_revision(offline: dict[str, Path], hub: HubStandin) -> None:
    commit = hub.repos[GGUF_REPO].refs["main"]
    result = llmctl(offline["config"], "profile", "new", "q8", "--from-hf", GGUF_REPO, "--file", "tiny-Q8_0.gguf",
                    "--revision", commit, "--json")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)["profile"]["model"]
    assert model == {"hf_repo": GGUF_REPO, "hf_file": "tiny-Q8_0.gguf", "revision": commit}

    wrong = llmctl(offline["config"], "profile", "new", "q9", "--from-hf", GGUF_REPO, "--file", "nope.gguf")
    assert wrong.returncode == 2
    assert "--file 'nope.gguf' is not a GGUF file in acme/tiny-GGUF" in wrong.stderr and "tiny-Q4_K_M.gguf" in wrong.stderr


def test_from_hf_safetensors_repo_means_vllm_on_the_snapshot(offline: dict[str, Path], hub: HubStandin) -> None:
    result = llmctl(offline["config"], "profile", "new", "hf", "--from-hf", HF_REPO, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["profile"]["engine"] == "vllm"
    assert report["profile"]["model"] == {"hf_repo": HF_REPO}
    assert report["planned_by"] == "local"

    gguf_engine = llmctl(offline["config"], "profile", "new", "hf2", "--from-hf", HF_REPO, "--engine", "llama-cpp")
    assert gguf_engine.returncode == 2 and "has no GGUF file for llama-cpp" in gguf_engine.stderr


def test_from_hf_unknown_repo_fails_with_the_hubs_reason(offline: dict[str, Path], hub: HubStandin) -> None:
    result = llmctl(offline["config"], "profile", "new", "x", "--from-hf", "acme/missing", env={"HF_TOKEN": "GOOD"})
    assert result.returncode == 1
    assert "acme/missing was not found at" in result.stderr
    assert not (offline["profiles"] / "x.toml").exists()


# ----- refusals -----


@pytest.mark.parametrize(("repo", "rule"), [
    ("acme--x/tiny", "Cannot have -- or .."),  # passes a plain owner/name pattern; the Hub refuses it
    ("acme/tiny/extra", "it must be owner/name"),
    ("acme/tiny.", "cannot start or end with"),
])
def test_a_malformed_from_hf_repo_is_a_usage_error_about_the_option(offline: dict[str, Path], repo: str, rule: str) -> None:
    result = llmctl(offline["config"], "profile", "new", "x", "--from-hf", repo)
    assert result.returncode == 2, result.stderr
    assert f"--from-hf {repo!r} is not a Hugging Face repo id" in result.stderr and rule in result.stderr
    assert "as owner/name" in result.stderr
    assert "in the profile" not in result.stderr  # no profile was written: no advice about one
    assert not (offline["profiles"] / "x.toml").exists()


def test_an_existing_profile_is_not_overwritten_without_force(offline: dict[str, Path], tiny_gguf: Path) -> None:
    first = llmctl(offline["config"], "profile", "new", "tiny", "--model", str(tiny_gguf), "--ctx", "512")
    assert first.returncode == 0, first.stderr
    path = offline["profiles"] / "tiny.toml"
    before = path.read_text()
    again = llmctl(offline["config"], "profile", "new", "tiny", "--model", str(tiny_gguf), "--ctx", "1024")
    assert again.returncode == 1
    assert f"{path} exists already; pass --force" in again.stderr
    assert path.read_text() == before
    forced = llmctl(offline["config"], "profile", "new", "tiny", "--model", str(tiny_gguf), "--ctx", "1024", "--force")
    assert forced.returncode == 0, forced.stderr
    assert tomllib.loads(path.read_text())["launch"]["ctx"] == 1024
    assert [p.name for p in offline["profiles"].iterdir()] == ["tiny.toml"]  # no scratch file left behind


def test_an_alias_taken_by_another_profile_is_refused(offline: dict[str, Path], tiny_gguf: Path) -> None:
    assert llmctl(offline["config"], "profile", "new", "a", "--model", str(tiny_gguf), "--alias", "shared").returncode == 0
    clash = llmctl(offline["config"], "profile", "new", "b", "--model", str(tiny_gguf), "--alias", "shared")
    assert clash.returncode == 1
    assert "'shared' is already served by" in clash.stderr and not (offline["profiles"] / "b.toml").exists()


def test_a_bad_engine_names_the_valid_ones(offline: dict[str, Path], tiny_gguf: Path) -> None:
    result = llmctl(offline["config"], "profile", "new", "tiny", "--engine", "llama.cpp", "--model", str(tiny_gguf))
    assert result.returncode == 2
    assert "--engine 'llama.cpp' is not a known engine; use one of:" in result.stderr
    for engine in ("llama-cpp", "vllm", "fastllm"):
        assert engine in result.stderr
    assert not (offline["profiles"] / "tiny.toml").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttl", "soon"], "policy.ttl: 'soon' is not a duration"),
        (["--tp", "0"], "launch.tensor_parallel"),
        (["--extra-arg", "--port=9"], "--port is set by llmd"),
        (["--file", "x.gguf"], "--file and --revision are for a Hugging Face repo"),
    ],
)
def test_bad_option_values_are_usage_errors(offline: dict[str, Path], tiny_gguf: Path, args: list[str], message: str) -> None:
    result = llmctl(offline["config"], "profile", "new", "tiny", "--model", str(tiny_gguf), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (offline["profiles"] / "tiny.toml").exists()


def test_model_and_from_hf_go_alone(offline: dict[str, Path], tmp_path: Path) -> None:
    neither = llmctl(offline["config"], "profile", "new", "x")
    assert neither.returncode == 2 and "give --model PATH_OR_REPO or --from-hf REPO" in neither.stderr
    missing = llmctl(offline["config"], "profile", "new", "x", "--model", str(tmp_path / "absent.gguf"))
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    bad_name = llmctl(offline["config"], "profile", "new", "a/b", "--model", str(tmp_path))
    assert bad_name.returncode == 2 and "is not a valid model name" in bad_name.stderr


# ----- choosing a GGUF file -----


def test_quantisation_is_read_from_file_names() -> None:
    assert quant_of("Qwen3-0.6B-Q8_0.gguf") == "Q8_0"
    assert quant_of("qwen2.5-7b-instruct-q4_k_m.gguf") == "Q4_K_M"
    assert quant_of("Q4_K_M/Model-Q4_K_M-00001-of-00002.gguf") == "Q4_K_M"
    assert quant_of("model.IQ4_XS.gguf") == "IQ4_XS"
    assert quant_of("model-BF16.gguf") == "BF16"
    assert quant_of("model.gguf") is None


def test_sharded_models_count_once_by_their_first_shard() -> None:
    files = [HubFile("big/M-Q4_K_M-00001-of-00002.gguf", 10), HubFile("big/M-Q4_K_M-00002-of-00002.gguf", 10),
             HubFile("M-Q8_0.gguf", 30)]
    chosen, lines = choose_gguf(files, None, "r")
    assert chosen == "big/M-Q4_K_M-00001-of-00002.gguf"
    assert len(lines) == 2 and "M-Q8_0.gguf" in lines[1]
    # Without a known quantisation the smallest file is chosen: it fits the most machines.
    assert choose_gguf([HubFile("a.gguf", 9), HubFile("b.gguf", 3)], None, "r")[0] == "b.gguf"
