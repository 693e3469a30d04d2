"""The CPU as a placed resource: each CPU engine's share of the cores, and host RAM as a ledger.

First the scheduler's rules by example (pure), then the pieces that carry a share to the engine
(the driver flags, the process affinity), then two real llama-servers through a real daemon,
generating at once, each keeping most of its speed alone.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from conftest import engine_processes, wait_until
from llmd.daemon.engines.supervisor import spawn_engine
from llmd.daemon.models.tinymodel import write_tiny_gguf
from llmd.daemon.placement.cpu_plan import even_share, host_need_mib, pick_cores
from llmd.daemon.placement.host import HostInfo, read_host
from llmd.daemon.placement.inventory import GpuInfo
from llmd.daemon.placement.scheduler import ModelNeed, NoFit, Plan, RunningModel, plan
from llmd.drivers.base import LaunchSpec, Placement, cpu_list, cpu_mask

# ---------------------------------------------------------------------------------------------
# The scheduler's rules


def need(name: str = "new", *, layers: int = 4, layer_mib: float = 500, kv: float = 25, **rules) -> ModelNeed:
    """4 x (500 + 25) + 100 + 50 = 2250 MiB on the CPU."""
    return ModelNeed(name=name, layer_mib=(layer_mib,) * layers, non_layer_mib=100, kv_per_layer_mib=kv,
                     compute_mib=50, n_layers=layers, n_head=8, n_head_kv=4, overhead_mib=300, **rules)


CPU_MIB = 2250


def host(cores: int = 4, total: int = 64000, available: int | None = None) -> HostInfo:
    return HostInfo(total_mib=total, available_mib=total if available is None else available,
                    cores=tuple(range(cores)), margin_mib=2048)


def cpu_model(name: str, cores: tuple[int, ...], *, host_mib: int = CPU_MIB, busy: int = 0, pinned: bool = False,
              last_used: float = 0.0) -> RunningModel:
    return RunningModel(name, {}, busy, pinned, 0, last_used, cpu_cores=cores, host_mib=host_mib)


def placed(result: Plan | NoFit) -> Plan:
    assert isinstance(result, Plan), result
    return result


def test_a_lone_cpu_engine_gets_every_core_and_its_host_ram() -> None:
    result = placed(plan(need(), [], [], host=host(4)))
    assert result.placement.cpu_cores == (0, 1, 2, 3) and result.placement.threads == 4
    assert result.placement.host_mib == CPU_MIB == host_need_mib(need(), result.placement)
    assert result.evict == ()
    assert "cores 0-3 (4 threads)" in result.reason and f"host RAM {CPU_MIB} MiB" in result.reason


def test_without_a_host_the_plan_is_for_the_cards_only() -> None:
    result = placed(plan(need(), [], []))
    assert result.placement.cpu_only and result.placement.cpu_cores == () and result.placement.host_mib == 0


def test_a_second_engine_gets_a_disjoint_share_and_the_first_comes_back_beside_it() -> None:
    """The idle engine holding every core is stopped for the newcomer's even share; on its next
    load it takes the other half, so the two never run threads on the same core."""
    first = cpu_model("first", (0, 1, 2, 3))
    second = placed(plan(need("second"), [], [first], host=host(4)))
    assert second.placement.cpu_cores == (0, 1) and second.evict == ("first",)
    assert "after stopping idle first to free cores" in second.reason

    back = placed(plan(need("first"), [], [cpu_model("second", (0, 1))], host=host(4)))
    assert back.placement.cpu_cores == (2, 3) and back.evict == ()


def test_a_busy_engine_keeps_its_cores_and_the_newcomer_shares_with_matching_threads() -> None:
    busy = cpu_model("busy", (0, 1, 2, 3), busy=1)
    result = placed(plan(need(), [], [busy], host=host(4)))
    assert result.evict == ()
    assert result.placement.cpu_cores == (0, 1) and result.placement.threads == 2
    assert "shared with busy" in result.reason
    pinned = cpu_model("pinned", (0, 1, 2, 3), pinned=True)
    assert placed(plan(need(), [], [pinned], host=host(4))).evict == ()


def test_free_cores_are_taken_before_anyone_is_stopped() -> None:
    running = [cpu_model("a", (0, 1))]
    result = placed(plan(need(), [], running, host=host(4)))
    assert result.placement.cpu_cores == (2, 3) and result.evict == ()


def test_more_engines_than_cores_share_the_least_held_ones_and_stop_nobody() -> None:
    running = [cpu_model("a", (0,)), cpu_model("b", (1,))]
    result = placed(plan(need(), [], running, host=host(2)))
    assert result.placement.cpu_cores == (0,) and result.evict == ()
    assert even_share(2, 3) == 1 and pick_cores((0, 1), [(0,), (1,), (0,)], 1) == (1,)


def test_threads_asks_for_a_count_and_never_stops_another_engine_for_more_than_a_share() -> None:
    assert placed(plan(need(threads=1), [], [], host=host(4))).placement.cpu_cores == (0,)
    wide = placed(plan(need(threads=4), [], [cpu_model("a", (0, 1, 2, 3))], host=host(4)))
    assert wide.placement.cpu_cores == (0, 1, 2, 3) and wide.evict == ()  # asked for: shares
    # More than the machine has: every core, one thread each.
    assert placed(plan(need(threads=64), [], [], host=host(4))).placement.threads == 4


def test_the_share_is_of_the_cores_llmd_may_use() -> None:
    limited = HostInfo(total_mib=64000, available_mib=64000, cores=(4, 5, 6, 7))
    result = placed(plan(need(), [], [cpu_model("a", (4, 5, 6, 7))], host=limited))
    assert result.placement.cpu_cores == (4, 5)
    assert read_host().cores == tuple(sorted(os.sched_getaffinity(0)))


def test_only_engines_that_compute_on_the_cpu_get_cores() -> None:
    card = [GpuInfo(0, "GPU-0", "RTX 4090", 24000, 24000, 0)]
    on_card = placed(plan(need(), card, [], host=host(4)))
    assert not on_card.placement.cpu_only and on_card.placement.cpu_cores == () and on_card.placement.host_mib == 0
    # Two layers kept on the CPU: llama.cpp and fastllm compute them there, vLLM streams them.
    small = [GpuInfo(0, "GPU-0", "small", 2000, 2000, 0)]
    offloaded = placed(plan(need(offload="auto"), small, [], 0, host=host(4)))
    assert offloaded.placement.gpu_layers == 2 and offloaded.placement.cpu_cores == (0, 1, 2, 3)
    assert offloaded.placement.host_mib == 2 * (500 + 25)
    streamed = placed(plan(need(offload="auto", offload_on_cpu=False), small, [], 0, host=host(4)))
    assert streamed.placement.cpu_cores == () and streamed.placement.host_mib == 2 * (500 + 25)


def test_moe_experts_on_the_cpu_claim_their_host_ram() -> None:
    moe = need(layers=4, moe_expert_mib=(400.0,) * 4, offload="moe-experts")
    small = [GpuInfo(0, "GPU-0", "small", 1900, 1900, 0)]
    result = placed(plan(moe, small, [], 0, host=host(4)))
    experts = result.placement.cpu_moe_layers
    assert experts > 0 and result.placement.gpu_layers is None
    assert result.placement.host_mib == 400 * experts and result.placement.cpu_cores == (0, 1, 2, 3)


# --- host RAM, a ledger like VRAM -------------------------------------------------------------


def test_a_load_that_does_not_fit_host_ram_evicts_an_idle_cpu_model() -> None:
    # 4000 MiB available less the 2048 MiB margin: 1952 MiB free, short of the 2250 needed.
    old = cpu_model("old", (0, 1), host_mib=5000, last_used=1.0)
    tight = host(4, total=16000, available=4000)
    result = placed(plan(need(), [], [old], host=tight))
    assert result.evict == ("old",) and "after stopping idle old for host RAM" in result.reason
    # With room, nothing is stopped for RAM.
    assert placed(plan(need(), [], [old], host=host(4, total=16000, available=10000))).evict == ()


def test_llmds_own_ledger_counts_claims_the_kernel_does_not_see_yet() -> None:
    """A just-started engine has not allocated its memory: the total less llmd's claims decides."""
    starting = cpu_model("starting", (0, 1), host_mib=14000, busy=1)
    result = plan(need(), [], [starting], host=host(4, total=16000, available=15000))
    assert isinstance(result, NoFit)
    assert f"needs {CPU_MIB} MiB of host RAM" in result.reason and "starting (busy; 14000 MiB)" in result.reason


