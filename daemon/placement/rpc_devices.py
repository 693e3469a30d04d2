"""Devices on other machines, reached over llama.cpp's RPC (`[[gpus.rpc]]` in llmd.toml).

Each one joins the inventory after the local cards, as a `GpuInfo` of kind "rpc" with its
endpoint. What is known of it comes from the last look at it (`record`): a look at a server
no engine of llmd's holds asks it for its memory (`rpc_probe.probe_rpc_server`); a server an
engine holds is judged by that engine's connection to it (`rpc_probe.engine_link`). Nothing
here does I/O, so a snapshot costs nothing: the manager's watch (`manager.remote_devices`)
does the looking, in the background.

Memory: the server's device's free memory at the last look that found it idle (a server
serving an engine cannot be asked), each capped at the device's `total_mib`. A server that
has never answered has none to offer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from llmd.daemon.config import RpcDeviceConfig
from llmd.daemon.placement.inventory import GpuInfo
from llmd.daemon.placement.rpc_probe import RpcProbe

__all__ = ["RPC_KIND", "RemoteDevice", "RemoteDevices", "rpc_uuid"]

RPC_KIND = "rpc"


def rpc_uuid(endpoint: str) -> str:
    """The stable identity of an RPC device (its endpoint), where a local card has its UUID."""
    return f"RPC-{endpoint}"


@dataclass(frozen=True)
class RemoteDevice:
    """One RPC device as last seen."""

    config: RpcDeviceConfig
    # None until it has been looked at once.
    reachable: bool | None = None
    # From the last look that could ask it (it was idle), before the cap.
    reported_total_mib: int = 0
    reported_free_mib: int = 0
    # What the last look found: "answered", "in use by llmd", "busy", or why it is unreachable.
    detail: str = "not checked yet"
    checked_at: float = 0.0
    # When it became unreachable (or reachable again), for logs and `gpus`.
    since: float = 0.0

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    @property
    def name(self) -> str:
        return self.config.name or self.config.endpoint

    @property
    def total_mib(self) -> int:
        """What llmd may use of it: the reported total, capped; the cap alone before any answer."""
        cap = self.config.total_mib
        if not self.reported_total_mib:
            return cap or 0
        return min(self.reported_total_mib, cap) if cap else self.reported_total_mib

    @property
    def free_mib(self) -> int:
        return min(self.reported_free_mib, self.total_mib) if self.reachable else 0


class RemoteDevices:
    """The RPC devices of llmd.toml and what the last look at each found."""

    def __init__(self, devices: Sequence[RpcDeviceConfig] = ()) -> None:
        self._devices = {device.endpoint: RemoteDevice(device) for device in devices}

    def __bool__(self) -> bool:
        return bool(self._devices)

    def __len__(self) -> int:
        return len(self._devices)

    @property
    def endpoints(self) -> list[str]:
        return list(self._devices)

    def get(self, endpoint: str) -> RemoteDevice | None:
        return self._devices.get(endpoint)

    def all(self) -> list[RemoteDevice]:
        return list(self._devices.values())

    def record(self, endpoint: str, probe: RpcProbe, *, now: float | None = None) -> bool | None:
        """Take what a look at `endpoint` found. Returns the new reachability when it changed
        (False: it went away, True: it answers again), else None."""
        device = self._devices[endpoint]
        now = time.time() if now is None else now
        reachable = probe.status != "unreachable"
        update: dict[str, object] = {"reachable": reachable, "checked_at": now}
        if probe.status == "ok":
            update.update(reported_total_mib=probe.total_mib, reported_free_mib=probe.free_mib, detail="answered")
        elif probe.status == "busy":
            update["detail"] = probe.detail or "busy"
        else:
            update["detail"] = probe.detail or "unreachable"
        changed = device.reachable is not reachable
        if changed:
            update["since"] = now
        self._devices[endpoint] = replace(device, **update)  # type: ignore[arg-type]
        if changed and (device.reachable is not None or not reachable):
            return reachable
        return None

    def gpu_infos(self, first_index: int) -> list[GpuInfo]:
        """The devices as inventory entries, numbered from `first_index` (after the local cards)."""
        infos = []
        for offset, device in enumerate(self._devices.values()):
            total, free = device.total_mib, device.free_mib
            infos.append(GpuInfo(
                index=first_index + offset,
                uuid=rpc_uuid(device.endpoint),
                name=device.name,
                total_mib=total,
                free_mib=free,
                used_mib=max(0, total - free),
                kind=RPC_KIND,
                endpoint=device.endpoint,
                reachable=bool(device.reachable),
                margin_mib=device.config.margin_mib,
                status=device.detail,
            ))
        return infos
