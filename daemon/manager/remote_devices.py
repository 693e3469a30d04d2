"""Watching the devices of other machines (`[[gpus.rpc]]`): whether each answers, and what
happens to the models on one that stops answering.

Every `[gpus] rpc_check_interval` seconds each device is looked at (see `rpc_probe`): one that
no engine of llmd's holds is asked for its memory; one an engine holds is judged by that
engine's connection to it, since its server answers one client at a time. What is found goes
into the planner's `RemoteDevices`, which the next snapshot shows.

A device that stops answering is marked unreachable: `llmctl gpus` says so, plans leave it out,
and each model using it fails with an error naming its endpoint (its engine cannot go on
without its layers there). When it answers again, plans use it again. Nothing here can take the
daemon down: a look that fails is a device that does not answer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from llmd.daemon.errors import EngineStartError, LlmdError
from llmd.daemon.manager.state import Instance, State, close_client
from llmd.daemon.placement.rpc_devices import RemoteDevices
from llmd.daemon.placement.rpc_probe import RpcProbe, engine_link, probe_rpc_server

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

log = logging.getLogger(__name__)


class RemoteDeviceWatch:
    """Keeps the planner's view of the RPC devices current, and fails the models on one that
    goes away."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    @property
    def devices(self) -> RemoteDevices:
        return self.manager.planner.remote

    async def watch_forever(self) -> None:
        """Look at every device every `rpc_check_interval` seconds (the manager looks once at
        startup, before the first load)."""
        if not self.devices:
            return
        while True:
            await anyio.sleep(self.manager.config.gpus.rpc_check_interval)
            await self.check_all()

    async def check_all(self) -> None:
        """Look at every device at once, and act on what changed."""
        async with anyio.create_task_group() as tg:
            for endpoint in self.devices.endpoints:
                tg.start_soon(self._check_safely, endpoint)

    async def _check_safely(self, endpoint: str) -> None:
        try:
            await self.check(endpoint)
        except Exception:  # a bug here must not end the daemon: log it and look again later
            log.exception("checking the RPC device %s failed", endpoint)

    async def check(self, endpoint: str) -> None:
        """Look at the device at `endpoint`; when it stopped answering, fail the models on it."""
        users = self.users(endpoint)
        holder = next((inst for inst in users if inst.engine is not None), None)
        if holder is not None and holder.engine is not None:
            # Asking the server would queue behind the engine it serves: read the engine's link.
            link = await anyio.to_thread.run_sync(engine_link, holder.engine.pid, endpoint)
            if link == "down":
                probe = RpcProbe("unreachable", detail=f"the connection of {holder.name}'s engine to it was closed")
            else:  # up, or not connected yet (still starting)
                probe = RpcProbe("busy", detail=f"in use by {holder.name}")
        else:
            probe = await anyio.to_thread.run_sync(probe_rpc_server, endpoint)
        device = self.devices.get(endpoint)
        before = device.reachable if device is not None else None
        self.devices.record(endpoint, probe)
        now = probe.status != "unreachable"
        if now is before:
            return
        if not now:
            log.warning("RPC device %s does not answer: %s; placing models without it until it does",
                        endpoint, probe.detail)
            for inst in self.users(endpoint):
                await self.fail(inst, endpoint, probe.detail)
        elif before is None:
            log.info("RPC device %s answers: %d MiB free of %d", endpoint, probe.free_mib, probe.total_mib)
        else:
            log.info("RPC device %s answers again", endpoint)
        self.manager.notify_changed()  # loads waiting for room may find it now

    def users(self, endpoint: str) -> list[Instance]:
        """The models placed on the device at `endpoint` now."""
        return [
            inst for inst in self.manager.instances.values()
            if inst.placement is not None and endpoint in inst.placement.rpc_endpoints()
        ]

    def lost(self, endpoint: str, detail: str) -> str:
        device = self.devices.get(endpoint)
        name = f" ({device.name})" if device is not None and device.name != endpoint else ""
        return (f"RPC device {endpoint}{name} stopped answering ({detail}); llmd places models "
                "without it until it answers again")

    async def fail(self, inst: Instance, endpoint: str, detail: str) -> None:
        """Stop the engine of a model that lost a device, and leave it failed with why."""
        error = f"{inst.name!r} failed: {self.lost(endpoint, detail)}"
        engine = inst.engine
        if inst.state is State.STARTING:
            # The load fails on its own once its engine is gone; `blame` names the device.
            if engine is not None:
                await engine.stop(grace=1.0)
            return
        if inst.state not in (State.READY, State.SLEEPING) or engine is None:
            return
        log.error("%s", error)
        self.manager.begin_stop(inst)
        await close_client(inst)
        with anyio.CancelScope(shield=True):
            await engine.stop(grace=1.0)  # its layers on that device are gone: nothing to save
        self.manager.clear(inst, State.FAILED)
        inst.error = error

    async def explain_exit(self, inst: Instance, what: str) -> str:
        """`what` happened to a ready engine that exited, with the RPC device it lost when one of
        its devices does not answer now (which is then marked so, and planned around)."""
        endpoint, detail = await self._lost_device(inst)
        return what if endpoint is None else f"{what}: {self.lost(endpoint, detail)}"

    async def _lost_device(self, inst: Instance) -> tuple[str | None, str]:
        """The first device of `inst`'s placement that does not answer now, and why."""
        if inst.placement is None:
            return None, ""
        for endpoint in inst.placement.rpc_endpoints():
            device = self.devices.get(endpoint)
            if device is not None and device.reachable is False:
                return endpoint, device.detail
            probe = await anyio.to_thread.run_sync(probe_rpc_server, endpoint)
            if probe.status == "unreachable":
                self.devices.record(endpoint, probe)
                self.manager.notify_changed()
                return endpoint, probe.detail
        return None, ""

    async def blame(self, inst: Instance, error: LlmdError) -> LlmdError:
        """`error` of a load that failed, naming the RPC device it lost when one of its
        devices does not answer now."""
        endpoint, detail = await self._lost_device(inst)
        if endpoint is None:
            return error
        return EngineStartError(f"{inst.name!r} did not start: {self.lost(endpoint, detail)}. {error}")