def test_the_least_wanted_idle_model_goes_first_and_only_as_many_as_needed() -> None:
    running = [cpu_model("recent", (0,), host_mib=3000, last_used=9.0),
               cpu_model("stale", (1,), host_mib=3000, last_used=1.0)]
    result = placed(plan(need(), [], running, host=host(2, total=16000, available=4000)))
    assert result.evict == ("stale",)


def test_parked_weights_claim_host_ram_and_parking_a_victim_takes_more() -> None:
    # A sleeping vLLM holds its weights in host RAM: stopping it frees them.
    asleep = RunningModel("asleep", {0: 400}, 0, False, 0, 0.0, host_mib=5000)
    assert asleep.frees_host() == 5000
    assert placed(plan(need(), [], [asleep], host=host(4, total=16000, available=4000))).evict == ("asleep",)
    # A ready one that eviction would park moves its weights there: it frees no host RAM.
    parks = RunningModel("parks", {0: 9000}, 0, False, 0, 0.0, parked_gpus={0: 400}, parked_host_mib=5000)
    assert parks.frees_host() == -5000


def test_gpu_placements_without_host_memory_skip_the_ledger() -> None:
    card = [GpuInfo(0, "GPU-0", "RTX 4090", 24000, 24000, 0)]
    full = host(4, total=16000, available=0)
    assert isinstance(plan(need(), card, [], host=full), Plan)
    assert isinstance(plan(need(), [], [], host=full), NoFit)


