"""GPU telemetry: temperature, power, utilisation, fan and energy, from NVML (faked here) or a
simulated snapshot, through the GPU report to `llmctl gpus`, the dashboard and /metrics."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pynvml
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from llmd.daemon.cli import main as llmctl
from llmd.daemon.errors import ConfigError
from llmd.daemon.http.metrics import MODEL_SCOPE_KEY, Metrics
from llmd.daemon.manager.core import Manager
from llmd.daemon.placement.inventory import GpuInfo, NvmlInventory, SimulatedInventory
from llmd.daemon.placement.planner import Planner
from llmd.daemon.placement.telemetry import NO_TELEMETRY, GpuTelemetry, telemetry_text
from llmd.daemon.web.dashboard import gpu_views

MIB = 1024 * 1024

# Card 0 gives every reading; card 1 (a card without power sensing, energy counter or fan)
# refuses those with NotSupported, as such cards do.
FULL = {"temperature": 61, "power_mw": 182_500, "limit_mw": 450_000, "util": (37, 12), "fan": 30,
        "energy_mj": 7_200_000_000}
BARE = {"temperature": 44, "power_mw": None, "limit_mw": None, "util": (0, 0), "fan": None, "energy_mj": None}


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Two cards behind a faked pynvml; `calls` counts the telemetry reads."""
    state: dict[str, Any] = {
        "calls": 0,
        "devices": [
            {"uuid": "GPU-aaa", "name": "NVIDIA GeForce RTX 4090", "total": 24564 * MIB, "free": 20000 * MIB,
             "used": 4564 * MIB, **FULL},
            {"uuid": "GPU-bbb", "name": "NVIDIA T400", "total": 4096 * MIB, "free": 4000 * MIB, "used": 96 * MIB, **BARE},
        ],
    }

    def telemetry(key: str, convert: Any = lambda value: value) -> Any:
        def read(handle: dict[str, Any], *args: Any) -> Any:
            state["calls"] += 1
            if handle[key] is None:
                raise pynvml.NVMLError_NotSupported()
            return convert(handle[key])

        return read

    def sensor_checked(handle: dict[str, Any], sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return telemetry("temperature")(handle)

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(state["devices"]))
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "550.54")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: state["devices"][index])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: h["uuid"])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: h["name"])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo",
                        lambda h: SimpleNamespace(total=h["total"], free=h["free"], used=h["used"]))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda h: [])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", sensor_checked)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", telemetry("power_mw"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetEnforcedPowerLimit", telemetry("limit_mw"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates",
                        telemetry("util", lambda util: SimpleNamespace(gpu=util[0], memory=util[1])))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetFanSpeed", telemetry("fan"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", telemetry("energy_mj"))
    return state


FULL_READINGS = GpuTelemetry(temperature_c=61, power_w=182.5, power_limit_w=450.0, utilization_gpu_pct=37,
                             utilization_memory_pct=12, fan_pct=30, energy_j=7_200_000.0)
BARE_READINGS = GpuTelemetry(temperature_c=44, utilization_gpu_pct=0, utilization_memory_pct=0)


# ----- the inventory -----


def test_nvml_readings_with_a_card_that_lacks_some(fake_nvml: dict[str, Any]) -> None:
    full, bare = NvmlInventory().snapshot(telemetry=True)
    assert full.telemetry == FULL_READINGS
    assert bare.telemetry == BARE_READINGS  # refused readings are None, never an error
    assert (full.total_mib, bare.free_mib) == (24564, 4000)  # memory as without telemetry


def test_placement_snapshots_read_no_telemetry(fake_nvml: dict[str, Any], tmp_path: Path) -> None:
    """Placement's snapshot costs no telemetry calls; only a report's does."""
    planner = Planner(None, tmp_path, margin_mib=0)
    assert isinstance(planner.inventory, NvmlInventory)
    gpus = planner.snapshot()
    assert fake_nvml["calls"] == 0
    assert all(gpu.telemetry is NO_TELEMETRY for gpu in gpus)
    planner.snapshot(telemetry=True)
    assert fake_nvml["calls"] == 12  # six readings on each of two cards


