"""Profiles that tell the truth: a missing model file or profile directory is said so, an unknown
key is named as a misspelling or a key of another table, and an engine that cannot serve
embeddings is named when a profile asks it to."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from conftest import tiny_profile, wait_until
from llmd.daemon.errors import ConfigError
from llmd.daemon.manager.profile_changes import Change, classify
from llmd.daemon.models.profiles import Profile, load_profile, load_profiles
from llmd.daemon.util.unknown_keys import explain_unknown_key, typos

HEAD = 'engine = "llama-cpp"\n[model]\npath = "/x"\n'


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (HEAD + "[launch]\ncxt = 1\n", "launch.cxt: unknown key; did you mean `ctx`?"),
        (HEAD + "[launch]\nextra_arg = []\n", "launch.extra_arg: unknown key; did you mean `extra_args`?"),
        (HEAD + '[launch]\nttl = "5m"\n', "launch.ttl: unknown key; `ttl` belongs in [policy], not in [launch]"),
        (HEAD + 'ttl = "5m"\n', "model.ttl: unknown key; `ttl` belongs in [policy], not in [model]"),
        ('ttl = "5m"\n' + HEAD, "ttl: unknown key; `ttl` belongs in [policy], not at the top of the file"),
        (HEAD + '[policy]\nengine = "x"\n', "`engine` belongs at the top of the file, not in [policy]"),
        (HEAD + "[lanuch]\nctx = 1\n", "lanuch: unknown table [lanuch]; did you mean [launch]?"),
        (HEAD + "[policy]\ntll = 1\n", "policy.tll: unknown key; did you mean `ttl`?"),
        (HEAD + "[policy]\nwhatever = 1\n", "policy.whatever: unknown key; fix: remove it, or check its spelling"),
    ],
)
def test_an_unknown_key_is_named_for_what_it_likely_is(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, "m", text)
    with pytest.raises(ConfigError) as caught:
        load_profile(path, {"llama-cpp"})
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")
    assert "Extra inputs" not in str(caught.value)


def test_unknown_keys_in_llmd_toml_too(tmp_path: Path) -> None:
    from llmd.daemon.config import DaemonConfig, load_config

    path = tmp_path / "llmd.toml"
    path.write_text('[server]\ncommand = ["x"]\n[engines.llama-cpp]\ncomand = ["x"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "server.command: unknown key; `command` belongs in [engines.NAME], not in [server]" in str(caught.value)
    assert "engines.llama-cpp.comand: unknown key; did you mean `command`?" in str(caught.value)
    assert explain_unknown_key(DaemonConfig, ("gpu",), {}) == "unknown table [gpu]; did you mean [gpus]?"


def test_typos_count_a_swap_as_one() -> None:
    assert typos("cxt", "ctx") == 1 and typos("lanuch", "launch") == 1 and typos("listn", "listen") == 1
    assert typos("bogus", "gpus") == 3


def test_a_missing_model_file_makes_the_profile_invalid_for_the_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "absent.gguf"
    write(tmp_path, "ghost", f'engine = "llama-cpp"\n[model]\npath = "{missing}"\n')
    assert set(load_profiles([tmp_path], {"llama-cpp"}).profiles) == {"ghost"}  # only the daemon requires the file
    found = load_profiles([tmp_path, tmp_path / "nowhere"], {"llama-cpp"}, require_model_files=True)
    assert found.profiles == {}
    assert f"model.path: {missing} does not exist" in found.errors["ghost"]
    assert found.missing_dirs == [tmp_path / "nowhere"]


def test_embeddings_are_refused_for_an_engine_that_cannot_serve_them(tmp_path: Path) -> None:
    text = 'engine = "fastllm"\n[model]\npath = "/x"\n[launch]\nembeddings = true\n'
    with pytest.raises(ConfigError, match=r"launch.embeddings: the fastllm engine cannot serve /v1/embeddings \(engines that can: llama-cpp, vllm\)"):
        load_profile(write(tmp_path, "f", text), {"fastllm", "llama-cpp", "vllm"}, embedding_engines={"llama-cpp", "vllm"})
    assert load_profile(write(tmp_path, "l", text.replace("fastllm", "llama-cpp")), embedding_engines={"llama-cpp"}).launch.embeddings


def test_the_drivers_start_their_engine_for_embeddings() -> None:
    from llmd.drivers.base import LaunchRequest, Placement, serves_embeddings
    from llmd.drivers.fastllm import FastllmDriver
    from llmd.drivers.llama_cpp import LlamaCppDriver
    from llmd.drivers.vllm import VllmDriver

    def argv(driver, embeddings: bool) -> list[str]:  # type: ignore[no-untyped-def]
        profile = Profile.model_validate({"engine": driver.name, "model": {"path": "/m"}, "launch": {"embeddings": embeddings}})
        profile.name = "m"
        request = LaunchRequest(profile=profile, placement=Placement(ctx=512), model_path=Path("/m"), host="127.0.0.1",
                                port=1, command=["engine"])
        return driver.launch(request).argv

    assert "--embeddings" in argv(LlamaCppDriver(), True) and "--embeddings" not in argv(LlamaCppDriver(), False)
    vllm = argv(VllmDriver(), True)
    assert vllm[vllm.index("--runner") + 1] == "pooling" and "--runner" not in argv(VllmDriver(), False)
    assert serves_embeddings(LlamaCppDriver()) and serves_embeddings(VllmDriver()) and not serves_embeddings(FastllmDriver())


def _profile(**changes: object) -> Profile:
    data: dict[str, object] = {"engine": "llama-cpp", "model": {"path": "/m"}, "policy": {"ttl": "30m"}}
    data.update(changes)
    profile = Profile.model_validate(data)
    profile.name = "m"
    return profile


def test_what_an_edit_takes() -> None:
    old = _profile()
    never = lambda aliases: False  # noqa: E731 - the engine is not told its aliases
    always = lambda aliases: True  # noqa: E731
    assert classify(old, _profile(), always) is Change.NONE
    assert classify(old, _profile(policy={"ttl": "5m", "priority": 3, "pinned": True}), always) is Change.IN_PLACE
    assert classify(old, _profile(description="x"), always) is Change.IN_PLACE
    assert classify(old, _profile(aliases=["b"]), never) is Change.IN_PLACE
    assert classify(old, _profile(aliases=["b"]), always) is Change.RESTART  # vLLM's --served-model-name
    assert classify(old, _profile(launch={"ctx": 1024}), never) is Change.RESTART
    assert classify(old, _profile(policy={"ttl": "30m", "persist_kv": True}), never) is Change.RESTART


def test_aliases_reach_vllm_but_not_llama_server() -> None:
    from llmd.daemon.manager.profile_changes import aliases_reach_engine
    from llmd.drivers.base import LaunchRequest, Placement
    from llmd.drivers.llama_cpp import LlamaCppDriver
    from llmd.drivers.vllm import VllmDriver

    for driver, reaches in ((LlamaCppDriver(), False), (VllmDriver(), True)):
        profile = _profile(engine=driver.name, aliases=["a"])
        request = LaunchRequest(profile=profile, placement=Placement(ctx=512), model_path=Path("/m"), host="127.0.0.1",
                                port=1, command=["engine"])
        spec = driver.launch(request)
        assert aliases_reach_engine(driver, request, spec, ["a"]) is False
        assert aliases_reach_engine(driver, request, spec, ["a", "b"]) is reaches
    assert aliases_reach_engine(LlamaCppDriver(), None, None, ["b"]) is True  # nothing to compare: restart


@pytest.mark.engine
def test_the_daemon_says_what_is_missing(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf), "ghost": tiny_profile(missing)}, start=False)
    config = daemon.root / "llmd.toml"
    nowhere = daemon.root / "no-such-profiles"
    config.write_text(config.read_text().replace(
        f'profile_dirs = ["{daemon.profiles_dir}"]', f'profile_dirs = ["{daemon.profiles_dir}", "{nowhere}"]'
    ))
    daemon.start()
    wait_until(lambda: "llmd ready" in daemon.log(), what="the daemon to be ready")
    assert f"profile directory {nowhere} does not exist" in daemon.log()
    ghost = next(row for row in json.loads(daemon.llmctl("ls", "--json").stdout) if row["name"] == "ghost")
    assert not ghost["valid"] and f"model.path: {missing} does not exist" in ghost["error"]
    assert [m["id"] for m in httpx.get(daemon.url + "/v1/models").json()["data"]] == ["tiny"]

    missing.write_bytes(tiny_gguf.read_bytes())  # the file arrives: a reload serves it
    nowhere.mkdir()
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=30) as client:
        assert client.post("http://llmd/v1/reload").json()["changes"]["added"] == ["ghost"]
    assert [m["id"] for m in httpx.get(daemon.url + "/v1/models").json()["data"]] == ["ghost", "tiny"]
    assert daemon.log().count("does not exist, so no profiles are read from it") == 1

