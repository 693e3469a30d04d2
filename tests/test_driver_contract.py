"""The contract every registered driver keeps, built-in or third-party.

One suite, parametrized over `load_drivers()`:

- for each kind of placement (CPU, one GPU, tensor parallel, offload), the launch spec is an
  argv (no shell) that binds 127.0.0.1 on the given port and serves the profile's name, and an
  env that confines the engine to the placed cards;
- with the real engine (where installed): it becomes ready, a stop leaves no process behind,
  and neither does a SIGKILL of the engine's main process followed by llmd's cleanup.

Engine-specific flags for the built-in drivers are checked against a table at the end of the
argv checks, so a placement change that one driver forgets shows up here.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import anyio
import httpx
import pytest

from conftest import engine_command, engine_processes, wait_until
from llmd.daemon.config import DaemonConfig
from llmd.daemon.engines.commands import resolve_command
from llmd.daemon.errors import EngineNotInstalledError
from llmd.daemon.placement.estimate import launch_estimator
from llmd.daemon.models.profiles import Profile
from llmd.daemon.engines.supervisor import EngineProcess, free_port, spawn_engine
from llmd.drivers.base import GpuShare, LaunchRequest, LaunchSpec, Placement, load_progress, persists_kv
from llmd.drivers.registry import load_drivers

DRIVERS = load_drivers()
BUILTIN = ("llama-cpp", "fastllm", "vllm")
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "fish"}
# An extra argument a shell would split and run; it must arrive as one argv item.
HOSTILE_ARG = "a b; rm -rf / $(reboot)"

PLACEMENTS = {
    "cpu": Placement(ctx=1024, gpu_layers=0, reason="CPU only"),
    "gpu": Placement(gpus=(GpuShare(1, "GPU-bbbb", 9000, total_mib=24000),), ctx=1024),
    "tp": Placement(gpus=(GpuShare(0, "GPU-aaaa", 20000, total_mib=24000), GpuShare(2, "GPU-cccc", 20000, total_mib=24000)), ctx=1024),
    "offload": Placement(gpus=(GpuShare(0, "GPU-aaaa", 8000),), gpu_layers=1, cpu_moe_layers=1, ctx=1024),
    # A CPU placement with a share of the cores: 2 of them, 2 threads.
    "cpu-share": Placement(ctx=1024, gpu_layers=0, cpu_cores=(2, 3)),
}

# Flags (name, value) each built-in driver must pass for each placement.
EXPECTED_FLAGS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "llama-cpp": {
        "cpu": [("-ngl", "0"), ("--fit", "off")],
        "gpu": [("-ngl", "999")],
        "tp": [("--tensor-split", "20000,20000")],
        "offload": [("-ngl", "1"), ("--n-cpu-moe", "1")],
        "cpu-share": [("--threads", "2"), ("--threads-batch", "2"), ("--cpu-mask", "c"), ("--cpu-strict", "1")],
    },
    "fastllm": {
        "cpu": [("--device", "cpu"), ("--max_context_length", "1024")],
        "gpu": [("--device", "cuda:0")],
        "tp": [("--tp", "2")],
        # 1 of the tiny model's 2 layers on the card: the other's share goes to the CPU.
        "offload": [("--device", "{'cuda:0': 1, 'cpu': 1}"), ("--moe_device", "cpu"), ("--moe_device_layers", "1")],
        "cpu-share": [("--device", "cpu"), ("-t", "2")],
    },
    "vllm": {
        "cpu": [("--max-model-len", "1024")],
        "gpu": [("--tensor-parallel-size", "1"), ("--gpu-memory-utilization", "0.375")],
        "tp": [("--tensor-parallel-size", "2"), ("--gpu-memory-utilization", "0.833")],
        "offload": [("--tensor-parallel-size", "1")],
    },
}
# Flags that must be absent.
FORBIDDEN_FLAGS: dict[str, dict[str, list[str]]] = {
    "fastllm": {"cpu": ["--moe_device", "--kv_cache_limit", "--tp", "-t"], "gpu": ["--tp", "--moe_device", "-t"]},
    "llama-cpp": {"cpu": ["--threads", "--cpu-mask"], "gpu": ["--threads", "--cpu-mask"]},
    "vllm": {
        "cpu": ["--tensor-parallel-size", "--gpu-memory-utilization", "--cpu-offload-gb"],
        "cpu-share": ["--tensor-parallel-size"],
        # No card total recorded: the KV cap is given in bytes instead of as a fraction.
        "offload": ["--gpu-memory-utilization"],
    },
}

# Extra arguments the real-engine tests start each built-in engine with.
REAL_EXTRA_ARGS = {"vllm": ["--load-format", "dummy", "--enforce-eager"]}
# Generous: on a machine whose cores are busy with other work a start takes several times as long.
READY_TIMEOUT = {"vllm": 900.0}


def _engine_params(*, slow_vllm: bool) -> list:
    params = []
    for name in DRIVERS:
        marks = [pytest.mark.slow] if slow_vllm and name == "vllm" else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def models(tiny_gguf: Path, tiny_hf_dir: Path) -> dict[str, Path]:
    return {"gguf": tiny_gguf, "hf": tiny_hf_dir}


def _model_for(engine: str, models: dict[str, Path]) -> Path:
    return models["hf"] if engine == "vllm" else models["gguf"]


def _request(engine: str, placement: Placement, model: Path, *, extra_args: list[str], port: int = 4321,
             command: list[str] | None = None) -> LaunchRequest:
    profile = Profile.model_validate(
        {"engine": engine, "aliases": ["contract-alias"], "model": {"path": str(model)},
         "launch": {"ctx": placement.ctx, "extra_args": extra_args}}
    )
    profile.name = "contract-model"
    return LaunchRequest(profile=profile, placement=placement, model_path=model, host="127.0.0.1", port=port,
                         command=command or ["/opt/engine/bin/serve"], env={"FROM_ENGINE_CONFIG": "1"},
                         estimator=launch_estimator(profile, model))


# ---------------------------------------------------------------------------------------------
# The launch spec


@pytest.mark.parametrize("placement_name", list(PLACEMENTS))
@pytest.mark.parametrize("engine", _engine_params(slow_vllm=False))
def test_launch_spec(engine: str, placement_name: str, models: dict[str, Path]) -> None:
    placement = PLACEMENTS[placement_name]
    driver = DRIVERS[engine]
    assert driver.name == engine
    assert driver.default_command and all(isinstance(part, str) and part for part in driver.default_command)

    request = _request(engine, placement, _model_for(engine, models), extra_args=[HOSTILE_ARG])
    spec = driver.launch(request)

    assert isinstance(spec, LaunchSpec)
    argv = spec.argv
    assert all(isinstance(item, str) for item in argv), argv
    assert argv[: len(request.command)] == request.command, "the argv must start with the configured command"
    assert os.path.basename(argv[0]) not in SHELLS and "-c" not in argv[:2], "engines are never run through a shell"
    assert argv.count(HOSTILE_ARG) == 1, "extra_args must arrive as verbatim argv items"
    assert "127.0.0.1" in argv and "0.0.0.0" not in argv
    assert str(request.port) in argv
    assert request.profile.name in argv, "the engine must serve the profile's name"
    assert spec.readiness.path.startswith("/")

    assert all(isinstance(k, str) and isinstance(v, str) for k, v in spec.env.items())
    assert spec.env.get("FROM_ENGINE_CONFIG") == "1", "[engines.NAME] env must reach the engine"
    # An engine sees exactly the cards it was placed on (none for a CPU placement), by UUID.
    assert spec.env.get("CUDA_VISIBLE_DEVICES") == placement.cuda_visible_devices()

    for name, value in EXPECTED_FLAGS.get(engine, {}).get(placement_name, []):
        assert _flag(argv, name) == value, f"{engine} {placement_name}: {name}"
    for name in FORBIDDEN_FLAGS.get(engine, {}).get(placement_name, []):
        assert name not in argv, f"{engine} {placement_name}: {name} must not be passed"


def test_every_builtin_driver_is_registered() -> None:
    assert set(BUILTIN) <= set(DRIVERS)
    assert DRIVERS["fastllm"].default_command == ["ftllm", "server"]
    assert DRIVERS["vllm"].default_command == ["vllm", "serve"]
    assert DRIVERS["llama-cpp"].default_command == ["llama-server"]


def test_fastllm_caps_its_kv_cache_at_the_plan(models: dict[str, Path]) -> None:
    spec = DRIVERS["fastllm"].launch(_request("fastllm", PLACEMENTS["gpu"], models["gguf"], extra_args=[]))
    limit = _flag(spec.argv, "--kv_cache_limit")
    assert limit.endswith("m") and int(limit[:-1]) > 0  # fastllm drops the last digit of a bare number
    assert _flag(spec.argv, "--model_name") == "contract-model"
    assert spec.readiness.path == "/v1/models"


def test_vllm_resources_without_card_totals(models: dict[str, Path]) -> None:
    spec = DRIVERS["vllm"].launch(_request("vllm", PLACEMENTS["offload"], models["hf"], extra_args=[]))
    # The KV cap in bytes, and the layer kept on the CPU as offloaded GiB.
    assert int(_flag(spec.argv, "--kv-cache-memory-bytes")) > 0
    assert float(_flag(spec.argv, "--cpu-offload-gb")) > 0
    served = spec.argv[spec.argv.index("--served-model-name") + 1:][:2]
    assert served == ["contract-model", "contract-alias"]
    assert _flag(spec.argv, "--model") == str(models["hf"])
    assert spec.readiness.path == "/health"


def test_vllm_cpu_kv_space_and_sleep_mode(models: dict[str, Path]) -> None:
    driver = DRIVERS["vllm"]
    cpu = driver.launch(_request("vllm", PLACEMENTS["cpu"], models["hf"], extra_args=["--enable-sleep-mode"]))
    assert cpu.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    # vLLM has no sleep mode on the CPU: starting with the flag would fail, so it is left out.
    assert "--enable-sleep-mode" not in cpu.argv and "VLLM_SERVER_DEV_MODE" not in cpu.env
    assert cpu.sleep is None  # so eviction stops it rather than asking it to sleep

    gpu = driver.launch(_request("vllm", PLACEMENTS["gpu"], models["hf"], extra_args=["--enable-sleep-mode"]))
    assert gpu.argv.count("--enable-sleep-mode") == 1 and gpu.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert gpu.sleep is not None and gpu.sleep.sleep_path == "/sleep?level=1" and gpu.sleep.wake_path == "/wake_up"
    assert gpu.sleep.host_ram_mib > 0  # the weights it keeps in host RAM while parked
    assert driver.launch(_request("vllm", PLACEMENTS["gpu"], models["hf"], extra_args=[])).sleep is None
    request = _request("vllm", PLACEMENTS["gpu"], models["hf"], extra_args=[])
    request.profile.launch.env["LLMD_VLLM_SLEEP_MODE"] = "1"
    by_env = driver.launch(request)
    assert "--enable-sleep-mode" in by_env.argv and by_env.env["VLLM_SERVER_DEV_MODE"] == "1"


@pytest.mark.parametrize("engine", _engine_params(slow_vllm=False))
def test_kv_persistence_is_declared_and_kept(engine: str, models: dict[str, Path], tmp_path: Path) -> None:
    """A driver that says it can persist the prompt cache returns how, for a request with a
    kv_dir, in that directory; one that does not say so is never asked (profiles are refused)."""
    driver = DRIVERS[engine]
    request = _request(engine, PLACEMENTS["cpu"], _model_for(engine, models), extra_args=[])
    assert driver.launch(request).kv is None
    if engine in BUILTIN:
        assert persists_kv(driver) == (engine == "llama-cpp")
    if not persists_kv(driver):
        return
    spec = driver.launch(dataclasses.replace(request, kv_dir=tmp_path))
    assert spec.kv is not None and spec.kv.directory == tmp_path and spec.kv.slots >= 1
    assert "{slot}" in spec.kv.save_path and "{slot}" in spec.kv.restore_path


def test_unsupported_cache_type_is_refused_with_the_fix(models: dict[str, Path]) -> None:
    for engine in ("fastllm", "vllm"):
        request = _request(engine, PLACEMENTS["cpu"], _model_for(engine, models), extra_args=[])
        request.profile.launch.cache_type = "q4_0"
        with pytest.raises(ValueError, match="cache_type = 'q4_0'; use one of"):
            DRIVERS[engine].launch(request)


def test_load_progress() -> None:
    fastllm = DRIVERS["fastllm"]
    line = ('Loading 45 FTLLM_PROGRESS {"type":"startup.progress","stage":"weights_load","percent":46.5,'
            '"stage_percent":45.0,"message":"Loading model weights"}')
    assert load_progress(fastllm, line) == "loading weights 45%"
    assert load_progress(fastllm, 'FTLLM_PROGRESS {"type":"startup.ready","stage":"ready"}') == "ready"
    assert load_progress(fastllm, "FTLLM_PROGRESS {not json") is None
    assert load_progress(fastllm, "INFO: Application startup complete.") is None
    vllm = DRIVERS["vllm"]
    assert load_progress(vllm, "(Worker pid=1) INFO [cpu_model_runner.py:68] Starting to load model /m...") == "loading weights"
    assert load_progress(vllm, "Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01]") == "loading weights 50%"
    assert load_progress(DRIVERS["llama-cpp"], "0.00.007 I srv    load_model: loading model '/m.gguf'") == "loading the model"

    class Broken:
        name = "broken"

        def load_progress(self, line: str) -> str | None:
            raise RuntimeError("bug")

    class Without:
        name = "without"

    assert load_progress(Broken(), "x") is None  # type: ignore[arg-type]
    assert load_progress(Without(), "x") is None  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The real engine


def _real_command(engine: str) -> list[str]:
    if engine in BUILTIN:
        return engine_command(engine)
    try:
        return resolve_command(DaemonConfig(), DRIVERS[engine])
    except EngineNotInstalledError as exc:
        pytest.skip(f"third-party engine {engine!r} is not runnable here: {exc}")


def _start(engine: str, models: dict[str, Path], owner: Path) -> tuple[EngineProcess, LaunchSpec]:
    """Spawn the engine on the CPU exactly as llmd would and wait until it is ready."""
    port = free_port()
    request = _request(engine, Placement(ctx=512, gpu_layers=0), _model_for(engine, models),
                       extra_args=REAL_EXTRA_ARGS.get(engine, []), port=port, command=_real_command(engine))
    spec = DRIVERS[engine].launch(request)
    engine_proc = spawn_engine(request.profile.name, spec, port, owner / "logs" / f"{engine}.log", str(owner))

    async def wait() -> None:
        await engine_proc.wait_ready(spec, READY_TIMEOUT.get(engine, 180.0))

    try:
        anyio.run(wait)
    except BaseException:
        anyio.run(engine_proc.stop, 2.0)
        raise
    return engine_proc, spec


@pytest.mark.engine
@pytest.mark.parametrize("engine", _engine_params(slow_vllm=True))
def test_real_engine_becomes_ready_and_stops_completely(engine: str, models: dict[str, Path], tmp_path: Path) -> None:
    owner = tmp_path / "state"
    started = time.monotonic()
    proc, spec = _start(engine, models, owner)
    print(f"{engine} ready in {time.monotonic() - started:.1f}s")
    assert engine_processes(owner), "the engine runs with llmd's owner mark in its environment"
    # Ready means the readiness route answers, and the engine serves the profile's name.
    response = httpx.get(f"http://127.0.0.1:{proc.port}/v1/models", timeout=10, trust_env=False)
    assert response.status_code == 200
    assert "contract-model" in response.text

    anyio.run(proc.stop, 10.0)
    assert proc.returncode is not None
    wait_until(lambda: not engine_processes(owner), timeout=30, what=f"every {engine} process to exit")


@pytest.mark.engine
@pytest.mark.parametrize("engine", _engine_params(slow_vllm=True))
def test_sigkill_of_main_pid_then_cleanup_leaves_nothing(engine: str, models: dict[str, Path], tmp_path: Path) -> None:
    owner = tmp_path / "state"
    proc, _spec = _start(engine, models, owner)
    os.kill(proc.pid, signal.SIGKILL)
    assert anyio.run(proc.wait_exit) == -signal.SIGKILL
    # What llmd does when an engine's main process dies: stop its whole process group.
    anyio.run(proc.stop, 1.0)
    wait_until(lambda: not engine_processes(owner), timeout=30, what=f"{engine}'s children to be cleaned up")
