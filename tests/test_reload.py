"""SIGHUP: reload config and profiles, restarting only the models whose profile changed."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from conftest import tiny_profile, wait_until

pytestmark = pytest.mark.engine


def _pids(daemon) -> dict[str, int | None]:  # type: ignore[no-untyped-def]
    return {row["model"]: row["pid"] for row in daemon.ps()}


def test_sighup_restarts_only_changed_profiles(make_daemon, tiny_gguf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_gguf.read_bytes())
    # One core each, so that the three CPU engines stay loaded together (with an even share of the
    # cores, each new one would stop the idle ones).
    def one_core(profile: str) -> str:
        return profile.replace("ctx = 512", "ctx = 512\nthreads = 1").replace("ctx = 1024", "ctx = 1024\nthreads = 1")

    daemon = make_daemon({"a": one_core(tiny_profile(tiny_gguf)), "b": one_core(tiny_profile(other)),
                          "gone": one_core(tiny_profile(other))})
    for name in ("a", "b", "gone"):
        daemon.llmctl("load", name)
    before = _pids(daemon)

    daemon.add_profile("a", one_core(tiny_profile(tiny_gguf, ctx=1024)))  # changed
    daemon.add_profile("new", one_core(tiny_profile(other)))  # added
    (daemon.profiles_dir / "gone.toml").unlink()  # removed
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)

    wait_until(lambda: _pids(daemon)["a"] not in (None, before["a"]) and daemon.state("a") == "ready",
               timeout=20, what="a to restart with its new profile")
    row = next(r for r in daemon.ps() if r["model"] == "a")
    assert row["argv"][row["argv"].index("--ctx-size") + 1] == "1024"
    assert _pids(daemon)["b"] == before["b"]  # unchanged: not restarted
    wait_until(lambda: daemon.state("gone") is None, what="removed profile's engine to stop and leave ps")
    models = [m["id"] for m in httpx.get(daemon.url + "/v1/models").json()["data"]]
    assert models == ["a", "b", "new"]
    assert httpx.post(daemon.url + "/v1/chat/completions",
                      json={"model": "gone", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
    assert daemon.process.poll() is None


def test_sighup_with_a_broken_config_keeps_serving(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"a": tiny_profile(tiny_gguf)})
    daemon.llmctl("load", "a")
    pid = _pids(daemon)["a"]
    config = daemon.root / "llmd.toml"
    good = config.read_text()
    config.write_text(good + "\n[server\n")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in daemon.log(), what="the reload error to be logged")
    assert "invalid TOML" in daemon.log()
    assert _pids(daemon)["a"] == pid
    assert httpx.post(daemon.url + "/v1/chat/completions",
                      json={"model": "a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}).status_code == 200


def test_sighup_reports_settings_that_need_a_restart_and_keeps_them(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"a": tiny_profile(tiny_gguf)})
    config = daemon.root / "llmd.toml"
    config.write_text(config.read_text() + "\n[metrics]\nenabled = false\n")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "[metrics] changed: it takes effect when llmd restarts" in daemon.log(), what="the warning")
    # Still served until the restart, as the warning says.
    assert httpx.get(daemon.url + "/metrics", timeout=10).status_code == 200
