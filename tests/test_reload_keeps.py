"""A reload keeps what works: an invalid edit leaves the model running on its last good profile,
a change to policy or aliases applies without restarting the engine, and a deleted profile's
model leaves `ps` and the metrics."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conftest import tiny_profile, wait_until

pytestmark = pytest.mark.engine


def _pid(daemon, model: str) -> int | None:  # type: ignore[no-untyped-def]
    return next((row["pid"] for row in daemon.ps() if row["model"] == model), None)


def _row(rows: list[dict[str, Any]], key: str, name: str) -> dict[str, Any]:
    return next(row for row in rows if row[key] == name)


def _reload(daemon) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """POST /v1/reload on the management socket: the same reload as SIGHUP, answered once done."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), timeout=30) as client:
        response = client.post("http://llmd/v1/reload")
    assert response.status_code == 200, response.text
    return response.json()["changes"]


def _chat(daemon, model: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=60)


def test_an_invalid_edit_keeps_the_model_on_its_last_good_profile(make_daemon, tiny_gguf: Path) -> None:
    good = tiny_profile(tiny_gguf, aliases=["d"])
    daemon = make_daemon({"demo": good})
    daemon.llmctl("load", "demo")
    pid = _pid(daemon, "demo")

    daemon.add_profile("demo", good + "        stray = 1\n")  # lands in [policy]
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "demo keeps running on its last good profile" in daemon.log(), what="the reload to keep demo")

    assert "stopping demo" not in daemon.log()
    assert _pid(daemon, "demo") == pid
    assert _chat(daemon, "demo").status_code == 200
    assert _chat(daemon, "d").status_code == 200  # its aliases too
    assert "demo" in [m["id"] for m in httpx.get(daemon.url + "/v1/models").json()["data"]]
    listed = _row(json.loads(daemon.llmctl("ls", "--json").stdout), "name", "demo")
    assert not listed["valid"] and listed["state"] == "ready"
    assert "policy.stray: unknown key" in listed["error"]
    row = _row(daemon.ps(), "model", "demo")
    assert row["state"] == "ready" and "policy.stray" in row["profile_error"]
    shown = daemon.llmctl("ps")
    assert "demo: its profile is invalid, so it runs on its last good version" in shown.stderr
    assert "kept on its last good version (the profile is invalid): demo" in daemon.log()

    daemon.add_profile("demo", good)  # fixed: the error goes, the engine stays
    assert _reload(daemon)["restarted"] == []
    row = _row(daemon.ps(), "model", "demo")
    assert row["profile_error"] is None and row["pid"] == pid
    assert _row(json.loads(daemon.llmctl("ls", "--json").stdout), "name", "demo")["valid"]


def test_a_policy_or_alias_edit_applies_without_a_restart(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"a": tiny_profile(tiny_gguf, ttl="30m")})
    daemon.llmctl("load", "a")
    pid = _pid(daemon, "a")

    daemon.add_profile("a", tiny_profile(tiny_gguf, ttl="45m", aliases=["a-new"]))
    changes = _reload(daemon)
    assert changes["updated"] == ["a"] and changes["restarted"] == []
    assert "changed (applied without a restart): a" in daemon.log()
    assert _row(json.loads(daemon.llmctl("ls", "--json").stdout), "name", "a")["ttl"] == "45m"
    assert _chat(daemon, "a-new").status_code == 200  # llama-server never sees aliases: the proxy renames
    assert _pid(daemon, "a") == pid
    assert "stopping a" not in daemon.log()

    daemon.add_profile("a", tiny_profile(tiny_gguf, ttl="45m", aliases=["a-new"], ctx=1024))  # an engine setting
    assert _reload(daemon)["restarted"] == ["a"]
    wait_until(lambda: _pid(daemon, "a") not in (None, pid) and daemon.state("a") == "ready", timeout=30,
               what="a to restart with its new context")


def test_a_deleted_profile_leaves_ps_and_the_metrics(make_daemon, tiny_gguf: Path) -> None:
    daemon = make_daemon({"keep": tiny_profile(tiny_gguf), "gone": tiny_profile(tiny_gguf)})
    daemon.llmctl("load", "gone")
    pid = _pid(daemon, "gone")
    assert pid is not None
    assert 'llmd_model_state{model="gone"' in httpx.get(daemon.url + "/metrics").text

    (daemon.profiles_dir / "gone.toml").unlink()
    changes = _reload(daemon)
    assert changes["removed"] == ["gone"]
    wait_until(lambda: daemon.state("gone") is None, timeout=20, what="gone to leave ps")
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
               what="its engine to exit")
    assert 'model="gone"' not in "\n".join(
        line for line in httpx.get(daemon.url + "/metrics").text.splitlines() if line.startswith("llmd_model_state")
    )
    assert "removed: gone" in daemon.log()
    assert _chat(daemon, "gone").status_code == 404