# --- tensor parallel on the CPU and the heads rule ------------------------------------------


def test_tensor_parallel_on_the_cpu_splits_the_cores_between_workers() -> None:
    result = placed(plan(need(tensor_parallel=2), [], [], host=host(4)))
    assert result.placement.cpu_tensor_parallel == 2 and result.placement.tensor_parallel == 2
    assert result.placement.worker_cores() == [(0, 1), (2, 3)]
    assert "2 CPU workers on cores 0-3" in result.reason
    # At least one core per worker, even when the even share is smaller.
    crowded = placed(plan(need(tensor_parallel=2), [], [cpu_model("a", (0,), busy=1), cpu_model("b", (1,), busy=1)],
                          host=host(4)))
    assert crowded.placement.threads == 2
    # The heads must divide between the workers, for an engine that splits heads.
    assert isinstance(plan(need(tensor_parallel=3), [], [], host=host(4)), NoFit)
    # llama.cpp splits by layers: no CPU workers, and any width on cards.
    layered = placed(plan(need(tensor_parallel=3, splits_heads=False), [], [], host=host(4)))
    assert layered.placement.cpu_tensor_parallel == 1


def test_the_heads_rule_applies_to_engines_that_split_heads_only() -> None:
    cards = [GpuInfo(i, f"GPU-{i}", "RTX 4090", 24000, 24000, 0) for i in range(3)]
    odd = need(tensor_parallel=3, layer_mib=9000)  # 8 query heads over 3 cards: no
    assert isinstance(plan(odd, cards, []), NoFit)
    layered = placed(plan(need(tensor_parallel=3, layer_mib=9000, splits_heads=False), cards, []))
    assert len(layered.placement.gpus) == 3


def test_the_planner_asks_each_driver_how_its_engine_uses_devices(tmp_path: Path) -> None:
    from llmd.daemon.models.profiles import Profile
    from llmd.daemon.placement.planner import Planner
    from llmd.drivers.registry import load_drivers

    model = write_tiny_gguf(tmp_path / "m.gguf")
    planner = Planner(None, tmp_path / "state", margin_mib=0, drivers=load_drivers())
    planner.read_host = lambda: host(4)
    for engine, splits in (("llama-cpp", False), ("fastllm", True), ("vllm", True)):
        profile = Profile.model_validate({"engine": engine, "model": {"path": str(model)}, "launch": {"threads": 2}})
        profile.name = engine
        result, _ = planner.place(profile, model, [cpu_model("other", (0, 1))])
        assert isinstance(result, Plan) and result.placement.cpu_cores == (2, 3), engine
        assert result.placement.host_mib > 0  # estimated from the file on a host without GPUs
        assert planner._for_engine(planner.need(profile, model)[0], profile).splits_heads is splits
    offload = {name: planner.drivers[name].offload_computes_on_cpu for name in ("llama-cpp", "fastllm", "vllm")}
    assert offload == {"llama-cpp": True, "fastllm": True, "vllm": False}


