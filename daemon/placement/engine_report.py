"""The engine's own report of what it allocated on each device, as placement uses it.

After a launch, a driver that can (`llmd.drivers.base.engine_allocations`; llama.cpp, from its
log) says what the engine allocated on each device of its placement: weights, KV cache and
compute buffers. That is the truth the estimate aims at. The planner records it per device,
with the placement it was made on, and plans the next launch of the same profile and placement
with it (`scheduler.MeasuredSplit`).

A simulated card is not real: the engine runs on this machine's CPU, and its buffers there
stand for the card's when the placement has that one card, so that learning works the same way
on a simulated inventory.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

from llmd.drivers.base import HOST_MEMORY, DeviceAllocation, Placement

from llmd.daemon.placement.scheduler import MeasuredSplit

if TYPE_CHECKING:
    from llmd.daemon.placement.planner import Measurement

__all__ = ["attributed", "measured_split", "reported_per_device"]


def attributed(placement: Placement, allocations: list[DeviceAllocation], *, simulated: bool) -> list[DeviceAllocation]:
    """`allocations` with, on a simulated inventory, the host memory of a one-card placement
    standing for that card (the engine ran on the CPU in its place)."""
    local = [share for share in placement.gpus if not share.remote]
    indices = {item.index for item in allocations}
    if not (simulated and len(local) == 1 and local[0].index not in indices and HOST_MEMORY in indices):
        return allocations
    return [replace(item, index=local[0].index) if item.index == HOST_MEMORY else item for item in allocations]


def reported_per_device(placement: Placement, allocations: list[DeviceAllocation]) -> dict[int, int] | None:
    """MiB the engine reported on each device of `placement` (rounded up), by index; None when
    it did not report every device (a log at too low a verbosity, or a CPU placement)."""
    if not placement.gpus:
        return None
    by_index = {item.index: item for item in allocations}
    if any(share.index not in by_index for share in placement.gpus):
        return None
    return {share.index: max(1, math.ceil(by_index[share.index].total_mib)) for share in placement.gpus}


def measured_split(measurement: Measurement, slack: float) -> MeasuredSplit:
    """A reported measurement as the scheduler reuses it: per device, in placement order (which
    is index order), with `slack` for what varies from one launch to the next."""
    ordered = [measurement.per_gpu_mib[index] for index in sorted(measurement.per_gpu_mib)]
    return MeasuredSplit(
        devices=measurement.devices,
        gpu_layers=measurement.gpu_layers,
        cpu_moe=measurement.cpu_moe,
        mib=tuple(math.ceil(mib * slack) for mib in ordered),
    )
