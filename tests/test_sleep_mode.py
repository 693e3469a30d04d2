"""Sleep mode as a fast swap: eviction parks a vLLM engine instead of stopping it, and the next
request wakes it on its own card.

vLLM refuses sleep mode on the CPU, so the vLLM side is tests/fake_vllm.py (vLLM's flags and
sleep routes, run through the real vLLM driver and supervisor); the model it swaps with is a
real llama-server. The card is simulated: 2000 MiB, room for one model plus a parked one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import engine_processes, tiny_profile, wait_until
from llmd.daemon.manager.state import PARKED_DEFAULT_MIB
from llmd.daemon.util.units import format_mib

FAKE_VLLM = Path(__file__).with_name("fake_vllm.py")
CARD_MIB = 2000
MODEL_MIB = 1400
COLD_START_SECONDS = 2.0


def _sleepy_profile(model: Path, env: dict[str, str] | None = None) -> str:
    env = {"FAKE_START_SECONDS": str(COLD_START_SECONDS), **(env or {})}
    env_line = "env = {" + ", ".join(f'{k} = "{v}"' for k, v in env.items()) + "}"
    return (
        f'engine = "vllm"\n[model]\npath = "{model}"\n[launch]\nctx = 512\n'
        f'extra_args = ["--enable-sleep-mode"]\n{env_line}\n'
        f"[placement]\nvram_mib = {MODEL_MIB}\n[policy]\nttl = \"30m\"\n"
    )


def _other_profile(model: Path) -> str:
    return tiny_profile(model) + f"\n[placement]\nvram_mib = {MODEL_MIB}\n"


@pytest.fixture
def daemon(make_daemon, tmp_path: Path, tiny_gguf: Path, tiny_hf_dir: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [{"name": "Sim", "total_mib": CARD_MIB, "free_mib": CARD_MIB}]}))
    extra = (
        f'[engines.vllm]\ncommand = ["{sys.executable}", "{FAKE_VLLM}"]\n'
        f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n'
    )
    sleepy_env = getattr(request, "param", None)
    profiles = {"sleepy": _sleepy_profile(tiny_hf_dir, sleepy_env), "other": _other_profile(tiny_gguf)}
    return make_daemon(profiles, extra_config=extra)


def _chat(daemon, model: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=120)


def _rows(daemon) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    return {row["model"]: row for row in daemon.ps()}


def _is_sleeping(row: dict) -> bool:
    return httpx.get(f"http://127.0.0.1:{row['port']}/is_sleeping", timeout=5).json()["is_sleeping"]


def _serve_sleepy_then_other(daemon) -> int:  # type: ignore[no-untyped-def]
    """Answer a chat from "sleepy", then one from "other", which evicts it; sleepy's engine pid."""
    assert _chat(daemon, "sleepy").status_code == 200
    pid: int = _rows(daemon)["sleepy"]["pid"]
    assert _chat(daemon, "other").status_code == 200
    return pid


