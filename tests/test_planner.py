"""The planner: estimate, then learn from what the engine really used."""

from __future__ import annotations

from pathlib import Path

from llmd.daemon.placement.inventory import GpuInfo, GpuProcess
from llmd.daemon.placement.planner import Planner
from llmd.daemon.models.profiles import Profile
from llmd.daemon.placement.scheduler import Plan
from llmd.daemon.models.tinymodel import write_tiny_gguf


class FakeNvml:
    """Stands in for NVML: one 8 GiB card on which pid 4242 holds 1234 MiB."""

    note = "fake NVML"

    def snapshot(self) -> list[GpuInfo]:
        return [GpuInfo(0, "GPU-x", "Fake", 8192, 8192 - 1234, 1234, (GpuProcess(4242, 1234),))]


def _profile(model: Path, **placement: object) -> Profile:
    profile = Profile.model_validate({"engine": "llama-cpp", "model": {"path": str(model)}, "placement": placement})
    profile.name = "m"
    return profile


def test_estimate_first_then_the_measurement(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf")
    planner = Planner(None, tmp_path / "state", margin_mib=0)
    planner.inventory = FakeNvml()
    profile = _profile(model)

    need, estimate, source = planner.need(profile, model)
    assert source == "estimated from the model file" and estimate is not None
    assert need.total_mib < 1000

    measured = planner.learn(profile, model, {4242})
    assert measured is not None and measured.per_gpu_mib == {0: 1234}
    # A new planner (a restarted daemon) reads the measurement back from state_dir.
    again = Planner(None, tmp_path / "state", margin_mib=0)
    again.inventory = FakeNvml()
    need, _, source = again.need(profile, model)
    assert source == "measured 1234 MiB at its last launch"
    assert need.total_mib >= 1234
    result, details = again.place(profile, model, [])
    assert isinstance(result, Plan) and result.placement.vram_mib >= 1234
    assert details["need_source"].startswith("measured")


def test_measurement_is_forgotten_when_the_launch_changes(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf")
    planner = Planner(None, tmp_path / "state", margin_mib=0)
    planner.inventory = FakeNvml()
    planner.learn(_profile(model), model, {4242})
    bigger = Profile.model_validate({"engine": "llama-cpp", "model": {"path": str(model)}, "launch": {"ctx": 8192}})
    bigger.name = "m"
    assert planner.need(bigger, model)[2] == "estimated from the model file"


def test_profile_override_wins(tmp_path: Path) -> None:
    model = write_tiny_gguf(tmp_path / "m.gguf")
    planner = Planner(None, tmp_path / "state", margin_mib=0)
    need, estimate, source = planner.need(_profile(model, vram_mib=5000), model)
    assert need.total_mib == 5000 and estimate is None and "vram_mib" in source


def test_cpu_only_host_places_on_cpu_without_estimating(tmp_path: Path) -> None:
    planner = Planner(None, tmp_path / "state", margin_mib=0)  # no NVML on this machine
    result, details = planner.place(_profile(tmp_path / "missing.gguf"), tmp_path / "missing.gguf", [])
    assert isinstance(result, Plan) and result.placement.cpu_only
    assert "CPU-only" in details["inventory"] or "no NVIDIA" in details["inventory"]


def test_manager_waits_until_the_gpus_show_evicted_memory_released(tmp_path: Path) -> None:
    import anyio

    from llmd.daemon.config import DaemonConfig
    from llmd.daemon.manager.core import Manager
    from llmd.daemon.models.profiles import ProfileSet

    config = DaemonConfig.model_validate({"server": {"state_dir": str(tmp_path)}, "gpus": {"release_timeout": 0.5}})
    manager = Manager(config, {}, ProfileSet())
    readings = [{0: 900}, {0: 900}, {0: 300}, {}]
    calls: list[set[int]] = []

    def usage_of(pids: set[int]) -> dict[int, int]:
        calls.append(pids)
        return readings.pop(0) if readings else {}

    manager.planner.usage_of = usage_of  # type: ignore[method-assign]
    assert anyio.run(manager.wait_released, {4242}) is True
    assert len(calls) == 4 and calls[0] == {4242}

    manager.planner.usage_of = lambda pids: {0: 900}  # type: ignore[method-assign]  (never released)
    assert anyio.run(manager.wait_released, {4242}) is False


def test_a_launch_reuses_the_planned_estimate_until_the_model_file_changes(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import os

    from llmd.daemon.placement import planner as planner_module
    from llmd.daemon.placement.estimate import launch_estimator
    from llmd.drivers.base import LaunchRequest, planned_estimate

    model = write_tiny_gguf(tmp_path / "m.gguf")
    planner = Planner(None, tmp_path / "state", margin_mib=0)
    planner.inventory = FakeNvml()
    reads: list[Path] = []
    stats: list[Path] = []
    read_headers, fingerprint = planner_module.estimate_profile, planner_module._fingerprint
    monkeypatch.setattr(planner_module, "estimate_profile", lambda p, path: reads.append(path) or read_headers(p, path))
    monkeypatch.setattr(planner_module, "_fingerprint", lambda p, path: stats.append(path) or fingerprint(p, path))
    profile = _profile(model)

    result, _ = planner.place(profile, model, [])
    assert isinstance(result, Plan)
    assert (reads, stats) == ([model], [model])  # one header read, one fingerprint per plan

    request = LaunchRequest(profile=profile, placement=result.placement, model_path=model, host="127.0.0.1", port=1,
                            command=["engine"], estimator=launch_estimator(profile, model, planner.estimate))
    planned = planned_estimate(request)
    assert planned is not None and len(reads) == 1  # the launch took the planned estimate from the cache

    later = model.stat().st_mtime + 60
    os.utime(model, (later, later))  # the model file was replaced
    assert planned_estimate(request) is not None and len(reads) == 2
