"""After a launch: what the engine says it allocated on each device, recorded for `ps` and the
next plan (see `placement.engine_report`).

The engine logs its buffers while it loads, before it answers its readiness probe; a thread
copies its output into the log file, so the lines may land a moment after the engine is ready.
The log is read until it covers every device of the placement, for a few seconds at most.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio

from llmd.drivers.base import HOST_MEMORY, DeviceAllocation, Placement, engine_allocations

from llmd.daemon.engines.supervisor import EngineProcess, tail_lines
from llmd.daemon.errors import LlmdError
from llmd.daemon.manager.state import Instance

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

log = logging.getLogger(__name__)

# What spawn_engine writes before each launch's output in the engine's log.
LAUNCH_HEADER = "===== llmd: starting "
# A loading engine logs a few hundred lines at verbosity 4; more are read to be safe.
LOG_LINES = 5000
REPORT_WAIT_SECONDS = 3.0
REPORT_POLL_SECONDS = 0.1


def launch_lines(engine: EngineProcess) -> list[str]:
    """The lines this launch of the engine wrote (after its log's last launch header)."""
    lines = tail_lines(engine.log_path, LOG_LINES)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(LAUNCH_HEADER):
            return lines[i + 1:]
    return lines


def _covers(placement: Placement, allocations: list[DeviceAllocation]) -> bool:
    """Whether the report has every device of the placement, each down to its compute buffer
    (the last one logged). Host memory stands in for this machine's cards when the engine
    runs on the CPU (a simulated inventory), and for a CPU placement."""
    found = {item.index for item in allocations if item.compute_mib > 0}
    if not placement.gpus:
        return HOST_MEMORY in found
    if not all(share.index in found for share in placement.gpus if share.remote):
        return False
    return all(share.index in found for share in placement.gpus if not share.remote) or HOST_MEMORY in found


async def record_engine_report(manager: Manager, inst: Instance, engine: EngineProcess) -> bool:
    """Read what the engine reported allocating, and give it to the planner; False when its
    driver does not report, or the engine did not say within REPORT_WAIT_SECONDS."""
    placement = inst.placement
    driver = manager.drivers.get(inst.profile.engine)
    if placement is None or driver is None or getattr(driver, "allocations", None) is None:
        return False
    deadline = time.monotonic() + REPORT_WAIT_SECONDS
    while True:
        allocations = engine_allocations(driver, launch_lines(engine), placement)
        if _covers(placement, allocations) or time.monotonic() >= deadline:
            break
        await anyio.sleep(REPORT_POLL_SECONDS)
    if inst.engine is not engine or not allocations:
        return False
    try:
        model_path = manager.loader.local_model_path(inst.profile)
        manager.planner.learn_from_report(inst.profile, model_path, placement, engine.pid, allocations)
    except (LlmdError, OSError) as exc:
        log.warning("could not record what %s's engine allocated: %s", inst.name, exc)
        return False
    return True
