"""Prompt caches that survive a stop (`[policy] persist_kv`), with real llama-server engines.

The model is generated wide enough (8 layers x 512) that a 3,400-token prompt takes seconds to
process on a CPU, so a restored cache shows in the time to first token of the next turn, as a
ratio to the cold one measured in the same test. The store's own rules (keys, checks, the disk
cap) are also tested without an engine at the end.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from conftest import engine_processes, wait_until
from llmd.daemon.engines.kv_store import KvStore, SavedSlot, key_id, launch_key
from llmd.daemon.errors import ConfigError
from llmd.daemon.models.profiles import kv_engines_of, load_profile, load_profiles
from llmd.daemon.models.tinymodel import write_tiny_gguf
from llmd.drivers.registry import load_drivers

# About 3,400 tokens with the tiny tokenizer (mostly one byte a token): the long
# conversation. The medium one (about 800 tokens) is for tests that only need some cache.
LONG_WORDS = 700
MEDIUM_WORDS = 160
# The follow-up must take at most this share of the cold prefill's time to first token.
RATIO_LIMIT = 0.35
CTX = 4096
CARD_MIB = 2000


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "wide.gguf", n_layers=8, n_embd=512, n_ff=1024,
                           n_head=8, n_head_kv=8, ctx=CTX)


def _profile(model: Path, *, persist: bool = True, ctx: int = CTX, vram: int | None = None, extra: str = "") -> str:
    text = f"""\
        engine = "llama-cpp"
        [model]
        path = "{model}"
        [launch]
        ctx = {ctx}
        [policy]
        ttl = "30m"
        persist_kv = {str(persist).lower()}
        {extra}
        """
    if vram is not None:
        text += f"""\
        [placement]
        vram_mib = {vram}
        """
    return text


def _conversation(words: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(f"w{i}" for i in range(words))}]


def _follow_up(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then some more words please"}]


def _turn(daemon, model: str, messages: list[dict[str, str]]) -> tuple[float, dict]:  # type: ignore[no-untyped-def]
    """One streamed turn: (seconds to its first event, the usage it reports)."""
    body = {"model": model, "messages": messages, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    began = time.monotonic()
    first, usage = None, None
    with httpx.stream("POST", daemon.url + "/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None:
                first = time.monotonic() - began
            event = json.loads(line.removeprefix("data: "))
            usage = event.get("usage") or usage
    assert first is not None and usage is not None
    return first, usage


def _cached(usage: dict) -> int:
    return (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def _row(daemon, model: str) -> dict:  # type: ignore[no-untyped-def]
    return next(row for row in daemon.ps() if row["model"] == model)


def _metric(daemon, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    text = httpx.get(daemon.url + "/metrics", timeout=10).text
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


def _saves(daemon, model: str) -> list[Path]:  # type: ignore[no-untyped-def]
    return sorted((daemon.state_dir / "kv" / model).glob("*/slot*.bin"))


def _swap_back_ratio(daemon, model: str, cold: float, cold_usage: dict, messages: list) -> float:  # type: ignore[no-untyped-def]
    """The follow-up turn on a model just restored: most of its prompt cached, and its time to
    first token a small share of the cold one. Returns that share."""
    warm, usage = _turn(daemon, model, _follow_up(messages))
    assert _cached(cold_usage) == 0
    assert _cached(usage) >= cold_usage["prompt_tokens"] - 8, usage
    assert _cached(usage) >= 0.9 * usage["prompt_tokens"], usage
    ratio = warm / cold
    assert ratio <= RATIO_LIMIT, f"follow-up {warm:.3f}s vs cold {cold:.3f}s: ratio {ratio:.2f}"
    return ratio


# ----- with a real engine -----


@pytest.mark.engine
def test_unload_and_reload_restore_a_long_conversation(make_daemon, wide_gguf: Path) -> None:
    daemon = make_daemon({"chat": _profile(wide_gguf)})
    daemon.llmctl("load", "chat")
    messages = _conversation(LONG_WORDS)
    cold, cold_usage = _turn(daemon, "chat", messages)
    assert cold_usage["prompt_tokens"] > 3000

    daemon.llmctl("unload", "chat")
    row = _row(daemon, "chat")
    assert row["state"] == "stopped"
    assert row["kv_saved_tokens"] >= cold_usage["prompt_tokens"] and row["kv_saved_bytes"] > 10_000_000
    assert "tok," in daemon.llmctl("ps").stdout  # the KV SAVED column
    assert len(_saves(daemon, "chat")) == 1

    daemon.llmctl("load", "chat")
    assert _row(daemon, "chat")["kv_restored_tokens"] >= cold_usage["prompt_tokens"]
    _swap_back_ratio(daemon, "chat", cold, cold_usage, messages)

    log = daemon.log()
    assert "chat: saved" in log and "chat: restored" in log
    assert _metric(daemon, "llmd_kv_saves_total", model="chat", result="saved") == 1
    assert _metric(daemon, "llmd_kv_restores_total", model="chat", result="restored") == 1
    assert _metric(daemon, "llmd_kv_restored_tokens_total", model="chat") >= cold_usage["prompt_tokens"]
    assert _metric(daemon, "llmd_kv_saved_bytes_total", model="chat") == row["kv_saved_bytes"]
    assert _metric(daemon, "llmd_kv_restore_duration_seconds_count", model="chat") == 1


@pytest.mark.engine
def test_an_evicted_model_gets_its_conversation_back(make_daemon, wide_gguf: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [{"name": "Sim", "total_mib": CARD_MIB, "free_mib": CARD_MIB}] * 2}))
    profiles = {
        "a": _profile(wide_gguf, vram=1200),
        "b": _profile(tiny_gguf, persist=False, ctx=512, vram=1200),
        "c": _profile(tiny_gguf, persist=False, ctx=512, vram=1200),
    }
    daemon = make_daemon(profiles, extra_config=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n')
    daemon.llmctl("load", "a")
    messages = _conversation(LONG_WORDS)
    cold, cold_usage = _turn(daemon, "a", messages)
    daemon.llmctl("load", "b")
    daemon.llmctl("load", "c")  # both cards taken: a, least recently used, is evicted
    assert _row(daemon, "a")["state"] == "stopped"
    assert "stopping a (evicted to make room)" in daemon.log()
    assert _row(daemon, "a")["kv_saved_tokens"] >= cold_usage["prompt_tokens"]

    daemon.llmctl("load", "a")  # evicts b in turn; a's cache comes back wherever it lands
    assert _row(daemon, "b")["state"] == "stopped"
    _swap_back_ratio(daemon, "a", cold, cold_usage, messages)


@pytest.mark.engine
def test_a_daemon_restart_or_crash_keeps_the_saved_conversation(make_daemon, wide_gguf: Path) -> None:
    daemon = make_daemon({"chat": _profile(wide_gguf)})
    daemon.llmctl("load", "chat")
    messages = _conversation(LONG_WORDS)
    cold, cold_usage = _turn(daemon, "chat", messages)

    assert daemon.stop() == 0  # SIGTERM: every engine is stopped, and saved first
    assert "chat: saved" in daemon.log()
    daemon.start()
    daemon.llmctl("load", "chat")
    _swap_back_ratio(daemon, "chat", cold, cold_usage, messages)

    # A crash saves nothing new, and loses nothing already saved.
    daemon.stop(signal.SIGKILL)
    wait_until(lambda: not engine_processes(daemon.state_dir), timeout=30, what="the engine to die with llmd")
    daemon.start()
    daemon.llmctl("load", "chat")
    _swap_back_ratio(daemon, "chat", cold, cold_usage, messages)


@pytest.mark.engine
def test_a_changed_context_size_invalidates_the_saved_cache(make_daemon, wide_gguf: Path) -> None:
    daemon = make_daemon({"chat": _profile(wide_gguf)})
    daemon.llmctl("load", "chat")
    messages = _conversation(MEDIUM_WORDS)
    _, first = _turn(daemon, "chat", messages)
    daemon.add_profile("chat", _profile(wide_gguf, ctx=2048))
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)  # the profile changed: llmd restarts the model
    wait_until(lambda: "chat: dropped" in daemon.log() and _row(daemon, "chat")["state"] == "ready",
               timeout=120, what="chat to restart with its new context size")
    assert "chat: saved" in daemon.log()  # saved on the way down, then found invalid on the way up
    assert "chat: restored" not in daemon.log()
    assert _row(daemon, "chat")["kv_restored_tokens"] == 0
    assert len(list((daemon.state_dir / "kv" / "chat").iterdir())) == 1  # only the new launch's directory

    _, usage = _turn(daemon, "chat", _follow_up(messages))
    assert _cached(usage) == 0 and usage["prompt_tokens"] > first["prompt_tokens"]
    assert usage["completion_tokens"] > 0


@pytest.mark.engine
@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate-and-forge"])
def test_a_damaged_save_is_dropped_and_the_model_still_starts(make_daemon, wide_gguf: Path, damage: str) -> None:
    daemon = make_daemon({"chat": _profile(wide_gguf)})
    daemon.llmctl("load", "chat")
    messages = _conversation(MEDIUM_WORDS)
    _turn(daemon, "chat", messages)
    daemon.llmctl("unload", "chat")
    [save] = _saves(daemon, "chat")
    data = bytearray(save.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        save.write_bytes(bytes(data))
    else:
        save.write_bytes(bytes(data[: len(data) // 3]))
    if damage == "truncate-and-forge":
        # The manifest agrees with the truncated file, so llmd's checks pass and the engine
        # itself meets it: llama-server aborts on a truncated save. llmd drops it and starts
        # the engine again.
        manifest_path = save.parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        entry = manifest["slots"]["0"]
        entry["bytes"] = save.stat().st_size
        entry["sha256"] = hashlib.sha256(save.read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))

    daemon.llmctl("load", "chat")
    row = _row(daemon, "chat")
    assert row["state"] == "ready" and row["kv_restored_tokens"] == 0 and row["kv_saved_tokens"] == 0
    log = daemon.log()
    assert "chat: dropped the saved prompt cache of slot 0" in log
    expected = {"flip": "corrupted?", "truncate": "truncated?", "truncate-and-forge": "exited while restoring"}[damage]
    assert expected in log
    assert not save.exists()
    assert _metric(daemon, "llmd_kv_restores_total", model="chat", result="dropped") == 1

    _, usage = _turn(daemon, "chat", _follow_up(messages))
    assert _cached(usage) == 0 and usage["completion_tokens"] > 0


@pytest.mark.engine
def test_the_disk_cap_drops_the_least_recently_used_saves(make_daemon, wide_gguf: Path) -> None:
    # A medium conversation saves about 13 MB on this model: the cap holds one, not two.
    daemon = make_daemon({"x": _profile(wide_gguf), "y": _profile(wide_gguf)}, start=False)
    config = daemon.root / "llmd.toml"
    config.write_text(config.read_text().replace("stop_grace = 5\n", "stop_grace = 5\nkv_max_gib = 0.02\n"))
    daemon.start()
    messages = _conversation(MEDIUM_WORDS)
    for name in ("x", "y"):
        daemon.llmctl("load", name)
        _turn(daemon, name, messages)
        daemon.llmctl("unload", name)
    assert _saves(daemon, "x") == [] and len(_saves(daemon, "y")) == 1
    assert _row(daemon, "x")["kv_saved_tokens"] == 0 and _row(daemon, "y")["kv_saved_tokens"] > 500
    assert "dropped the saved prompt cache of x slot 0" in daemon.log() and "kv_max_gib = 0.02" in daemon.log()


@pytest.mark.engine
def test_a_save_that_would_take_too_long_is_skipped(make_daemon, wide_gguf: Path) -> None:
    daemon = make_daemon({"chat": _profile(wide_gguf, extra='kv_save_timeout = "1ms"')})
    daemon.llmctl("load", "chat")
    _turn(daemon, "chat", _conversation(MEDIUM_WORDS))
    began = time.monotonic()
    daemon.llmctl("unload", "chat")
    assert time.monotonic() - began < 5
    assert "took longer than kv_save_timeout (1ms)" in daemon.log()
    assert _saves(daemon, "chat") == [] and _row(daemon, "chat")["kv_saved_tokens"] == 0
    assert _metric(daemon, "llmd_kv_saves_total", model="chat", result="skipped") == 1


@pytest.mark.engine
def test_engines_without_kv_persistence_refuse_the_profile(make_daemon, tiny_gguf: Path) -> None:
    profiles = {name: _profile(tiny_gguf).replace('engine = "llama-cpp"', f'engine = "{name}"') for name in ("vllm", "fastllm")}
    daemon = make_daemon(profiles)
    rows = {row["name"]: row for row in json.loads(daemon.llmctl("ls", "--json").stdout)}
    for engine in ("vllm", "fastllm"):
        assert not rows[engine]["valid"]
        assert f"the {engine} engine cannot save and restore its prompt cache" in rows[engine]["error"]


# ----- without an engine -----


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_persist_kv_is_a_driver_capability(tmp_path: Path) -> None:
    drivers = load_drivers()
    able = kv_engines_of(drivers)
    assert "llama-cpp" in able and "vllm" not in able and "fastllm" not in able
    body = 'engine = "{}"\n[model]\npath = "x.gguf"\n[policy]\npersist_kv = true\n'
    assert load_profile(_write(tmp_path, "ok", body.format("llama-cpp")), set(drivers), (), able).policy.persist_kv
    for engine in ("vllm", "fastllm"):
        with pytest.raises(ConfigError, match=f"policy.persist_kv: the {engine} engine cannot save and restore"):
            load_profile(_write(tmp_path, engine, body.format(engine)), set(drivers), (), able)
    found = load_profiles([tmp_path], set(drivers), (), able)
    assert set(found.profiles) == {"ok"} and set(found.errors) == {"vllm", "fastllm"}
    # Without the capability list (llmctl's own reading of the files), nothing is refused.
    assert set(load_profiles([tmp_path], set(drivers)).profiles) == {"ok", "vllm", "fastllm"}


def _key(model: Path, executable: Path, **changes: object) -> dict:
    settings: dict = {"engine": "llama-cpp", "command": [str(executable)], "model_path": model, "ctx": 4096,
                      "slots": 1, "cache_type": "f16", "extra_args": []}
    settings.update(changes)
    return launch_key(**settings)


def test_the_key_changes_with_whatever_makes_a_cache_invalid(tmp_path: Path) -> None:
    model, executable = tmp_path / "m.gguf", tmp_path / "llama-server"
    model.write_bytes(b"model")
    executable.write_bytes(b"engine")
    base = key_id(_key(model, executable))
    assert key_id(_key(model, executable)) == base
    for change in ({"ctx": 2048}, {"slots": 2}, {"cache_type": "q8_0"}, {"extra_args": ["--rope-scaling", "yarn"]}):
        assert key_id(_key(model, executable, **change)) != base, change
    executable.write_bytes(b"engine, upgraded")
    assert key_id(_key(model, executable)) != base
    upgraded = key_id(_key(model, executable))
    model.write_bytes(b"another model")
    assert key_id(_key(model, executable)) != upgraded


def _save(store: KvStore, directory: Path, slot: int, data: bytes, used_at: float) -> SavedSlot:
    name = store.new_file_name(slot)
    (directory / name).write_bytes(data)
    saved = SavedSlot(slot, name, len(data), hashlib.sha256(data).hexdigest(), tokens=len(data), saved_at=used_at, used_at=used_at)
    store.record(directory, saved)
    return saved


def test_the_store_checks_files_and_keeps_the_previous_save_until_a_new_one_is_whole(tmp_path: Path) -> None:
    model, executable = tmp_path / "m.gguf", tmp_path / "llama-server"
    model.write_bytes(b"model")
    executable.write_bytes(b"engine")
    store = KvStore(tmp_path / "kv")
    directory, invalidated = store.prepare("chat", _key(model, executable))
    assert invalidated == 0
    first = _save(store, directory, 0, b"a" * 100, used_at=1.0)
    assert KvStore.verify(directory, first) is None
    second = _save(store, directory, 0, b"b" * 120, used_at=2.0)
    assert not (directory / first.file).exists()  # replaced only once the new one was recorded
    assert store.totals() == {"chat": (120, 120)}

    # A save the engine was writing when llmd died is not in the manifest: removed at the next launch.
    (directory / store.new_file_name(0)).write_bytes(b"half")
    again, _ = store.prepare("chat", _key(model, executable))
    assert again == directory and [p.name for p in directory.glob("*.bin")] == [second.file]

    (directory / second.file).write_bytes(b"c" * 120)
    assert "corrupted" in (KvStore.verify(directory, second) or "")
    (directory / second.file).write_bytes(b"c" * 12)
    good, bad = store.saved(directory)
    assert good == [] and "truncated" in bad[0][1] and store.totals() == {}

    # Another key (a changed profile) deletes the model's earlier saves.
    _save(store, directory, 0, b"d" * 50, used_at=3.0)
    other, invalidated = store.prepare("chat", _key(model, executable, ctx=1024))
    assert other != directory and invalidated == 50 and not directory.exists()


def test_the_disk_cap_goes_by_last_use_across_models(tmp_path: Path) -> None:
    model, executable = tmp_path / "m.gguf", tmp_path / "llama-server"
    model.write_bytes(b"model")
    executable.write_bytes(b"engine")
    store = KvStore(tmp_path / "kv")
    dirs = {name: store.prepare(name, _key(model, executable))[0] for name in ("a", "b", "c")}
    _save(store, dirs["a"], 0, b"a" * 100, used_at=10.0)
    _save(store, dirs["b"], 0, b"b" * 100, used_at=5.0)
    _save(store, dirs["c"], 0, b"c" * 100, used_at=20.0)
    store.touch(dirs["b"], 0)  # restored just now: the most recently used
    dropped = store.enforce_cap(200)
    assert [(d.model, d.bytes) for d in dropped] == [("a", 100)]
    assert set(store.totals()) == {"b", "c"}
    assert store.enforce_cap(0) and store.totals() == {}


def test_a_profile_without_persist_kv_keeps_no_saves(tmp_path: Path) -> None:
    model, executable = tmp_path / "m.gguf", tmp_path / "llama-server"
    model.write_bytes(b"model")
    executable.write_bytes(b"engine")
    store = KvStore(tmp_path / "kv")
    directory, _ = store.prepare("chat", _key(model, executable))
    _save(store, directory, 0, b"a" * 70, used_at=1.0)
    other, _ = store.prepare("other", _key(model, executable))
    _save(store, other, 0, b"b" * 30, used_at=1.0)
    assert store.remove_model("chat") == 70 and store.totals() == {"other": (30, 30)}
    assert store.remove_model("chat") == 0
