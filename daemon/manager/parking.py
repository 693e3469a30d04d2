"""Parking (sleep mode): an engine that can sleep is put to sleep instead of stopped when its
memory is needed, keeping its weights in host RAM, and woken by the next request for it.

Whether a model may be parked depends on the host RAM free now, so the decision is made when
the scheduler is asked (see `Loader.running_except`), one budget for every victim of a plan."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import anyio
import httpx
import psutil

from llmd.daemon.engines.supervisor import EngineProcess, process_tree
from llmd.daemon.manager.state import ENGINE_HOST, Instance, Load, State, close_client
from llmd.daemon.placement.host import HOST_RAM_MARGIN_MIB
from llmd.daemon.placement.scheduler import ModelNeed, NoFit, RunningModel, plan

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

log = logging.getLogger(__name__)

# How long the engine may take to go to sleep (waking is bounded by `[server] ready_timeout`).
# Host RAM kept free beyond what parked engines hold is the host ledger's margin
# (`HOST_RAM_MARGIN_MIB`): parked weights claim host RAM like any model's (see `cpu_plan`).
PARK_TIMEOUT = 120.0


async def _post(port: int, path: str, timeout: float) -> str | None:
    """POST to an engine's control route (sleep, wake); None on a 2xx, else what went wrong.
    Not on the request path, so a one-off client is fine."""
    try:
        async with httpx.AsyncClient(base_url=f"http://{ENGINE_HOST}:{port}", trust_env=False, timeout=timeout) as client:
            response = await client.post(path)
    except httpx.HTTPError as exc:
        return f"POST {path} failed: {exc!r}"
    if response.is_success:
        return None
    return f"POST {path} answered {response.status_code}: {response.text[:200]}"


class Parking:
    """Parks and wakes engines for the manager; the instances it changes are the manager's."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    # ----- whether a model can be parked -----

    @staticmethod
    def ram_needed(inst: Instance) -> int:
        """MiB of host RAM parking this model would take; 0 when it cannot be parked (its engine
        cannot sleep, it is not ready, it runs on the CPU, or its weights' size is unknown)."""
        sleep = inst.spec.sleep if inst.spec is not None else None
        if inst.state is not State.READY or sleep is None or inst.placement is None or inst.placement.cpu_only:
            return 0
        return max(0, sleep.host_ram_mib)

    def budget_mib(self) -> int:
        """Host RAM that parking may take now: what is free beyond the margin, less the weights
        of engines still falling asleep (not yet moved out of VRAM)."""
        available = psutil.virtual_memory().available // (1024 * 1024) - HOST_RAM_MARGIN_MIB
        pending = sum(
            other.spec.sleep.host_ram_mib
            for other in self.manager.instances.values()
            if other.state is State.SLEEPING and not other.settled.is_set() and other.spec and other.spec.sleep
        )
        return available - pending

    def can_park(self, inst: Instance, budget_mib: int | None = None) -> bool:
        """Whether evicting this model would park it: its engine can sleep, it is on GPUs, and
        `budget_mib` (default: what host RAM has for parking now) holds the weights it keeps."""
        need = self.ram_needed(inst)
        if not need:
            return False
        return need <= (self.budget_mib() if budget_mib is None else budget_mib)

    # ----- going to sleep -----

    def begin_park(self, inst: Instance) -> None:
        """Mark a ready model as going to sleep, synchronously: requests for it wait for the
        park to end, then wake it."""
        assert inst.state is State.READY
        inst.state = State.SLEEPING
        inst.settled = anyio.Event()
        inst.progress = "going to sleep"

    async def park(self, inst: Instance) -> None:
        """Put the engine to sleep; its claim shrinks to what it still holds. If it will not
        sleep, stop it: either way, its memory is given back."""
        manager = self.manager
        engine, spec = inst.engine, inst.spec
        assert engine is not None and spec is not None and spec.sleep is not None
        log.info("parking %s (pid %d): %s", inst.name, engine.pid, spec.sleep.sleep_path)
        try:
            problem = await _post(engine.port, spec.sleep.sleep_path, PARK_TIMEOUT)
        except BaseException:
            # The load that evicted it was cancelled (unloaded, or llmd is stopping): stop the
            # engine halfway to sleep, so that nothing waits for this park to end.
            if inst.engine is engine and inst.state is State.SLEEPING:
                manager.begin_stop(inst)
                with anyio.CancelScope(shield=True):
                    await manager.finish_stop(inst, "its park was interrupted")
            raise
        if inst.engine is not engine or inst.state is not State.SLEEPING:
            return  # stopped or crashed meanwhile
        if problem is not None:
            log.warning("%s did not go to sleep (%s); stopping it instead", inst.name, problem)
            manager.begin_stop(inst)
            await manager.loader.evict([inst])
            return
        inst.parked = self._kept_while_parked(inst, engine)
        manager.planner.claim(inst.name, engine.pid, inst.parked)
        inst.progress = ""
        inst.settled.set()
        manager.metrics.parked(inst.name)
        log.info("%s is asleep, keeping %s MiB per GPU", inst.name, inst.parked)
        manager.notify_changed()

    def _kept_while_parked(self, inst: Instance, engine: EngineProcess) -> dict[int, int]:
        """MiB per card the sleeping engine still holds: measured through NVML where it can
        say, else the size of a CUDA context."""
        default = inst.parked_share()
        planner = self.manager.planner
        if planner.simulated:
            return default
        measured = planner.usage_of(process_tree(engine.pid))
        placed = inst.placement.per_card()
        return {index: min(placed[index], measured[index]) if measured.get(index) else mib for index, mib in default.items()}

    # ----- waking up -----

    def begin_wake(self, inst: Instance) -> None:
        """Mark a parked model as starting, synchronously, and wake it in the background."""
        task_group = self.manager.task_group
        assert inst.state is State.SLEEPING
        inst.state = State.STARTING  # holds its whole placement again from here on
        inst.progress = "waking up"
        inst.load = Load()
        inst.stopped = anyio.Event()
        task_group.start_soon(self._wake, inst, inst.load)

    async def _wake(self, inst: Instance, load: Load) -> None:
        """Wake a parked engine on its own cards. If they cannot take it back now, or it does
        not wake, stop it and start it afresh, wherever the scheduler finds room."""
        manager = self.manager
        engine, spec = inst.engine, inst.spec
        assert engine is not None and spec is not None and spec.sleep is not None
        problem: str | None = "it was unloaded"
        try:
            with load.scope:
                problem = await self._room_to_wake(inst)
                if problem is None:
                    manager.planner.claim(inst.name, engine.pid, inst.placement.per_card())
                    problem = await _post(engine.port, spec.sleep.wake_path, manager.config.server.ready_timeout)
        except Exception as exc:  # a bug here must not take the daemon down: start it afresh instead
            log.exception("waking %s failed", inst.name)
            problem = f"waking it failed: {exc!r}"
        except BaseException:  # the daemon is shutting down
            with anyio.CancelScope(shield=True):
                await manager.loader.abandon(inst, load, [engine], State.STOPPED, "llmd is shutting down")
            raise
        if load.scope.cancelled_caught:
            await manager.loader.abandon(inst, load, [engine], State.STOPPED, "it was unloaded while waking")
            return
        if problem is None and inst.engine is engine:
            inst.parked = None
            inst.state = State.READY
            inst.last_used = time.monotonic()
            inst.wake_seconds = inst.last_used - load.started
            inst.progress = ""
            manager.metrics.woke(inst.name, inst.wake_seconds)
            log.info("%s woke up in %.2fs", inst.name, inst.wake_seconds)
            load.done.set()
            return
        log.warning("%s could not wake (%s); starting it afresh", inst.name, problem)
        inst.progress = "starting afresh"
        await close_client(inst)
        with anyio.CancelScope(shield=True):
            await engine.stop(manager.config.server.stop_grace)
        manager.clear(inst, State.STARTING)
        inst.stopped = anyio.Event()
        await manager.loader.load(inst, load)

    async def _room_to_wake(self, inst: Instance) -> str | None:
        """Make room for the parked engine's memory on the cards it sleeps on, evicting idle
        models there; None when done, else why there is no room."""
        manager = self.manager
        assert inst.placement is not None and inst.parked is not None
        placed = inst.placement.per_card()
        extra = max(placed[index] - inst.parked.get(index, 0) for index in placed)
        width = len(placed)
        need = ModelNeed.fixed(inst.name, extra * width, tensor_parallel=width, allowed_gpus=tuple(sorted(placed)))
        # What it keeps while asleep stays taken, by a model that cannot be evicted for itself.
        itself = RunningModel(f"{inst.name} (asleep)", dict(inst.parked), in_flight=1)
        running = manager.loader.running_except(inst)
        result = plan(need, manager.planner.snapshot(), [*running, itself], manager.planner.margin_mib)
        if isinstance(result, NoFit):
            return result.reason
        await manager.loader.make_room(inst, result, running)
        inst.progress = "waking up"
        return None