def test_an_instance_reports_its_cores_and_host_ram_to_the_scheduler(tmp_path: Path) -> None:
    from llmd.daemon.manager.state import Instance, State
    from llmd.daemon.models.profiles import Profile

    profile = Profile.model_validate({"engine": "llama-cpp", "model": {"path": str(tmp_path / "m.gguf")}})
    profile.name = "m"
    inst = Instance(profile, state=State.READY, placement=Placement(gpu_layers=0, cpu_cores=(1,), host_mib=700))
    running = inst.as_running()
    assert running.cpu_cores == (1,) and running.host_mib == 700 and running.frees_host() == 700


# ---------------------------------------------------------------------------------------------
# Carrying the share to the engine


def test_cpu_sets_in_the_forms_engines_read() -> None:
    assert cpu_list((0, 1, 2, 3, 6)) == "0-3,6" and cpu_list((5,)) == "5"
    assert cpu_mask((0, 1)) == "3" and cpu_mask((2, 3)) == "c" and cpu_mask((64,)) == "1" + "0" * 16
    assert Placement(cpu_cores=(0, 1, 2), cpu_tensor_parallel=2).worker_cores() == [(0, 1), (2,)]
    assert Placement(cpu_cores=(0,), cpu_tensor_parallel=2).worker_cores() == [(0,), (0,)]


