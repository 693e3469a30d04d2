"""The GPU inventory: what cards exist, how much memory each has free, and who uses it.

Three sources share one small interface (`Inventory`):

- `NvmlInventory` asks the NVIDIA driver through NVML (package `nvidia-ml-py`).
- `SimulatedInventory` reads a JSON snapshot, so tests, dry runs and `llmctl plan` work on a
  machine without GPUs. Its free memory follows what llmd claims and releases, the way real
  free memory follows the engines llmd starts and stops.
- `CpuOnlyInventory` is what a host without a usable NVIDIA driver gets: no cards, and a note
  saying why, instead of a crash at startup.

Memory is counted in MiB throughout, as NVML users and `nvidia-smi` do.

`snapshot()` reads memory only, which is all placement needs; `snapshot(telemetry=True)` adds
each card's temperature, power, utilisation, fan and energy readings (telemetry.py) for reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmd.daemon.errors import ConfigError
from llmd.daemon.placement.telemetry import NO_TELEMETRY, TELEMETRY_FIELDS, GpuTelemetry, read_nvml_telemetry
from llmd.daemon.util.validation import describe_validation_error

__all__ = [
    "CpuOnlyInventory",
    "GpuInfo",
    "GpuProcess",
    "GpuTelemetry",
    "Inventory",
    "NvmlInventory",
    "SimulatedInventory",
    "measure_pids_vram",
    "open_inventory",
]

_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on one card."""

    pid: int
    used_mib: int


@dataclass(frozen=True)
class GpuInfo:
    """One card as the inventory saw it at snapshot time."""

    index: int
    uuid: str
    name: str
    total_mib: int
    free_mib: int
    used_mib: int
    processes: tuple[GpuProcess, ...] = ()
    # Empty (all None) unless the snapshot was asked for telemetry.
    telemetry: GpuTelemetry = NO_TELEMETRY
    # "local" for a card in this machine (NVML or simulated); "rpc" for a device on another
    # machine, reached over llama.cpp's RPC at `endpoint` (see rpc_devices).
    kind: str = "local"
    endpoint: str = ""
    # False while an RPC device does not answer: nothing is placed on it then.
    reachable: bool = True
    # The safety margin kept free on this device; None: `[gpus] margin_mib`.
    margin_mib: int | None = None
    # What the last look at an RPC device found ("answered", "busy", why it is unreachable).
    status: str = ""

    @property
    def remote(self) -> bool:
        """A device on another machine: only engines that can use RPC devices go there."""
        return self.kind == "rpc"


class Inventory(Protocol):
    """Anything that can list the cards. `note` says where the list comes from, for logs and `llmctl`."""

    note: str

    def snapshot(self, *, telemetry: bool = False) -> list[GpuInfo]:
        """The cards now, in NVML index order; with `telemetry`, their readings too (for reports)."""
        ...


# ---------------------------------------------------------------------------------------------
# NVML


class NvmlInventory:
    """Live readings from the NVIDIA driver.

    `nvmlInit` runs once, in the constructor, so a missing library or driver shows up at startup
    (where `open_inventory` turns it into CPU-only mode) rather than on the first request.
    """

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            # A driver without cards is of no use to the scheduler; treat it like no driver.
            pynvml.nvmlShutdown()
            raise RuntimeError("NVML found no GPUs")
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            driver = "unknown"
        self.note = f"NVML: {count} GPU{'s' if count != 1 else ''}, driver {driver}"

    def snapshot(self, *, telemetry: bool = False) -> list[GpuInfo]:
        nvml = self._nvml
        gpus: list[GpuInfo] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except nvml.NVMLError:
                # Some drivers (and vGPU setups) refuse the process query; the memory totals
                # are still right, only the per-pid attribution is missing.
                running = []
            processes = tuple(
                GpuProcess(pid=int(p.pid), used_mib=_mib(getattr(p, "usedGpuMemory", None)))
                for p in running
            )
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    total_mib=_mib(memory.total),
                    free_mib=_mib(memory.free),
                    used_mib=_mib(memory.used),
                    processes=processes,
                    telemetry=read_nvml_telemetry(nvml, handle) if telemetry else NO_TELEMETRY,
                )
            )
        return gpus


def _text(value: str | bytes) -> str:
    """Older nvidia-ml-py releases return bytes, newer ones str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _mib(value: int | None) -> int:
    """Bytes to whole MiB. NVML reports None for a process's memory when it is not allowed to know."""
    return 0 if value is None else int(value) // _MIB


# ---------------------------------------------------------------------------------------------
# Simulated snapshot