@pytest.mark.engine
def test_eviction_parks_the_engine_and_a_request_wakes_it(daemon) -> None:  # type: ignore[no-untyped-def]
    first = _chat(daemon, "sleepy")
    assert first.status_code == 200, first.text
    row = _rows(daemon)["sleepy"]
    pid, load_s = row["pid"], row["load_s"]
    assert row["sleep_mode"] and load_s >= COLD_START_SECONDS

    # "other" needs the card: the vLLM engine is parked, not stopped.
    assert _chat(daemon, "other").status_code == 200
    rows = _rows(daemon)
    assert rows["other"]["state"] == "ready"
    sleepy = rows["sleepy"]
    assert sleepy["state"] == "sleeping" and sleepy["pid"] == pid
    assert psutil.pid_exists(pid) and _is_sleeping(sleepy)
    # Memory accounting: the parked engine keeps a CUDA context's worth of VRAM, and its
    # weights in host RAM.
    assert sleepy["vram_mib"] == PARKED_DEFAULT_MIB
    assert sleepy["host_ram_mib"] > 0
    ps_text = daemon.llmctl("ps").stdout
    assert f"sleeping ({format_mib(sleepy['host_ram_mib'])} RAM)" in ps_text
    card = json.loads(daemon.llmctl("gpus", "--json").stdout)["gpus"][0]
    claims = {m["model"]: (m["vram_mib"], m["state"]) for m in card["models"]}
    assert claims == {"sleepy": (PARKED_DEFAULT_MIB, "sleeping"), "other": (MODEL_MIB, "ready")}
    assert card["free_mib"] == CARD_MIB - PARKED_DEFAULT_MIB - MODEL_MIB

    # The next request wakes the same process; "other" is stopped to give the card back.
    again = _chat(daemon, "sleepy")
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == f"pid {pid}"
    rows = _rows(daemon)
    assert rows["sleepy"]["state"] == "ready" and rows["sleepy"]["pid"] == pid
    assert rows["sleepy"]["vram_mib"] == MODEL_MIB and rows["sleepy"]["host_ram_mib"] == 0
    assert rows["other"]["state"] == "stopped"
    assert not _is_sleeping(rows["sleepy"])
    # Waking skipped the engine's cold start.
    assert rows["sleepy"]["wake_s"] is not None and rows["sleepy"]["wake_s"] < load_s
    log = daemon.log()
    assert "parking sleepy" in log and "sleepy woke up" in log
    metrics = httpx.get(daemon.url + "/metrics", timeout=10).text
    assert 'llmd_parks_total{model="sleepy"} 1.0' in metrics
    assert 'llmd_wake_duration_seconds_count{model="sleepy"} 1.0' in metrics
    assert 'llmd_evictions_total{model="other"} 1.0' in metrics and 'llmd_evictions_total{model="sleepy"}' not in metrics


@pytest.mark.engine
def test_unloading_a_parked_model_stops_its_engine(daemon) -> None:  # type: ignore[no-untyped-def]
    pid = _serve_sleepy_then_other(daemon)
    assert _rows(daemon)["sleepy"]["state"] == "sleeping"

    daemon.llmctl("unload", "sleepy")
    assert _rows(daemon)["sleepy"]["state"] == "stopped"
    wait_until(lambda: not psutil.pid_exists(pid), what="the parked engine to exit")
    assert {p.environ().get("LLMD_MODEL") for p in engine_processes(daemon.state_dir)} == {"other"}


@pytest.mark.engine
@pytest.mark.parametrize("daemon", [{"FAKE_SLEEP_FAILS": "1"}], indirect=True)
def test_an_engine_that_will_not_sleep_is_stopped_instead(daemon) -> None:  # type: ignore[no-untyped-def]
    pid = _serve_sleepy_then_other(daemon)
    rows = _rows(daemon)
    assert rows["sleepy"]["state"] == "stopped" and rows["other"]["state"] == "ready"
    assert not psutil.pid_exists(pid)
    assert "did not go to sleep" in daemon.log()


@pytest.mark.engine
@pytest.mark.parametrize("daemon", [{"FAKE_WAKE_FAILS": "1"}], indirect=True)
def test_an_engine_that_will_not_wake_is_started_afresh(daemon) -> None:  # type: ignore[no-untyped-def]
    pid = _serve_sleepy_then_other(daemon)
    assert _rows(daemon)["sleepy"]["state"] == "sleeping"

    again = _chat(daemon, "sleepy")
    assert again.status_code == 200, again.text
    rows = _rows(daemon)
    assert rows["sleepy"]["state"] == "ready" and rows["sleepy"]["pid"] != pid
    assert again.json()["choices"][0]["message"]["content"] == f"pid {rows['sleepy']['pid']}"
    assert not psutil.pid_exists(pid)
    assert rows["other"]["state"] == "stopped"  # the fresh start needed the card
    assert "sleepy could not wake" in daemon.log()


