"""The manager's window on the GPUs: estimates, live inventory, learned usage, and placement.

`Planner` holds everything placement needs that is not instance state: the inventory (NVML,
simulated, or none), a cache of estimates keyed by the model file and the launch settings,
and the VRAM engines were measured to use. The decision itself is `scheduler.plan`, a pure
function; this module only gathers its inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmd.drivers.base import DeviceAllocation, Driver, Placement, offload_computes_on_cpu, splits_heads, uses_rpc_devices

from llmd.daemon.config import RpcDeviceConfig
from llmd.daemon.util.atomic_write import write_json_atomic
from llmd.daemon.util.state_file import expect, expect_number, read_state
from llmd.daemon.errors import LlmdError
from llmd.daemon.placement.estimate import Estimate, check_gguf_file, estimate_profile
from llmd.daemon.placement.gguf_header import HeaderOnlyGguf
from llmd.daemon.placement.host import HostInfo, read_host
from llmd.daemon.placement.inventory import GpuInfo, Inventory, SimulatedInventory, measure_pids_vram, open_inventory
from llmd.daemon.models.profiles import Profile
from llmd.daemon.placement.scheduler import ModelNeed, NoFit, Plan, RunningModel, need_for_profile, plan
from llmd.daemon.placement.engine_report import attributed, measured_split, reported_per_device
from llmd.daemon.placement.rpc_devices import RemoteDevices

log = logging.getLogger(__name__)

# A learned figure is used with this much slack: allocations vary a little from run to run.
LEARNED_SLACK = 1.05


def _fingerprint(profile: Profile, model_path: Path | HeaderOnlyGguf) -> str:
    """What the memory use depends on: the model file and the launch settings."""
    if isinstance(model_path, HeaderOnlyGguf):
        # Not downloaded yet: the Hub's identity of the files (commit, etags) stands for them.
        model: list[object] = [model_path.identity]
    else:
        stat = model_path.stat()
        model = [str(model_path), stat.st_size, int(stat.st_mtime)]
    launch = profile.launch
    key = json.dumps(
        [*model, profile.engine, launch.ctx, launch.parallel, launch.cache_type, launch.extra_args],
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Measurement:
    fingerprint: str
    per_gpu_mib: dict[int, int]
    estimate_mib: int
    measured_at: float
    # Set when the engine reported it (its log, see `Planner.learn_from_report`): the devices of
    # that placement by uuid, in order, the layers on them (None: all) and the layers whose
    # MoE experts stayed on the CPU. Such a measurement is reused for that placement only.
    devices: tuple[str, ...] = ()
    gpu_layers: int | None = None
    cpu_moe: int = 0

    @property
    def total_mib(self) -> int:
        return sum(self.per_gpu_mib.values())


class MeasurementStore:
    """Real per-GPU usage of each profile's last launch, kept in `state_dir` across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # A damaged file is moved aside: llmd measures again.
        self._data: dict[str, Measurement] = read_state(path, _parse_measurements) or {}

    def get(self, name: str, fingerprint: str) -> Measurement | None:
        found = self._data.get(name)
        return found if found is not None and found.fingerprint == fingerprint else None

    def record(self, name: str, measurement: Measurement) -> None:
        self._data[name] = measurement
        write_json_atomic(self.path, {k: v.__dict__ for k, v in self._data.items()}, indent=1, sort_keys=True)


def _parse_measurements(raw: Any) -> dict[str, Measurement]:
    """The measurements in measured-vram.json, each checked: they decide where models go."""
    found = {}
    for name, item in expect(raw, dict, "the file").items():
        expect(item, dict, f"{name!r}")
        per_gpu = {}
        for card, mib in expect(item["per_gpu_mib"], dict, f"{name}.per_gpu_mib").items():
            index = int(card)
            if index < 0:
                raise ValueError(f"{name}.per_gpu_mib names GPU {card}")
            per_gpu[index] = expect_number(mib, f"{name}.per_gpu_mib[{card}]", minimum=1, integer=True)
        if not per_gpu:  # `learn` records only engines seen on a card: none would plan the model as free
            raise ValueError(f"{name}.per_gpu_mib is empty")
        found[name] = Measurement(
            fingerprint=expect(item["fingerprint"], str, f"{name}.fingerprint"),
            per_gpu_mib=per_gpu,
            estimate_mib=expect_number(item["estimate_mib"], f"{name}.estimate_mib", integer=True),
            measured_at=expect_number(item["measured_at"], f"{name}.measured_at"),
            **_parse_reported_placement(name, item, len(per_gpu)),
        )
    return found


def _parse_reported_placement(name: str, item: dict[str, Any], cards: int) -> dict[str, Any]:
    """The placement of a measurement the engine reported (absent from older files)."""
    devices = tuple(expect(uuid, str, f"{name}.devices[]") for uuid in expect(item.get("devices", []), list, f"{name}.devices"))
    if devices and len(devices) != cards:
        raise ValueError(f"{name}.devices names {len(devices)} devices for {cards} measured")
    layers = item.get("gpu_layers")
    return {
        "devices": devices,
        "gpu_layers": None if layers is None else expect_number(layers, f"{name}.gpu_layers", minimum=0, integer=True),
        "cpu_moe": expect_number(item.get("cpu_moe", 0), f"{name}.cpu_moe", minimum=0, integer=True),
    }