class _SimGpu(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    total_mib: Annotated[int, Field(gt=0)]
    free_mib: Annotated[int, Field(ge=0)]
    uuid: str | None = None
    # Telemetry, all optional: a card without a reading shows "n/a", as a real one would.
    temperature_c: int | None = None
    power_w: Annotated[float, Field(ge=0)] | None = None
    power_limit_w: Annotated[float, Field(gt=0)] | None = None
    utilization_gpu_pct: Annotated[int, Field(ge=0, le=100)] | None = None
    utilization_memory_pct: Annotated[int, Field(ge=0, le=100)] | None = None
    fan_pct: Annotated[int, Field(ge=0, le=100)] | None = None
    energy_j: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _free_within_total(self) -> _SimGpu:
        if self.free_mib > self.total_mib:
            raise ValueError(f"free_mib ({self.free_mib}) is larger than total_mib ({self.total_mib})")
        return self


class _SimSnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus: list[_SimGpu]


@dataclass(frozen=True)
class _Claim:
    pid: int
    shares: dict[int, int]


class SimulatedInventory:
    """Cards described by a JSON file, e.g.::

        {"gpus": [{"name": "RTX 4090", "total_mib": 24564, "free_mib": 24000}]}

    A card may carry telemetry too (`temperature_c`, `power_w`, `power_limit_w`,
    `utilization_gpu_pct`, `utilization_memory_pct`, `fan_pct`, `energy_j`); the readings stay
    as written, since nothing runs on a simulated card.
    `free_mib` is what other programs leave free; llmd's own engines are layered on top through
    `claim` and `release`, so a dry run sees its earlier decisions the way NVML would.
    The daemon is a single-threaded asyncio program, so plain dict updates are safe here.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._base = _load_snapshot(self.path)
        self._claims: dict[str, _Claim] = {}
        self.note = f"simulated from {self.path}"

    def claim(self, owner: str, pid: int, shares: dict[int, int]) -> None:
        """Record that `owner` (a model name) now holds `shares` (card index → MiB) as process `pid`.

        A second claim by the same owner replaces the first, as a restarted engine would.
        """
        known = {gpu.index for gpu in self._base}
        unknown = sorted(set(shares) - known)
        if unknown:
            raise ValueError(f"{owner}: no GPU with index {unknown} in {self.path}")
        self._claims[owner] = _Claim(pid=pid, shares={i: int(m) for i, m in shares.items() if m > 0})

    def release(self, owner: str) -> None:
        """Forget `owner`'s memory, as when its engine exits. Unknown owners are ignored."""
        self._claims.pop(owner, None)

    def snapshot(self, *, telemetry: bool = False) -> list[GpuInfo]:
        gpus: list[GpuInfo] = []
        for base in self._base:
            processes = tuple(
                GpuProcess(pid=claim.pid, used_mib=claim.shares[base.index])
                for _, claim in sorted(self._claims.items())
                if base.index in claim.shares
            )
            claimed = sum(p.used_mib for p in processes)
            free = max(0, base.free_mib - claimed)
            gpus.append(
                GpuInfo(
                    index=base.index,
                    uuid=base.uuid,
                    name=base.name,
                    total_mib=base.total_mib,
                    free_mib=free,
                    used_mib=base.total_mib - free,
                    processes=processes,
                    telemetry=base.telemetry if telemetry else NO_TELEMETRY,
                )
            )
        return gpus


def _load_snapshot(path: Path) -> list[GpuInfo]:
    """Parse and validate a snapshot file; errors name the file and the field."""
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: GPU snapshot file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read GPU snapshot: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: expected an object like {{"gpus": [...]}}, got {type(raw).__name__}')
    try:
        snapshot = _SimSnapshot.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None
    gpus = [
        GpuInfo(
            index=index,
            uuid=gpu.uuid or f"GPU-sim-0000-{index}",
            name=gpu.name,
            total_mib=gpu.total_mib,
            free_mib=gpu.free_mib,
            used_mib=gpu.total_mib - gpu.free_mib,
            telemetry=GpuTelemetry(**gpu.model_dump(include=set(TELEMETRY_FIELDS))),
        )
        for index, gpu in enumerate(snapshot.gpus)
    ]
    uuids = [gpu.uuid for gpu in gpus]
    duplicates = sorted({u for u in uuids if uuids.count(u) > 1})
    if duplicates:
        raise ConfigError(f"{path}: gpus: duplicate uuid {duplicates[0]!r}; every card needs its own uuid")
    return gpus


# ---------------------------------------------------------------------------------------------
# No GPU


class CpuOnlyInventory:
    """No cards: every model runs on the CPU. `note` says why, so the user can fix the driver."""

    def __init__(self, note: str = "no GPUs: running in CPU-only mode") -> None:
        self.note = note

    def snapshot(self, *, telemetry: bool = False) -> list[GpuInfo]:
        return []


def open_inventory(simulate: Path | None) -> Inventory:
    """The inventory the daemon should use.

    A snapshot path always wins (tests and dry runs must never touch real cards). Otherwise NVML;
    if it cannot start (no library, no driver, no card) the daemon still runs, CPU-only, and
    says so in the note rather than failing at startup.
    """
    if simulate is not None:
        return SimulatedInventory(simulate)
    try:
        return NvmlInventory()
    except Exception as exc:  # NVMLError subclasses, OSError from the loader, "no GPUs"
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if "LibraryNotFound" in type(exc).__name__ or isinstance(exc, OSError):
            what = "no NVIDIA driver found"
        elif "no GPUs" in str(exc):
            what = "the NVIDIA driver reports no GPUs"
        else:
            what = "NVML could not start"
        return CpuOnlyInventory(f"{what} ({reason}): running in CPU-only mode")


def measure_pids_vram(inventory: Inventory, pids: set[int]) -> dict[int, int]:
    """MiB used on each card by `pids` (an engine's whole process tree), by card index.

    Used after a launch to learn what an engine really took, which corrects the estimate for
    later placements. Cards where none of the pids appear are left out.
    """
    usage: dict[int, int] = {}
    for gpu in inventory.snapshot():
        used = sum(p.used_mib for p in gpu.processes if p.pid in pids)
        if used or any(p.pid in pids for p in gpu.processes):
            usage[gpu.index] = used
    return usage