# ----- when parking is allowed (no engine needed) -----


def _ready_instance(host_ram_mib: int, gpus: tuple[int, ...] = (0,)):  # type: ignore[no-untyped-def]
    from llmd.daemon.manager.state import Instance, State
    from llmd.daemon.models.profiles import Profile
    from llmd.drivers.base import GpuShare, LaunchSpec, Placement, SleepControl

    profile = Profile.model_validate({"engine": "vllm", "model": {"path": "/models/x"}})
    profile.name = "x"
    inst = Instance(profile=profile, state=State.READY)
    inst.placement = Placement(gpus=tuple(GpuShare(i, f"GPU-{i}", 8000, 24000) for i in gpus))
    inst.spec = LaunchSpec(argv=["vllm"], env={}, sleep=SleepControl(host_ram_mib=host_ram_mib))
    return inst


def test_parking_needs_a_sleep_capable_gpu_engine_and_host_ram_for_its_weights(tmp_path: Path) -> None:
    from llmd.daemon.config import DaemonConfig
    from llmd.daemon.manager.core import Manager
    from llmd.daemon.manager.parking import HOST_RAM_MARGIN_MIB
    from llmd.daemon.manager.state import State
    from llmd.drivers.base import LaunchSpec

    config = DaemonConfig.model_validate({"server": {"state_dir": str(tmp_path)}})
    manager = Manager(config, {}, None)  # type: ignore[arg-type]
    available = psutil.virtual_memory().available // (1024 * 1024)
    assert manager.parking.can_park(_ready_instance(host_ram_mib=64))
    # Not when the weights would not fit in host RAM beside the margin kept free.
    assert not manager.parking.can_park(_ready_instance(host_ram_mib=available))
    assert not manager.parking.can_park(_ready_instance(host_ram_mib=available - HOST_RAM_MARGIN_MIB + 1024))
    # Not on the CPU (vLLM has no sleep mode there), nor an engine started without sleep mode.
    assert not manager.parking.can_park(_ready_instance(host_ram_mib=64, gpus=()))
    plain = _ready_instance(host_ram_mib=64)
    plain.spec = LaunchSpec(argv=["vllm"], env={})
    assert not manager.parking.can_park(plain)
    # Only a ready model is parked: a starting one holds its claim.
    starting = _ready_instance(host_ram_mib=64)
    starting.state = State.STARTING
    assert not manager.parking.can_park(starting)
    # The scheduler is told what a parked engine keeps: a CUDA context's worth per card.
    running = _ready_instance(host_ram_mib=64, gpus=(0, 1)).as_running(parkable=True)
    assert running.parked_gpus == {0: PARKED_DEFAULT_MIB, 1: PARKED_DEFAULT_MIB}
    assert running.frees(0) == 8000 - PARKED_DEFAULT_MIB


def test_models_parked_by_one_plan_share_one_host_ram_budget(tmp_path: Path) -> None:
    from llmd.daemon.config import DaemonConfig
    from llmd.daemon.manager.core import Manager

    manager = Manager(DaemonConfig.model_validate({"server": {"state_dir": str(tmp_path)}}), {}, None)  # type: ignore[arg-type]
    budget = manager.parking.budget_mib()
    for name in ("a", "b", "c"):
        inst = _ready_instance(host_ram_mib=max(1, budget * 6 // 10))  # each fits alone; two do not
        inst.profile.name = name
        manager.instances[name] = inst
    unknown = _ready_instance(host_ram_mib=0)  # weights of unknown size: never parked
    unknown.profile.name = "unknown"
    manager.instances["unknown"] = unknown
    running = {model.name: model for model in manager.loader.running_except(manager.instances["c"])}
    assert [name for name, model in running.items() if model.parked_gpus is not None] == ["a"]
    assert running["b"].parked_gpus is None and running["unknown"].parked_gpus is None