def test_any_nvml_error_and_an_old_pynvml_give_no_reading(fake_nvml: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def gone(handle: Any, *args: Any) -> None:
        raise pynvml.NVMLError_GpuIsLost()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", gone)
    monkeypatch.delattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption")  # a release that predates the call
    full, _ = NvmlInventory().snapshot(telemetry=True)
    assert full.telemetry.temperature_c is None and full.telemetry.energy_j is None
    assert full.telemetry.power_w == 182.5


def _snapshot_file(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(data))
    return path


SIM_WITH_TELEMETRY = {"gpus": [
    {"name": "SimCard", "total_mib": 24000, "free_mib": 24000, "temperature_c": 55, "power_w": 120.5,
     "power_limit_w": 350, "utilization_gpu_pct": 80, "utilization_memory_pct": 40, "fan_pct": 45, "energy_j": 5400000},
    {"name": "SimCard", "total_mib": 24000, "free_mib": 24000, "temperature_c": 40},
]}


def test_simulated_telemetry_is_optional(tmp_path: Path) -> None:
    inv = SimulatedInventory(_snapshot_file(tmp_path, SIM_WITH_TELEMETRY))
    first, second = inv.snapshot(telemetry=True)
    assert first.telemetry == GpuTelemetry(55, 120.5, 350.0, 80, 40, 45, 5_400_000.0)
    assert second.telemetry == GpuTelemetry(temperature_c=40)
    assert all(gpu.telemetry is NO_TELEMETRY for gpu in inv.snapshot())  # placement's snapshot


def test_simulated_telemetry_is_checked(tmp_path: Path) -> None:
    path = _snapshot_file(tmp_path, {"gpus": [{"name": "A", "total_mib": 9, "free_mib": 1, "fan_pct": 140}]})
    with pytest.raises(ConfigError, match=r"gpus\.0\.fan_pct"):
        SimulatedInventory(path)


def test_readings_as_text() -> None:
    assert telemetry_text(FULL_READINGS.as_dict()) == {
        "temperature": "61°C", "power": "182 W", "power_limit": "450 W", "utilization_gpu": "37%",
        "utilization_memory": "12%", "fan": "30%", "energy": "2.00 kWh",
    }
    text = telemetry_text(BARE_READINGS.as_dict())
    assert (text["power"], text["power_limit"], text["fan"], text["energy"]) == ("n/a",) * 4
    assert telemetry_text({"energy_j": 3600.0 * 950})["energy"] == "950 Wh"
    assert set(telemetry_text({}).values()) == {"n/a"}  # a report from a daemon without telemetry


# ----- the report, `llmctl gpus` and the dashboard, from the faked NVML -----


def _report(tmp_path: Path) -> dict[str, Any]:
    """The manager's GPU report (`/v1/gpus`) over the faked NVML, with no model running."""
    manager = SimpleNamespace(planner=Planner(None, tmp_path, margin_mib=0), instances={})
    return Manager.gpu_report(manager)  # type: ignore[arg-type]


def test_the_gpu_report_carries_the_readings(fake_nvml: dict[str, Any], tmp_path: Path) -> None:
    full, bare = _report(tmp_path)["gpus"]
    assert {key: full[key] for key in FULL_READINGS.as_dict()} == FULL_READINGS.as_dict()
    assert bare["power_w"] is None and bare["energy_j"] is None and bare["temperature_c"] == 44


def _llmctl_gpus(monkeypatch: pytest.MonkeyPatch, report: dict[str, Any], *args: str) -> str:
    daemon = SimpleNamespace(call=lambda method, path: report if (method, path) == ("GET", "/v1/gpus") else None)
    monkeypatch.setattr(llmctl, "daemon_for", lambda ctx: daemon)
    result = CliRunner().invoke(llmctl.main, ["gpus", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_llmctl_gpus_shows_the_readings(fake_nvml: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = _report(tmp_path)
    text = _llmctl_gpus(monkeypatch, report)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("GPU") and "TEMP" in line)
    assert header.split() == ["GPU", "TEMP", "POWER", "/", "LIMIT", "UTIL", "MEM", "UTIL", "FAN", "ENERGY"]
    rows = lines[lines.index(header) + 1:]
    assert rows[0].split() == ["0", "61°C", "182", "W", "/", "450", "W", "37%", "12%", "30%", "2.00", "kWh"]
    assert rows[1].split() == ["1", "44°C", "n/a", "/", "n/a", "0%", "0%", "n/a", "n/a"]
    assert "NVIDIA T400" in text  # the memory table is still there, above

    as_json = json.loads(_llmctl_gpus(monkeypatch, report, "--json"))
    assert as_json["gpus"][0]["power_w"] == 182.5 and as_json["gpus"][0]["energy_j"] == 7_200_000.0
    assert as_json["gpus"][1]["power_w"] is None and as_json["gpus"][1]["fan_pct"] is None


def test_llmctl_gpus_without_any_reading_shows_no_telemetry_table(monkeypatch: pytest.MonkeyPatch) -> None:
    card = {"index": 0, "uuid": "GPU-x", "name": "Sim", "total_mib": 1024, "free_mib": 1024, "used_mib": 0,
            "foreign_mib": 0, "models": []}
    text = _llmctl_gpus(monkeypatch, {"note": "simulated", "gpus": [card]})
    assert "TEMP" not in text and "n/a" not in text


def test_the_dashboard_bars_show_the_readings(fake_nvml: dict[str, Any], tmp_path: Path) -> None:
    full, bare = gpu_views(_report(tmp_path))
    assert full["readings"]["temperature"] == "61°C" and full["readings"]["energy"] == "2.00 kWh"
    assert bare["readings"]["power"] == "n/a"
    (plain,) = gpu_views({"gpus": [{"index": 0, "total_mib": 10, "used_mib": 0, "free_mib": 10, "foreign_mib": 0, "models": []}]})
    assert plain["readings"] is None  # no reading at all: no telemetry line


# ----- /metrics -----


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }


def _gpu(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, gpu: str) -> float | None:
    return samples.get((name, frozenset({("gpu", gpu)})))


def test_metrics_export_the_readings(fake_nvml: dict[str, Any], tmp_path: Path) -> None:
    metrics = Metrics(True, models=list, gpus=lambda: _report(tmp_path))
    text = metrics.exposition().decode()
    assert 'llmd_gpu_temperature_celsius{gpu="0"} 61.0' in text
    assert 'llmd_gpu_power_watts{gpu="0"} 182.5' in text
    assert 'llmd_gpu_power_limit_watts{gpu="0"} 450.0' in text
    assert 'llmd_gpu_utilization_ratio{gpu="0"} 0.37' in text
    assert 'llmd_gpu_memory_utilization_ratio{gpu="0"} 0.12' in text
    assert 'llmd_gpu_fan_speed_ratio{gpu="0"} 0.3' in text
    assert 'llmd_gpu_energy_joules_total{gpu="0"} 7.2e+06' in text
    assert "# TYPE llmd_gpu_energy_joules_total counter" in text
    # The card without power, fan or energy has no sample for them: a gap, not a false 0.
    assert 'llmd_gpu_temperature_celsius{gpu="1"} 44.0' in text
    for missing in ("llmd_gpu_power_watts", "llmd_gpu_power_limit_watts", "llmd_gpu_fan_speed_ratio",
                    "llmd_gpu_energy_joules_total", "llmd_gpu_energy_per_token_joules"):
        assert f'{missing}{{gpu="1"}}' not in text
    assert 'llmd_scrape_source_ok{source="gpus"} 1.0' in text


async def _reply(metrics: Metrics, model: str, completion_tokens: int) -> None:
    """One chat reply of `model` through the metrics middleware, reporting its token usage."""
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": completion_tokens}}).encode()

    async def engine(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        scope[MODEL_SCOPE_KEY] = model
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await metrics.instrument(engine)(scope, receive, send)


@pytest.mark.anyio
async def test_energy_per_token_per_card(fake_nvml: dict[str, Any], tmp_path: Path) -> None:
    """Tokens count to every card their model is placed on; energy per token is the energy since
    the first scrape over the tokens since then."""
    placed = {"big": [0], "split": [0, 1], "cpu": []}
    metrics = Metrics(True, models=list, gpus=lambda: _report(tmp_path), cards_of=lambda name: placed[name])
    await _reply(metrics, "big", 100)  # before the first scrape: counted, but not in energy per token
    first = _samples(metrics)
    assert _gpu(first, "llmd_gpu_completion_tokens_total", "0") == 100
    assert _gpu(first, "llmd_gpu_energy_per_token_joules", "0") is None  # the first reading: the start

    fake_nvml["devices"][0]["energy_mj"] += 600_000  # 600 J more
    assert _gpu(_samples(metrics), "llmd_gpu_energy_per_token_joules", "0") is None  # no token since the start

    await _reply(metrics, "big", 200)
    await _reply(metrics, "split", 100)
    await _reply(metrics, "cpu", 50)  # on no card: counts nowhere
    s = _samples(metrics)
    assert _gpu(s, "llmd_gpu_completion_tokens_total", "0") == 400
    assert _gpu(s, "llmd_gpu_completion_tokens_total", "1") == 100
    assert _gpu(s, "llmd_gpu_energy_per_token_joules", "0") == pytest.approx(600 / 300)
    assert _gpu(s, "llmd_gpu_energy_per_token_joules", "1") is None  # card 1 has no energy counter

    fake_nvml["devices"][0]["energy_mj"] = 1000  # the driver was reloaded: its counter restarted
    assert _gpu(_samples(metrics), "llmd_gpu_energy_per_token_joules", "0") is None
    fake_nvml["devices"][0]["energy_mj"] += 300_000
    await _reply(metrics, "big", 100)
    assert _gpu(_samples(metrics), "llmd_gpu_energy_per_token_joules", "0") == pytest.approx(3.0)


def test_the_manager_names_the_cards_a_model_is_placed_on() -> None:
    split = SimpleNamespace(placement=SimpleNamespace(gpus=[SimpleNamespace(index=0), SimpleNamespace(index=1)]))
    manager = SimpleNamespace(instances={"split": split, "stopped": SimpleNamespace(placement=None)})
    assert Manager.model_cards(manager, "split") == [0, 1]  # type: ignore[arg-type]
    assert Manager.model_cards(manager, "stopped") == []  # type: ignore[arg-type]
    assert Manager.model_cards(manager, "never-loaded") == []  # type: ignore[arg-type]


def test_without_a_placement_lookup_no_tokens_count_to_cards(fake_nvml: dict[str, Any], tmp_path: Path) -> None:
    import anyio

    metrics = Metrics(True, models=list, gpus=lambda: _report(tmp_path))
    anyio.run(_reply, metrics, "big", 100)
    assert _gpu(_samples(metrics), "llmd_gpu_completion_tokens_total", "0") == 0


# ----- a real daemon, on a simulated inventory with telemetry -----


def test_a_daemon_reports_simulated_telemetry(make_daemon: Any, tmp_path: Path) -> None:
    snapshot = _snapshot_file(tmp_path, SIM_WITH_TELEMETRY)
    daemon = make_daemon(extra_config=f'[gpus]\nsimulate = "{snapshot}"\n')

    text = daemon.llmctl("gpus").stdout
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "TEMP" in line)
    assert lines[header + 1].split() == ["0", "55°C", "120", "W", "/", "350", "W", "80%", "40%", "45%", "1.50", "kWh"]
    assert lines[header + 2].split() == ["1", "40°C", "n/a", "/", "n/a", "n/a", "n/a", "n/a", "n/a"]

    cards = json.loads(daemon.llmctl("gpus", "--json").stdout)["gpus"]
    assert cards[0]["temperature_c"] == 55 and cards[0]["power_w"] == 120.5 and cards[0]["energy_j"] == 5_400_000
    assert cards[1]["temperature_c"] == 40 and cards[1]["power_w"] is None

    scrape = httpx.get(daemon.url + "/metrics", timeout=10).text
    assert 'llmd_gpu_temperature_celsius{gpu="0"} 55.0' in scrape
    assert 'llmd_gpu_temperature_celsius{gpu="1"} 40.0' in scrape
    assert 'llmd_gpu_power_limit_watts{gpu="0"} 350.0' in scrape
    assert 'llmd_gpu_energy_joules_total{gpu="0"} 5.4e+06' in scrape
    assert 'llmd_gpu_power_watts{gpu="1"}' not in scrape
    assert 'llmd_gpu_completion_tokens_total{gpu="1"} 0.0' in scrape


# ----- scripts/gpu-check -----

GPU_CHECK = Path(__file__).parent.parent / "scripts" / "gpu-check"
SMI_CSV = """\
index, uuid, name, memory.total [MiB], memory.used [MiB], temperature.gpu, power.draw [W], power.limit [W], utilization.gpu [%], fan.speed [%]
0, GPU-aaa, NVIDIA GeForce RTX 4090, 24564 MiB, 1200 MiB, 55, 120.50 W, 350.00 W, 80 %, 45 %
1, GPU-bbb, NVIDIA T400, 4096 MiB, 96 MiB, 40, [N/A], [N/A], 0 %, [N/A]
"""


def _fake_nvidia_smi(bin_dir: Path, csv_text: str | None) -> None:
    """An nvidia-smi that lists the cards of `csv_text`, or (None) one whose driver is gone."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    if csv_text is None:
        script.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n")
    else:
        (bin_dir / "smi.csv").write_text(csv_text)
        script.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-aaa)"; exit 0; fi\n'
            f'cat "{bin_dir / "smi.csv"}"\n'
        )
    script.chmod(0o755)


def _gpu_check(bin_dir: Path, snapshot: Path | None = None, *, path: str | None = None, engine: str = "skip") -> Any:
    """Run the script with the stand-in nvidia-smi in `bin_dir` first on PATH; its engine step
    (a CUDA build) is left out unless `engine` is ""."""
    import os
    import subprocess

    env = {**os.environ, "PATH": f"{bin_dir}:{path or os.environ['PATH']}", "LLMD_GPU_CHECK_ENGINE": engine}
    if snapshot is not None:
        env["LLMD_GPU_CHECK_SIMULATE"] = str(snapshot)
    return subprocess.run([str(GPU_CHECK)], capture_output=True, text=True, env=env, timeout=120)


def test_gpu_check_on_a_host_without_a_gpu(tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path / "bin", None)
    result = _gpu_check(tmp_path / "bin")
    assert result.returncode == 0, result.stderr
    assert "nvidia-smi finds no GPU (NVIDIA-SMI has failed" in result.stdout and "nothing to check" in result.stdout


def test_gpu_check_without_nvidia_smi(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    path = "/usr/bin:/bin"
    if shutil.which("nvidia-smi", path=path):
        pytest.skip("this host has nvidia-smi in /usr/bin")
    result = subprocess.run([str(GPU_CHECK)], capture_output=True, text=True, env={**os.environ, "PATH": path}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "nvidia-smi is not installed" in result.stdout


def test_gpu_check_compares_memory_totals(tmp_path: Path) -> None:
    cards = [
        {"name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-aaa", "total_mib": 24564, "free_mib": 23364,
         "temperature_c": 55, "power_w": 120.5, "power_limit_w": 350},
        {"name": "NVIDIA T400", "uuid": "GPU-bbb", "total_mib": 4096, "free_mib": 4000, "temperature_c": 40},
    ]
    snapshot = _snapshot_file(tmp_path, {"gpus": cards})
    _fake_nvidia_smi(tmp_path / "bin", SMI_CSV)
    agreed = _gpu_check(tmp_path / "bin", snapshot)
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    out = agreed.stdout
    assert "== llmd (NVML)" in out and "== nvidia-smi" in out and SMI_CSV.splitlines()[1] in out
    llmd_rows = [line.split() for line in out.splitlines() if line.startswith(("0 ", "1 "))]
    assert llmd_rows[0][:2] == ["0", "GPU-aaa"] and "55°C" in llmd_rows[0] and "120" in llmd_rows[0]
    assert llmd_rows[1][:2] == ["1", "GPU-bbb"] and "n/a" in llmd_rows[1]
    assert "ok    GPU 1 (NVIDIA T400, GPU-bbb): 4096 MiB in both" in out
    assert "agree on every card's memory total" in out

    cards[1]["total_mib"] = 4000
    cards.append({"name": "Ghost", "uuid": "GPU-ccc", "total_mib": 100, "free_mib": 100})
    snapshot.write_text(json.dumps({"gpus": cards}))
    differ = _gpu_check(tmp_path / "bin", snapshot)
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert "DIFF  GPU 1 (NVIDIA T400, GPU-bbb): memory total 4000 MiB in llmd, 4096 MiB in nvidia-smi" in differ.stdout
    assert "DIFF  GPU-ccc: llmd sees GPU 2 (Ghost), nvidia-smi does not" in differ.stdout
    assert "2 mismatch(es)" in differ.stdout


def test_gpu_check_engine_step_without_a_cuda_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a host with cards but no nvcc, the engine step says it has nothing to build with and
    the check still passes, in one go."""
    import shutil

    path = "/usr/bin:/bin"
    if shutil.which("nvcc", path=path):
        pytest.skip("this host has nvcc in /usr/bin: the step would build an engine")
    # Not the toolkit's usual places either (/usr/local/cuda/bin/nvcc may exist on a build host).
    monkeypatch.setenv("LLMD_GPU_CHECK_NVCC_CANDIDATES", str(tmp_path / "no-nvcc"))
    cards = [{"name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-aaa", "total_mib": 24564, "free_mib": 23364},
             {"name": "NVIDIA T400", "uuid": "GPU-bbb", "total_mib": 4096, "free_mib": 4000}]
    _fake_nvidia_smi(tmp_path / "bin", SMI_CSV)
    result = _gpu_check(tmp_path / "bin", _snapshot_file(tmp_path, {"gpus": cards}), path=path, engine="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== a CUDA llama-server on GPU 0" in result.stdout
    assert "no CUDA toolchain (nvcc) on this host: skipping the engine check" in result.stdout


# ----- the engine step's report (llmd.daemon.diagnostics.engine_vs_estimate) -----

ENGINE_LOG = """\
===== llmd: starting wide at 2026-12-06 10:00:00: [...]
load_tensors:        CUDA0 model buffer size =    99.00 MiB
===== llmd: starting wide at 2026-12-06 10:01:00: [...]
load_tensors:   CPU_Mapped model buffer size =     4.00 MiB
load_tensors:        CUDA0 model buffer size =    41.00 MiB
llama_kv_cache:      CUDA0 KV buffer size =    64.00 MiB
sched_reserve:       CUDA0 compute buffer size =    30.50 MiB
sched_reserve:   CUDA_Host compute buffer size =     9.00 MiB
sched_reserve:       CUDA0 compute buffer size =    31.00 MiB
"""
PLAN = {"fits": True, "gpus": [{"index": 0, "uuid": "GPU-aaa", "vram_mib": 560}],
        "estimate": {"weights_mib": 45.0, "kv_mib": 64.0, "compute_mib": 40.0, "gpu_overhead_mib": 400}}


def test_the_engines_own_buffers_are_read_per_device() -> None:
    from llmd.daemon.diagnostics.engine_vs_estimate import engine_buffers

    buffers = engine_buffers(ENGINE_LOG.splitlines()[2:])
    assert buffers.card == {"weights": 41.0, "kv": 64.0, "compute": 31.0}  # the last figure of a buffer
    assert buffers.host == {"weights": 4.0, "kv": 0.0, "compute": 9.0}
    assert buffers.card_total == 136.0


def test_the_report_flags_an_engine_holding_more_than_planned(tmp_path: Path) -> None:
    from llmd.daemon.diagnostics.engine_vs_estimate import main

    plan, log = tmp_path / "plan.json", tmp_path / "wide.log"
    plan.write_text(json.dumps(PLAN))
    log.write_text(ENGINE_LOG)
    assert main([str(plan), str(log), "530"]) == 0  # the last start only: 41 MiB of weights, not 99
    assert main([str(plan), str(log), "600"]) == 1
    assert main([str(plan), str(log)]) == 0  # without nvidia-smi's figure: the buffers against the plan
    log.write_text("no buffer lines at this verbosity\n")
    assert main([str(plan), str(log), "530"]) == 1


def test_the_report_reads_well(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from llmd.daemon.diagnostics.engine_vs_estimate import main

    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    (tmp_path / "wide.log").write_text(ENGINE_LOG)
    main([str(tmp_path / "plan.json"), str(tmp_path / "wide.log"), "600"])
    out = capsys.readouterr().out
    assert ["weights", "45.0", "MiB", "41.0", "MiB", "4.0", "MiB"] in [line.split() for line in out.splitlines()]
    assert "planned on GPU0: 560 MiB; the engine's buffers there: 136.0 MiB; its process holds 600 MiB" in out
    assert "UNDER llmd planned less than the engine holds (-40 MiB)" in out