def _request(engine: str, placement: Placement, model: Path, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    from llmd.daemon.models.profiles import Profile
    from llmd.drivers.base import LaunchRequest

    profile = Profile.model_validate({"engine": engine, "model": {"path": str(model)}, "launch": {"env": env or {}}})
    profile.name = "m"
    return LaunchRequest(profile=profile, placement=placement, model_path=model, host="127.0.0.1", port=4321,
                         command=["serve"])


def test_each_engine_starts_one_thread_per_core_of_its_share(tiny_gguf: Path, tiny_hf_dir: Path) -> None:
    from llmd.drivers.fastllm import FastllmDriver
    from llmd.drivers.llama_cpp import LlamaCppDriver
    from llmd.drivers.vllm import VllmDriver

    share = Placement(gpu_layers=0, cpu_cores=(2, 3))
    argv = LlamaCppDriver().launch(_request("llama-cpp", share, tiny_gguf)).argv
    assert argv[argv.index("--threads") + 1] == "2" and argv[argv.index("--cpu-mask") + 1] == "c"
    assert argv[argv.index("--cpu-strict") + 1] == "1"
    argv = FastllmDriver().launch(_request("fastllm", share, tiny_gguf)).argv
    assert argv[argv.index("-t") + 1] == "2"

    one = VllmDriver().launch(_request("vllm", share, tiny_hf_dir))
    assert one.env["VLLM_CPU_OMP_THREADS_BIND"] == "2-3" and "--tensor-parallel-size" not in one.argv
    two = VllmDriver().launch(_request("vllm", Placement(gpu_layers=0, cpu_cores=(0, 1, 2, 3), cpu_tensor_parallel=2),
                                       tiny_hf_dir))
    assert two.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1|2-3"
    assert two.argv[two.argv.index("--tensor-parallel-size") + 1] == "2"
    mine = VllmDriver().launch(_request("vllm", share, tiny_hf_dir, env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"}))
    assert mine.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"  # the profile's own setting wins


def test_the_supervisor_confines_an_engine_and_its_children_to_its_cores(tmp_path: Path) -> None:
    import anyio

    core = max(os.sched_getaffinity(0))
    script = ("import os, subprocess, sys; print('self', sorted(os.sched_getaffinity(0)), flush=True); "
              "subprocess.run([sys.executable, '-c', 'import os; print(\"child\", sorted(os.sched_getaffinity(0)))'])")
    spec = LaunchSpec(argv=[os.sys.executable, "-c", script], env={})
    engine = spawn_engine("confined", spec, 1, tmp_path / "e.log", str(tmp_path), cpu_cores=(core,))
    assert anyio.run(engine.wait_exit) == 0
    text = (tmp_path / "e.log").read_text()
    assert f"self [{core}]" in text and f"child [{core}]" in text
    free = spawn_engine("free", spec, 1, tmp_path / "f.log", str(tmp_path))
    assert anyio.run(free.wait_exit) == 0
    assert f"self {sorted(os.sched_getaffinity(0))}" in (tmp_path / "f.log").read_text()


# ---------------------------------------------------------------------------------------------
# Two real llama-servers sharing the CPU

# Tokens each measurement generates, whatever the model says (`ignore_eos`), so counts match.
TOKENS = 96
# The goal: each engine keeps at least this share of its speed alone while both generate.
KEEPS = 0.4


def _profile(model: Path) -> str:
    return f"""\
        engine = "llama-cpp"
        [model]
        path = "{model}"
        [launch]
        ctx = 512
        [policy]
        ttl = "30m"
        """


def _speed(url: str, model: str) -> float:
    """Generated tokens per second of one request: the engine's own decode timing when it
    reports one (llama-server does), else the wall clock."""
    started = time.monotonic()
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
        "model": model, "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0,
    })
    reply.raise_for_status()
    body = reply.json()
    assert body["usage"]["completion_tokens"] == TOKENS, body["usage"]
    timed = (body.get("timings") or {}).get("predicted_per_second")
    return float(timed) if timed else TOKENS / (time.monotonic() - started)


def _best(url: str, model: str, rounds: int = 2) -> float:
    # The best of a few: another program's burst slows one run down, never speeds it up.
    return max(_speed(url, model) for _ in range(rounds))


def _cores(daemon, model: str) -> list[int]:  # type: ignore[no-untyped-def]
    row = next(row for row in daemon.ps() if row["model"] == model)
    assert row["state"] == "ready", row
    return row["cpu_cores"]


@pytest.mark.engine
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to give two engines one each")
def test_two_cpu_engines_generating_at_once_each_keep_their_speed(make_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 8 layers x 512: about 2 s for 96 tokens on one core, long enough to measure.
    model = write_tiny_gguf(tmp_path / "wide.gguf", n_layers=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=8)
    daemon = make_daemon({"a": _profile(model), "b": _profile(model)})
    every = sorted(os.sched_getaffinity(0))

    # Alone on the machine: each gets every core llmd may use.
    full = {}
    for name in ("a", "b"):
        daemon.llmctl("load", name, timeout=300)
        assert _cores(daemon, name) == every
        full[name] = _speed(daemon.url, name)
        daemon.llmctl("unload", name, timeout=120)

    # Both loaded: disjoint shares. The second load stops the idle first (it held every core),
    # which comes back on the cores left.
    daemon.llmctl("load", "a", timeout=300)
    daemon.llmctl("load", "b", timeout=300)
    daemon.llmctl("load", "a", timeout=300)
    cores = {name: _cores(daemon, name) for name in ("a", "b")}
    assert not set(cores["a"]) & set(cores["b"]), cores
    assert sorted(cores["a"] + cores["b"]) == every[: len(cores["a"]) + len(cores["b"])]
    for name in ("a", "b"):
        argv = next(row for row in daemon.ps() if row["model"] == name)["argv"]
        assert argv[argv.index("--threads") + 1] == str(len(cores[name])) and "--cpu-strict" in argv
        pid = next(row for row in daemon.ps() if row["model"] == name)["pid"]
        assert sorted(os.sched_getaffinity(pid)) == cores[name]

    alone = {name: _best(daemon.url, name) for name in ("a", "b")}
    together: dict[str, float] = {"a": 0.0, "b": 0.0}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            speeds = dict(zip(("a", "b"), pool.map(lambda name: _speed(daemon.url, name), ("a", "b"))))
            together = {name: max(together[name], speeds[name]) for name in together}
    report = {name: {"alone_whole_machine": round(full[name], 1), "alone_on_its_share": round(alone[name], 1),
                     "together": round(together[name], 1)} for name in ("a", "b")}
    print("tokens/s:", json.dumps(report))
    for name in ("a", "b"):
        assert together[name] >= KEEPS * alone[name], report
        assert together[name] >= KEEPS * full[name], report

    daemon.llmctl("unload", "a", timeout=120)
    daemon.llmctl("unload", "b", timeout=120)
    wait_until(lambda: not engine_processes(daemon.state_dir), timeout=60, what="both engines to exit")