class Planner:
    def __init__(self, simulate: Path | None, state_dir: Path, margin_mib: int,
                 drivers: Mapping[str, Driver] | None = None, rpc_devices: Sequence[RpcDeviceConfig] = ()) -> None:
        self.inventory: Inventory = open_inventory(simulate)
        # Devices of other machines (`[[gpus.rpc]]`), after the local cards in every snapshot.
        self.remote = RemoteDevices(rpc_devices)
        # What each model's engine reported allocating at its last launch: (its pid, per device).
        self.reports: dict[str, tuple[int, list[DeviceAllocation]]] = {}
        # How each engine uses devices (heads or layers split, CPU offload), for its needs.
        self.drivers: Mapping[str, Driver] = drivers or {}
        # The host's RAM and the cores llmd may use, read at each placement (tests replace it).
        self.read_host: Callable[[], HostInfo] = read_host
        self.margin_mib = margin_mib
        self.measurements = MeasurementStore(state_dir / "measured-vram.json")
        self._estimates: dict[str, tuple[str, Estimate]] = {}
        # The fingerprint of each profile's GGUF whose header was last found sound (no GPUs: no estimate).
        self._checked: dict[str, str] = {}
        log.info("GPUs: %s", self.inventory.note)

    @property
    def simulated(self) -> bool:
        return isinstance(self.inventory, SimulatedInventory)

    def snapshot(self, *, telemetry: bool = False) -> list[GpuInfo]:
        """The cards now; with `telemetry`, their temperature, power and other readings, which
        cost a driver call each per card: for reports, never for placement."""
        # Placement asks only for memory, so it passes no argument, and a stand-in inventory
        # without telemetry need only offer a plain snapshot().
        local = self.inventory.snapshot(telemetry=True) if telemetry else self.inventory.snapshot()
        if not self.remote:
            return local
        return [*local, *self.remote.gpu_infos(len(local))]

    def estimate(self, profile: Profile, model_path: Path | HeaderOnlyGguf) -> Estimate:
        """The estimate for this profile, read from the model's headers once per file and settings.

        Launches get theirs here too (`LaunchRequest.estimator`), so a driver sizing the
        engine's caches uses the numbers the scheduler planned with, without reading the file
        again. A changed model file or launch setting changes the fingerprint: read anew."""
        return self._estimate(profile, model_path, _fingerprint(profile, model_path))

    def _estimate(self, profile: Profile, model_path: Path | HeaderOnlyGguf, fingerprint: str) -> Estimate:
        cached = self._estimates.get(profile.name)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        estimate = estimate_profile(profile, model_path)
        self._estimates[profile.name] = (fingerprint, estimate)
        return estimate

    def _check_gguf(self, profile: Profile, model_path: Path | HeaderOnlyGguf) -> None:
        """EstimateError when the local GGUF's header claims more than the file holds (a
        header read from the Hub was checked as it was read); once per file and settings."""
        if isinstance(model_path, HeaderOnlyGguf) or model_path.suffix.lower() != ".gguf" or not model_path.is_file():
            return
        fingerprint = _fingerprint(profile, model_path)
        if self._checked.get(profile.name) != fingerprint:
            check_gguf_file(model_path)
            self._checked[profile.name] = fingerprint

    def need(self, profile: Profile, model_path: Path | HeaderOnlyGguf) -> tuple[ModelNeed, Estimate | None, str]:
        """What the scheduler should reserve, and where the number came from. `model_path` may
        be the headers of a GGUF not downloaded yet (read from the Hub for `llmctl plan`)."""
        if profile.placement.vram_mib is not None:
            return need_for_profile(profile, None), None, "placement.vram_mib in the profile"
        fingerprint = _fingerprint(profile, model_path)  # one stat of the model file per plan
        estimate = self._estimate(profile, model_path, fingerprint)
        learned = self.measurements.get(profile.name, fingerprint)
        if learned is not None and learned.devices:
            # The engine's own report, per device, for the placement it was made on.
            measured = measured_split(learned, LEARNED_SLACK)
            need = replace(need_for_profile(profile, estimate), measured=measured)
            where = ", ".join(f"{mib} MiB" for mib in learned.per_gpu_mib.values())
            return need, estimate, f"estimated from the model file; the engine reported {where} on its last placement"
        if learned is not None and learned.total_mib > 0:
            need = ModelNeed.fixed(
                profile.name,
                int(learned.total_mib * LEARNED_SLACK),
                tensor_parallel=profile.launch.tensor_parallel,
                allowed_gpus=tuple(sorted(set(profile.placement.gpus))) if profile.placement.gpus is not None else None,
                ctx=profile.launch.ctx,
            )
            return need, estimate, f"measured {learned.total_mib} MiB at its last launch"
        source = "estimated from the model file"
        if isinstance(model_path, HeaderOnlyGguf):
            source = "estimated from its GGUF header on the Hub (not downloaded yet)"
        return need_for_profile(profile, estimate), estimate, source

    def place(
        self, profile: Profile, model_path: Path | HeaderOnlyGguf, running: list[RunningModel]
    ) -> tuple[Plan | NoFit, dict[str, Any]]:
        """A plan (or why none exists) plus the breakdown `llmctl plan` shows."""
        gpus = self.snapshot()
        details: dict[str, Any] = {"inventory": self.inventory.note}
        if not gpus:
            # No estimate to make, but a GGUF is still checked before an engine gets it.
            self._check_gguf(profile, model_path)
            need = self._cpu_need(profile, model_path)
            return plan(need, gpus, running, self.margin_mib, host=self.read_host()), details
        try:
            need, estimate, source = self.need(profile, model_path)
        except (ValueError, OSError) as exc:
            raise LlmdError(
                f"cannot estimate the memory {profile.name!r} needs ({exc}); set [placement] vram_mib in its profile"
            ) from None
        details.update({"need_mib": need.total_mib, "need_source": source})
        if estimate is not None:
            details["estimate"] = estimate.breakdown()
        return plan(self._for_engine(need, profile), gpus, running, self.margin_mib, host=self.read_host()), details

    def _for_engine(self, need: ModelNeed, profile: Profile) -> ModelNeed:
        """`need` with what its engine's driver says about the way it uses devices."""
        driver = self.drivers.get(profile.engine)
        if driver is None:
            return need
        # An engine that uses RPC devices (llama.cpp) splits whole layers over its devices.
        remote = uses_rpc_devices(driver)
        return replace(need, splits_heads=splits_heads(driver), offload_on_cpu=offload_computes_on_cpu(driver),
                       remote_devices=remote, layer_split=remote)

    def _cpu_need(self, profile: Profile, model_path: Path | HeaderOnlyGguf) -> ModelNeed:
        """The need of a model on a host without GPUs, for its host RAM: from the estimate when
        the model can be read, else one that claims no RAM (the engine reports what is wrong)."""
        try:
            need, _, _ = self.need(profile, model_path)
        except (LlmdError, ValueError, OSError) as exc:
            log.debug("%s: no estimate to plan host RAM with (%s)", profile.name, exc)
            need = ModelNeed.fixed(profile.name, 1, tensor_parallel=profile.launch.tensor_parallel,
                                   ctx=profile.launch.ctx, threads=profile.launch.threads)
        return self._for_engine(need, profile)

    def claim(self, owner: str, pid: int, shares: dict[int, int]) -> None:
        """A simulated card's free memory follows what llmd starts, as a real card's would."""
        if isinstance(self.inventory, SimulatedInventory):
            local = {gpu.index for gpu in self.inventory.snapshot()}  # not the RPC devices after them
            self.inventory.claim(owner, pid, {index: mib for index, mib in shares.items() if index in local})

    def release(self, owner: str) -> None:
        if isinstance(self.inventory, SimulatedInventory):
            self.inventory.release(owner)

    def learn_from_report(
        self, profile: Profile, model_path: Path, placement: Placement, pid: int, allocations: list[DeviceAllocation]
    ) -> Measurement | None:
        """Record what a freshly started engine reported allocating on each device of its
        placement (its log), for `ps` and for the next plan of the same profile and placement."""
        allocations = attributed(placement, allocations, simulated=self.simulated)
        self.reports[profile.name] = (pid, allocations)
        per_device = reported_per_device(placement, allocations)
        if per_device is None:
            return None
        measurement = Measurement(
            _fingerprint(profile, model_path), per_device, placement.vram_mib, time.time(),
            devices=tuple(share.uuid for share in placement.gpus), gpu_layers=placement.gpu_layers,
            cpu_moe=placement.cpu_moe_layers,
        )
        self.measurements.record(profile.name, measurement)
        log.info("%s: the engine reported %s MiB per device (planned %s)", profile.name,
                 measurement.per_gpu_mib, placement.per_card())
        return measurement

    def usage_of(self, pids: set[int]) -> dict[int, int]:
        """MiB per card that these processes hold now."""
        return measure_pids_vram(self.inventory, pids)

    def learn(self, profile: Profile, model_path: Path, pids: set[int]) -> Measurement | None:
        """Record what a freshly started engine really uses, for its next placement."""
        if self.simulated or not self.snapshot():
            return None  # a simulated card reports our own claims back: nothing to learn
        used = {index: mib for index, mib in self.usage_of(pids).items() if mib > 0}
        if not used:
            return None
        fingerprint = _fingerprint(profile, model_path)
        try:
            estimate_mib = self._estimate(profile, model_path, fingerprint).gpu_total_mib(len(used))
        except (LlmdError, ValueError, OSError):
            estimate_mib = 0
        measurement = Measurement(fingerprint, used, estimate_mib, time.time())
        self.measurements.record(profile.name, measurement)
        log.info("%s uses %s MiB per GPU (estimated %d MiB in all)", profile.name, used, estimate_mib)
        return measurement
