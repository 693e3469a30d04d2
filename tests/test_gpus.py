"""The GPU inventory: simulated snapshots, the CPU-only fallback, and NVML with faked calls."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pynvml
import pytest

from llmd.daemon.errors import ConfigError
from llmd.daemon.placement.inventory import (
    CpuOnlyInventory,
    GpuInfo,
    GpuProcess,
    NvmlInventory,
    SimulatedInventory,
    measure_pids_vram,
    open_inventory,
)

MIB = 1024 * 1024


def write_snapshot(tmp_path: Path, data: object, name: str = "gpus.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


TWO_CARDS = {
    "gpus": [
        {"name": "RTX 4090", "total_mib": 24564, "free_mib": 24000},
        {"name": "RTX 3090", "total_mib": 24576, "free_mib": 20000, "uuid": "GPU-abc"},
    ]
}


# --- simulated -------------------------------------------------------------------------------


def test_simulated_reads_cards_in_order_with_stable_uuids(tmp_path: Path) -> None:
    inv = SimulatedInventory(write_snapshot(tmp_path, TWO_CARDS))
    gpus = inv.snapshot()
    assert gpus == [
        GpuInfo(0, "GPU-sim-0000-0", "RTX 4090", 24564, 24000, 564),
        GpuInfo(1, "GPU-abc", "RTX 3090", 24576, 20000, 4576),
    ]
    assert inv.snapshot() == gpus  # stable across calls
    assert "simulated from" in inv.note and "gpus.json" in inv.note


def test_claim_and_release_move_free_memory(tmp_path: Path) -> None:
    inv = SimulatedInventory(write_snapshot(tmp_path, TWO_CARDS))
    inv.claim("qwen", pid=101, shares={0: 10000, 1: 5000})
    inv.claim("llama", pid=202, shares={1: 3000})
    gpu0, gpu1 = inv.snapshot()
    assert gpu0.free_mib == 14000 and gpu0.used_mib == 24564 - 14000
    assert gpu1.free_mib == 12000
    assert gpu0.processes == (GpuProcess(101, 10000),)
    assert set(gpu1.processes) == {GpuProcess(101, 5000), GpuProcess(202, 3000)}

    inv.release("qwen")
    gpu0, gpu1 = inv.snapshot()
    assert gpu0.free_mib == 24000 and gpu0.processes == ()
    assert gpu1.free_mib == 17000 and gpu1.processes == (GpuProcess(202, 3000),)
    inv.release("qwen")  # twice is harmless
    inv.release("never-claimed")


def test_a_new_claim_by_the_same_owner_replaces_the_old(tmp_path: Path) -> None:
    inv = SimulatedInventory(write_snapshot(tmp_path, TWO_CARDS))
    inv.claim("qwen", pid=1, shares={0: 10000})
    inv.claim("qwen", pid=2, shares={0: 4000})
    assert inv.snapshot()[0].free_mib == 20000
    assert inv.snapshot()[0].processes == (GpuProcess(2, 4000),)


def test_free_never_goes_negative(tmp_path: Path) -> None:
    inv = SimulatedInventory(write_snapshot(tmp_path, TWO_CARDS))
    inv.claim("huge", pid=1, shares={0: 30000})
    assert inv.snapshot()[0].free_mib == 0


def test_claim_on_unknown_card_is_refused(tmp_path: Path) -> None:
    inv = SimulatedInventory(write_snapshot(tmp_path, TWO_CARDS))
    with pytest.raises(ValueError, match="no GPU with index"):
        inv.claim("x", pid=1, shares={7: 100})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"gpus": [{"name": "A", "total_mib": 100}]}, r"gpus\.0\.free_mib: Field required"),
        ({"gpus": [{"name": "A", "total_mib": "lots", "free_mib": 1}]}, r"gpus\.0\.total_mib"),
        ({"gpus": [{"name": "A", "total_mib": 100, "free_mib": 200}]}, r"gpus\.0: .*larger than total_mib"),
        ({"gpus": [{"name": "A", "total_mib": 100, "free_mib": 1, "colour": "red"}]}, r"gpus\.0\.colour"),
        ({"cards": []}, r"gpus: Field required"),
        ([1, 2], r"expected an object"),
        ("{not json", r"invalid JSON at line 1"),
        (
            {"gpus": [{"name": "A", "total_mib": 9, "free_mib": 1, "uuid": "u"},
                      {"name": "B", "total_mib": 9, "free_mib": 1, "uuid": "u"}]},
            r"duplicate uuid 'u'",
        ),
    ],
)
def test_bad_snapshot_errors_name_file_and_field(tmp_path: Path, data: object, expected: str) -> None:
    path = write_snapshot(tmp_path, data, "bad.json")
    with pytest.raises(ConfigError, match=expected) as info:
        SimulatedInventory(path)
    assert str(path) in str(info.value)


def test_missing_snapshot_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        open_inventory(tmp_path / "nope.json")


def test_empty_snapshot_is_a_gpu_less_host(tmp_path: Path) -> None:
    assert SimulatedInventory(write_snapshot(tmp_path, {"gpus": []})).snapshot() == []


def test_open_inventory_prefers_the_snapshot(tmp_path: Path) -> None:
    inv = open_inventory(write_snapshot(tmp_path, TWO_CARDS))
    assert isinstance(inv, SimulatedInventory)


# --- CPU only --------------------------------------------------------------------------------


def test_open_inventory_without_a_driver_is_cpu_only() -> None:
    """This test machine has no NVIDIA driver: NVML really fails to start, and that is fine."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - only on a host with a working driver
        pynvml.nvmlShutdown()
        pytest.skip("this host has a working NVIDIA driver")
    inv = open_inventory(None)
    assert isinstance(inv, CpuOnlyInventory)
    assert inv.snapshot() == []
    assert "CPU-only" in inv.note
    assert "NVMLError" in inv.note  # the underlying cause, for the user to look up


