"""Profiles: validation, clear errors per file, and the examples shipped in profiles/."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmd.daemon.util.durations import format_duration, parse_duration
from llmd.daemon.errors import ConfigError
from llmd.daemon.models.profiles import load_profile, load_profiles
from llmd.drivers.registry import load_drivers

REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
GOOD = 'engine = "llama-cpp"\naliases = ["a1"]\n[model]\npath = "/models/x.gguf"\n[launch]\nctx = 4096\nextra_args = ["--flash-attn", "on"]\n[policy]\nttl = "30m"\n'


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def test_good_profile(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, "qwen3-0.6b", GOOD), {"llama-cpp"})
    assert profile.name == "qwen3-0.6b"
    assert profile.launch.extra_args == ["--flash-attn", "on"]
    assert profile.policy.ttl_seconds == 1800


def test_relative_model_path_resolves_against_profile(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, "m", 'engine = "llama-cpp"\n[model]\npath = "x.gguf"\n'))
    assert profile.model.path == tmp_path / "x.gguf"


@pytest.mark.parametrize(
    ("text", "field", "fix"),
    [
        ('engine = "llama-cpp"\n', "model: Field required", "add it"),
        ('engine = "llama-cpp"\n[model]\n', "model: set exactly one of path", ""),
        ('engine = "llama-cpp"\n[model]\npath = "/x"\nhf_repo = "a/b"\n', "set exactly one of", ""),
        ('engine = "llama-cpp"\n[model]\npath = "/x"\n[launch]\nctx = -4\n', "launch.ctx", "use a larger value"),
        ('engine = "llama-cpp"\n[model]\npath = "/x"\n[launch]\nctx = "big"\n', "launch.ctx", "whole number"),
        ('engine = "llama-cpp"\n[model]\npath = "/x"\n[launch]\nextra_args = "--foo"\n', "launch.extra_args", "write a list"),
        ('engine = "llama-cpp"\n[model]\npath = "/x"\n[policy]\nttl = "soon"\n', "policy.ttl", "1h30m"),
        ('engine = "llama-cpp"\n[model]\npath = "/x"\n[lanuch]\nctx = 1\n', "lanuch: unknown table [lanuch]", "did you mean [launch]?"),
        ('engine = "llama-cpp"\naliases = ["../etc"]\n[model]\npath = "/x"\n', "aliases", "not a valid model name"),
        ('engine = \n', "invalid TOML", ""),
    ],
)
def test_bad_profile_names_file_field_and_fix(tmp_path: Path, text: str, field: str, fix: str) -> None:
    path = write(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as caught:
        load_profile(path, {"llama-cpp"})
    message = str(caught.value)
    assert message.startswith(str(path))
    assert field in message
    assert fix in message


def test_unknown_engine_lists_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "m", 'engine = "ollama"\n[model]\npath = "/x"\n')
    with pytest.raises(ConfigError, match="unknown engine 'ollama'; use one of: llama-cpp"):
        load_profile(path, {"llama-cpp"})


def test_bad_file_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid model name"):
        load_profile(write(tmp_path, "a..b", GOOD))


def test_one_bad_file_does_not_hide_the_good_ones(tmp_path: Path) -> None:
    write(tmp_path, "good", GOOD)
    write(tmp_path, "bad", 'engine = "llama-cpp"\n')
    write(tmp_path, "zclash", GOOD)  # alias a1 is taken by good.toml, read first
    found = load_profiles([tmp_path, tmp_path / "missing-dir"], {"llama-cpp"})
    assert set(found.profiles) == {"good"}
    assert set(found.errors) == {"bad", "zclash"}
    assert "already served by" in found.errors["zclash"]
    assert found.resolve("a1").name == "good"
    assert found.resolve("bad") is None


def test_repo_example_profiles_are_valid() -> None:
    found = load_profiles([REPO_PROFILES], set(load_drivers()))
    assert found.errors == {}
    assert {"qwen3-0.6b", "qwen3-next-80b-a3b"} <= set(found.profiles)
    moe = found.profiles["qwen3-next-80b-a3b"]
    assert moe.launch.offload == "moe-experts"


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("1h30m", 5400), ("90s", 90), ("never", None), ("0", None), ("1.5h", 5400)])
def test_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "-5m", "5m banana"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 5, 303, 7800, 90000)] == ["-", "5s", "5m03s", "2h10m", "1d1h"]


def test_persist_kv_settings(tmp_path: Path) -> None:
    profile = load_profile(write(tmp_path, "m", GOOD), {"llama-cpp"})
    assert profile.policy.persist_kv is False and profile.policy.kv_save_timeout_seconds == 5.0
    text = 'engine = "llama-cpp"\n[model]\npath = "/x"\n[policy]\npersist_kv = true\nkv_save_timeout = "500ms"\n'
    profile = load_profile(write(tmp_path, "kept", text), {"llama-cpp"}, (), {"llama-cpp"})
    assert profile.policy.persist_kv and profile.policy.kv_save_timeout_seconds == 0.5
    for bad in ("never", "0", "soon"):
        with pytest.raises(ConfigError, match="policy.kv_save_timeout"):
            load_profile(write(tmp_path, "bad", text.replace("500ms", bad)), {"llama-cpp"})
    with pytest.raises(ConfigError, match="the vllm engine cannot save and restore its prompt cache"):
        load_profile(write(tmp_path, "v", text.replace("llama-cpp", "vllm")), {"llama-cpp", "vllm"}, (), {"llama-cpp"})
