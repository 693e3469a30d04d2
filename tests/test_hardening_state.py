"""A damaged state file never stops a start.

Each file llmd keeps under its state dir (the pid ledger, the measured VRAM, bench results, the
saved prompt caches' manifests, the Hub GGUF header cache) is corrupted in each way: not JSON,
the wrong shape, values that make no sense, and not a file at all (a directory, a FIFO). The
daemon starts, warns naming the file, moves it aside and serves."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import tiny_profile, wait_until
from hub_standin import HubStandin
from huggingface_hub import constants

from llmd.daemon.util import atomic_write
from llmd.daemon.util.atomic_write import write_json_atomic
from llmd.daemon.util.state_file import BadState, expect, expect_number, read_state

WAYS = ["bad-json", "wrong-shape", "bad-values", "directory", "fifo"]
HUB_REPO = "acme/tiny-GGUF"
HUB_FILE = "tiny.gguf"

# For each state file, content whose JSON is fine but whose values are not.
BAD_VALUES: dict[str, Any] = {
    "engines.json": {"tiny": {"pid": -1, "create_time": 1.0, "argv": ["llama-server"], "port": 8080}},
    "measured-vram.json": {"tiny": {"fingerprint": "abc", "per_gpu_mib": {}, "estimate_mib": 100, "measured_at": 1.0}},
    "bench": {"headline": ["not", "a", "string"], "rows": "none", "measured_at": 1.0, "engine": "llama-cpp"},
    "kv": {"version": 1, "key": {}, "slots": {"0": {
        "slot": 0, "file": "../../../engines.json", "bytes": 1, "sha256": "x", "tokens": 1, "saved_at": 0, "used_at": 0}}},
    # The gguf-headers index: taken from a real one, with its length made negative.
}


def corrupt(path: Path, way: str, bad_values: Any) -> None:
    """Put a damaged `path` in place, `way` saying how."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if way == "bad-json":
        path.write_text('{"tiny": {"pid": 1,')
    elif way == "wrong-shape":
        path.write_text('["a list", "where an object belongs"]')
    elif way == "bad-values":
        path.write_text(json.dumps(bad_values))
    elif way == "directory":  # unreadable even for root, unlike a file with mode 000
        path.mkdir()
    elif way == "fifo":  # opening it for reading would wait forever for a writer
        os.mkfifo(path)
    else:
        raise AssertionError(way)


def moved_aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


# ----- the one reader -----


def _parse_counter(raw: Any) -> dict[str, int]:
    expect(raw, dict, "the file")
    return {name: expect_number(value, name, minimum=1, integer=True) for name, value in raw.items()}


@pytest.mark.parametrize("way", WAYS)
def test_a_damaged_file_is_reported_moved_aside_and_read_as_absent(way: str, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "counter.json"
    corrupt(path, way, {"a": -1})
    assert read_state(path, _parse_counter) is None
    (aside,) = moved_aside(path)
    assert not os.path.lexists(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"ignoring state file {path}" in warnings[0] and aside.name in warnings[0]
    # The next read starts clean: no file, no warning.
    caplog.clear()
    assert read_state(path, _parse_counter) is None and not caplog.records


def test_a_sound_file_is_parsed_and_a_missing_one_is_no_warning(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "counter.json"
    assert read_state(path, _parse_counter) is None
    write_json_atomic(path, {"a": 1, "b": 2})
    assert read_state(path, _parse_counter) == {"a": 1, "b": 2}
    assert not caplog.records and not moved_aside(path)


def test_the_checks_name_the_value_and_refuse_what_json_allows(tmp_path: Path) -> None:
    with pytest.raises(BadState, match="pid is True, not an integer"):
        expect_number(True, "pid", integer=True)
    with pytest.raises(BadState, match="pid is -1, not an integer of at least 1"):
        expect_number(-1, "pid", minimum=1, integer=True)
    with pytest.raises(BadState, match="t is nan"):
        expect_number(float("nan"), "t")
    path = tmp_path / "big.json"
    path.write_text(" " * 2000 + "{}")
    assert read_state(path, lambda raw: raw, max_bytes=1000) is None and moved_aside(path)


def test_an_atomic_write_syncs_the_directory_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic_write.os, "fsync", fsync)
    target = write_json_atomic(tmp_path / "state" / "x.json", {"a": 1})
    # The data first (the scratch file, renamed since), then the directory that holds the new name.
    assert synced[-1] == str(target.parent) and len(synced) == 2


# ----- a real daemon -----


@pytest.fixture
def hub(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    with HubStandin() as standin:
        standin.add_commit(HUB_REPO, {HUB_FILE: tiny_gguf.read_bytes()})
        standin.use_in_env(monkeypatch, tmp_path / "hf-home")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        yield standin


@pytest.mark.engine
@pytest.mark.parametrize("way", WAYS)
def test_each_damaged_state_file_is_set_aside_and_the_daemon_serves(  # type: ignore[no-untyped-def]
    way: str, make_daemon, hub: HubStandin, tiny_gguf: Path
) -> None:
    hub_profile = f'engine = "llama-cpp"\n[model]\nhf_repo = "{HUB_REPO}"\nhf_file = "{HUB_FILE}"\n[launch]\nctx = 512\n'
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf), "hubtiny": hub_profile}, start=False)
    state = daemon.state_dir
    files = {
        "engines.json": state / "engines.json",
        "measured-vram.json": state / "measured-vram.json",
        "bench": state / "bench" / "tiny.json",
        # A manifest of saves for a model no profile serves now: `ps` still counts them.
        "kv": state / "kv" / "gone" / "0123456789abcdef" / "manifest.json",
    }
    for key, path in files.items():
        corrupt(path, way, BAD_VALUES[key])

    daemon.start()  # the ledger and the measurements are read on the way up
    ls = daemon.llmctl("ls")  # the bench result
    assert "tiny" in ls.stdout
    daemon.llmctl("load", "tiny")
    assert daemon.state("tiny") == "ready"  # and `ps` read the manifests of the saved prompt caches
    reply = httpx.post(daemon.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert reply.status_code == 200, reply.text

    # The Hub header cache is read by `plan`: fill it, damage its index, plan again.
    daemon.llmctl("plan", "hubtiny")
    (index,) = (state / "gguf-headers").glob("*.json")
    sound = json.loads(index.read_text())
    corrupt(index, way, {**sound, "length": -5})
    files["gguf-headers"] = index
    assert "hubtiny" in daemon.llmctl("plan", "hubtiny").stdout

    log = daemon.log()
    for key, path in files.items():
        assert f"ignoring state file {path}" in log, f"{key}: no warning naming {path}:\n{log}"
        assert moved_aside(path), f"{key}: {path} was not moved aside"
    assert log.count("moved it aside") >= len(files)
    assert daemon.process is not None and daemon.process.poll() is None


@pytest.mark.engine
def test_a_pid_ledger_with_a_stranger_pid_signals_no_one(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    """A pid of 0 or -1 would signal the daemon's whole process group, or every process."""
    daemon = make_daemon({"tiny": tiny_profile(tiny_gguf)}, start=False)
    corrupt(daemon.state_dir / "engines.json", "bad-values",
            {"a": {"pid": 0, "create_time": 0.0}, "b": {"pid": -1, "create_time": 0.0}})
    daemon.start()
    wait_until(lambda: moved_aside(daemon.state_dir / "engines.json"), what="the ledger moved aside")
    daemon.llmctl("load", "tiny")
    assert daemon.state("tiny") == "ready"