def test_open_inventory_reports_a_broken_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise pynvml.NVMLError_DriverNotLoaded()

    monkeypatch.setattr(pynvml, "nvmlInit", broken)
    inv = open_inventory(None)
    assert isinstance(inv, CpuOnlyInventory)
    assert "NVML could not start" in inv.note and "DriverNotLoaded" in inv.note


# --- NVML, faked -------------------------------------------------------------------------------


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Two cards; card 1 runs two processes, one whose memory NVML may not report (None)."""
    state = {
        "init": 0,
        "devices": [
            {"uuid": b"GPU-aaa", "name": b"NVIDIA GeForce RTX 4090", "total": 24564 * MIB,
             "free": 20000 * MIB, "used": 4564 * MIB, "procs": []},
            {"uuid": "GPU-bbb", "name": "NVIDIA GeForce RTX 3090", "total": 24576 * MIB,
             "free": 10000 * MIB + 5, "used": 14576 * MIB,
             "procs": [SimpleNamespace(pid=4242, usedGpuMemory=8000 * MIB),
                       SimpleNamespace(pid=4243, usedGpuMemory=None)]},
        ],
    }

    def init() -> None:
        state["init"] += 1

    def handle(index: int) -> dict:
        return state["devices"][index]

    def memory(h: dict) -> SimpleNamespace:
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["used"])

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(state["devices"]))
    monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "550.54")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", handle)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: h["uuid"])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: h["name"])
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", memory)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", lambda h: h["procs"])
    return state


def test_nvml_snapshot(fake_nvml: dict) -> None:
    inv = open_inventory(None)
    assert isinstance(inv, NvmlInventory)
    assert inv.note == "NVML: 2 GPUs, driver 550.54"
    assert inv.snapshot() == [
        GpuInfo(0, "GPU-aaa", "NVIDIA GeForce RTX 4090", 24564, 20000, 4564, ()),
        GpuInfo(1, "GPU-bbb", "NVIDIA GeForce RTX 3090", 24576, 10000, 14576,
                (GpuProcess(4242, 8000), GpuProcess(4243, 0))),
    ]
    inv.snapshot()
    assert fake_nvml["init"] == 1  # initialised once, not per snapshot


def test_nvml_process_query_refused_still_gives_memory(fake_nvml: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(h: dict) -> list:
        raise pynvml.NVMLError_NotSupported()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", refuse)
    gpus = NvmlInventory().snapshot()
    assert [g.free_mib for g in gpus] == [20000, 10000]
    assert all(g.processes == () for g in gpus)


def test_nvml_with_no_cards_falls_back_to_cpu(fake_nvml: dict) -> None:
    fake_nvml["devices"].clear()
    inv = open_inventory(None)
    assert isinstance(inv, CpuOnlyInventory)
    assert "reports no GPUs" in inv.note


def test_measure_pids_vram(fake_nvml: dict) -> None:
    inv = NvmlInventory()
    assert measure_pids_vram(inv, {4242, 4243}) == {1: 8000}
    assert measure_pids_vram(inv, {4243}) == {1: 0}  # present, memory not reported
    assert measure_pids_vram(inv, {1}) == {}


def test_measure_pids_vram_on_simulated(tmp_path: Path) -> None:
    inv = SimulatedInventory(write_snapshot(tmp_path, TWO_CARDS))
    inv.claim("a", pid=10, shares={0: 100, 1: 200})
    inv.claim("b", pid=11, shares={1: 50})
    assert measure_pids_vram(inv, {10}) == {0: 100, 1: 200}
    assert measure_pids_vram(inv, {10, 11}) == {0: 100, 1: 250}
    assert measure_pids_vram(CpuOnlyInventory(), {10}) == {}
