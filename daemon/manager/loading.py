"""The load path: plan where a model goes, make room for it, fetch it, start its engine and
wait until it is ready; after an out-of-memory start, plan again with less context.

A placement is claimed on the instance before any await, and every victim changes state
before the first await, so concurrent loads never plan into the same memory and no request
is routed to an engine being evicted."""

from __future__ import annotations

import logging
import time
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from llmd.drivers.base import Driver, LaunchRequest

from llmd.daemon.engines.commands import resolve_command
from llmd.daemon.engines.supervisor import EngineProcess, free_port, process_tree, spawn_engine
from llmd.daemon.errors import EngineStartError, LlmdError, NoRoomError
from llmd.daemon.http.upstream import Pool
from llmd.daemon.manager.admission import hold_after
from llmd.daemon.manager.allocations import record_engine_report
from llmd.daemon.util.rotating_log import LogLimits
from llmd.daemon.manager.state import ENGINE_HOST, Instance, Load, State, close_client, engine_log_path, looks_like_oom
from llmd.daemon.models.downloads import DownloadProgress, resolve_cached
from llmd.daemon.models.profiles import Profile
from llmd.daemon.models.pull import fetch_model
from llmd.daemon.placement.estimate import launch_estimator
from llmd.daemon.placement.scheduler import Plan, RunningModel

if TYPE_CHECKING:
    from llmd.daemon.manager.core import Manager

log = logging.getLogger(__name__)

RELEASE_POLL_SECONDS = 0.05
# Out of memory at load: halve the context and try again, down to this.
MIN_CTX = 256


def _engine_client(base_url: str) -> Pool:
    # The proxy's hop to the engine, on the hot path: upstream.Pool rather than httpx (see
    # docs/benchmarks.md). Generation may take minutes: it has no read timeout.
    host, _, port = base_url.removeprefix("http://").rpartition(":")
    return Pool(host, int(port))


class Loader:
    """Starts engines for the manager; the instances it changes are the manager's."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def begin_load(self, inst: Instance, delay: float = 0.0) -> None:
        """Mark the model as starting, synchronously, and start its load in the background."""
        task_group = self.manager.task_group
        inst.state = State.STARTING
        inst.progress = f"retrying in {delay:.0f}s (attempt {inst.failures + 1})" if delay else "planning"
        inst.load = Load()
        inst.stopped = anyio.Event()
        task_group.start_soon(self.load, inst, inst.load, delay)

    async def load(self, inst: Instance, load: Load, delay: float = 0.0) -> None:
        """Run one load to its end, whatever ends it: ready, failed, unloaded, or daemon shutdown."""
        manager = self.manager
        started: list[EngineProcess] = []
        try:
            with load.scope:
                await anyio.sleep(delay)
                await self._start_with_oom_replan(inst, started)
        except NoRoomError as exc:  # not the engine's fault: back to stopped, not failed
            load.error = exc
            await self.abandon(inst, load, started, State.STOPPED, None)
            return
        except LlmdError as exc:
            load.error = exc
        except Exception as exc:  # a driver bug must fail this load, not the daemon
            log.exception("loading %s failed", inst.name)
            # The exception's text stays in the log: this message also reaches API clients.
            load.error = EngineStartError(f"loading {inst.name!r} failed on an internal error of llmd "
                                          f"({type(exc).__name__}); the daemon's log has the details")
        except BaseException:  # the daemon is shutting down: clean up, then let it go on
            with anyio.CancelScope(shield=True):
                await self.abandon(inst, load, started, State.STOPPED, "llmd is shutting down")
            raise
        if load.scope.cancelled_caught:
            await self.abandon(inst, load, started, State.STOPPED, "it was unloaded while starting")
        elif load.error is not None:
            inst.failures += 1
            load.error = await manager.remote_devices.blame(inst, load.error)
            await self.abandon(inst, load, started, State.FAILED, None)
        else:
            engine = started[-1]
            inst.state = State.READY
            inst.last_used = time.monotonic()
            inst.load_seconds = inst.last_used - load.started
            inst.progress = ""
            inst.client = _engine_client(inst.base_url)
            log.info("%s ready in %.2fs", inst.name, inst.load_seconds)
            manager.metrics.load_finished(inst.name, inst.load_seconds, ok=True)
            self._learn_usage(inst, engine)
            manager.task_group.start_soon(manager.supervision.watch, inst, engine)
            load.done.set()

    async def _start_with_oom_replan(self, inst: Instance, started: list[EngineProcess]) -> None:
        """Start the engine; if it ran out of memory, halve the context and plan again
        instead of retrying the same thing."""
        while True:
            try:
                await self._start_engine(inst, started)
                return
            except EngineStartError as exc:
                ctx = inst.placement.ctx if inst.placement is not None else inst.profile.launch.ctx
                if not looks_like_oom(exc) or ctx // 2 < MIN_CTX:
                    raise
                with anyio.CancelScope(shield=True):
                    for engine in started:
                        await engine.stop(self.manager.config.server.stop_grace)
                started.clear()
                self.manager.clear_claim(inst)
                inst.ctx_override = ctx // 2
                log.warning("%s ran out of memory with ctx %d; planning again with ctx %d", inst.name, ctx, ctx // 2)

    @staticmethod
    def _effective_profile(inst: Instance) -> Profile:
        """The profile as loads use it: with the context lowered after an out-of-memory load."""
        profile = inst.profile
        if inst.ctx_override is None or inst.ctx_override >= profile.launch.ctx:
            return profile
        launch = profile.launch.model_copy(update={"ctx": inst.ctx_override})
        lowered = profile.model_copy(update={"launch": launch})
        lowered.name = profile.name
        return lowered

    async def _start_engine(self, inst: Instance, started: list[EngineProcess]) -> None:
        """Place, evict, spawn and wait for readiness; the spawned engine is appended to `started` at once."""
        manager = self.manager
        profile = self._effective_profile(inst)
        driver = manager.drivers[profile.engine]
        model_path = await self.fetch(inst, profile)
        command = resolve_command(manager.config, driver)
        await self._reserve_placement(inst, profile, model_path)
        placement = inst.placement
        assert placement is not None
        if profile is not inst.profile:
            placement = dc_replace(placement, reason=f"{placement.reason}; ctx lowered to {profile.launch.ctx} after running out of memory")
            inst.placement = placement
        request = LaunchRequest(
            profile=profile,
            placement=placement,
            model_path=model_path,
            host=ENGINE_HOST,
            port=free_port(ENGINE_HOST, self._ports_in_use()),
            command=command,
            env=dict(manager.config.engine(driver.name).env),
            # The estimate just planned with, from the planner's cache.
            estimator=launch_estimator(profile, model_path, manager.planner.estimate),
            kv_dir=manager.kv.launch_dir(profile, driver, model_path, command, placement.ctx),
        )
        engine = await self._spawn_until_ready(inst, driver, request, started)
        # The saved prompt cache goes in before the model is reported ready. Should a saved file
        # still make the engine exit, it is dropped by now: start the engine again without it.
        while not await manager.kv.restore(inst, engine):
            log.warning("%s exited while restoring its saved prompt cache; starting it again", inst.name)
            with anyio.CancelScope(shield=True):
                await engine.stop(manager.config.server.stop_grace)
            request = dc_replace(request, port=free_port(ENGINE_HOST, self._ports_in_use()))
            engine = await self._spawn_until_ready(inst, driver, request, started)

    async def _spawn_until_ready(self, inst: Instance, driver: Driver, request: LaunchRequest,
                                 started: list[EngineProcess]) -> EngineProcess:
        """Spawn the engine `request` describes, append it to `started` at once, claim its
        placement, and wait until it is ready."""
        manager = self.manager
        profile = request.profile
        spec = driver.launch(request)
        server = manager.config.server
        # An engine that computes on the CPU runs on its share of the cores only.
        engine = spawn_engine(profile.name, spec, request.port, engine_log_path(manager.config, profile.name),
                              str(server.state_dir), LogLimits.from_mib(server.log_max_mib, server.log_keep),
                              cpu_cores=request.placement.cpu_cores)
        started.append(engine)
        manager.ledger.add(engine)
        inst.engine, inst.spec, inst.request = engine, spec, request
        manager.planner.claim(profile.name, engine.pid, request.placement.per_card())
        inst.progress = f"waiting for {inst.profile.engine} (pid {engine.pid}) to load the model"
        log.info("starting %s: pid %d port %d, %s", profile.name, engine.pid, request.port, request.placement.reason or "placed")
        await engine.wait_ready(spec, manager.config.server.ready_timeout)
        return engine

    async def _reserve_placement(self, inst: Instance, profile: Profile, model_path: Path) -> None:
        """Find room for `inst`, waiting up to queue_timeout for busy models to finish, and
        evicting idle ones the plan names. The placement is claimed (set on the instance)
        before any await, so concurrent loads never plan into the same memory."""
        try:
            await self._wait_for_room(inst, profile, model_path)
        finally:  # placed, given up or cancelled: the models it held take requests again
            self.manager.lift_holds(inst)

    async def _wait_for_room(self, inst: Instance, profile: Profile, model_path: Path) -> None:
        manager = self.manager
        deadline = time.monotonic() + manager.config.server.queue_timeout
        while True:
            running = self.running_except(inst)
            result, _ = manager.planner.place(profile, model_path, running)
            if isinstance(result, Plan):
                inst.placement = result.placement
                manager.lift_holds(inst)  # before the eviction's awaits: models it spares serve on
                await self.make_room(inst, result, running)
                return
            if not self._room_may_appear(inst):
                raise LlmdError(f"{inst.name!r} cannot be placed: {result.reason}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoRoomError(
                    f"no room for {inst.name!r} after waiting {manager.config.server.queue_timeout:.0f}s "
                    f"for busy models: {result.reason}",
                    retry_after=10,
                )
            inst.progress = f"waiting for room: {result.reason}"
            # Busy models go on taking requests for a while (grouping them saves swaps); past
            # that, new requests for them queue behind this load, so they drain in time.
            hold_in = hold_after(manager.config.server.queue_timeout) - (manager.config.server.queue_timeout - remaining)
            if hold_in <= 0:
                manager.hold_for(inst, self._busy_obstacles(inst, profile, model_path, running))
            with anyio.move_on_after(remaining if hold_in <= 0 else min(remaining, hold_in)):
                await manager.wait_changed()

    def _busy_obstacles(self, inst: Instance, profile: Profile, model_path: Path, running: list[RunningModel]) -> list[str]:
        """The busy ready models whose room `inst` waits for: those the plan would evict if
        their requests were done."""
        instances = self.manager.instances
        drainable = {
            model.name for model in running
            if model.in_flight and not model.pinned and instances[model.name].state is State.READY
        }
        relaxed = [dc_replace(model, in_flight=0) if model.name in drainable else model for model in running]
        result, _ = self.manager.planner.place(profile, model_path, relaxed)
        return [name for name in result.evict if name in drainable] if isinstance(result, Plan) else []

    def running_except(self, inst: Instance) -> list[RunningModel]:
        """Every other model holding memory, as the scheduler sees it; those that eviction
        would park rather than stop are marked so, within one host RAM budget."""
        parking = self.manager.parking
        running = []
        budget: int | None = None  # host RAM for parking, read once and only if some model can park
        for other in self.manager.instances.values():
            if other is inst or other.placement is None:
                continue
            parkable = False
            need = parking.ram_needed(other)
            if need:
                budget = parking.budget_mib() if budget is None else budget
                # One budget for all: a plan that evicts several never parks more than RAM holds.
                parkable = parking.can_park(other, budget)
                if parkable:
                    budget -= need
            running.append(other.as_running(parkable=parkable))
        return running

    async def make_room(self, inst: Instance, result: Plan, running: list[RunningModel]) -> None:
        """Evict what `result` names: park the victims the plan counted as parked, stop the rest.
        Each victim changes state before the first await, so no request is routed to it."""
        manager = self.manager
        parks = {model.name for model in running if model.parked_gpus is not None}
        to_park = [manager.instances[name] for name in result.evict if name in parks]
        to_stop = [manager.instances[name] for name in result.evict if name not in parks]
        for victim in to_park:
            manager.parking.begin_park(victim)
        for victim in to_stop:
            manager.begin_stop(victim)
        if not result.evict:
            return
        if inst.load is not None:
            inst.load.evicted += [victim.name for victim in to_stop]
            inst.load.parked += [victim.name for victim in to_park]
        inst.progress = f"evicting {', '.join(result.evict)}"
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.evict, to_stop)
            for victim in to_park:
                tg.start_soon(manager.parking.park, victim)

    def _room_may_appear(self, inst: Instance) -> bool:
        """Whether waiting can help: some other model is busy, starting or stopping now."""
        return any(
            not other.as_running().evictable and not other.profile.policy.pinned
            for other in self.manager.instances.values()
            if other is not inst and other.placement is not None
        )

    async def evict(self, victims: list[Instance]) -> None:
        """Stop the victims (already marked stopping) together, then wait until the GPUs show
        their memory released."""
        if not victims:
            return
        manager = self.manager
        started = time.monotonic()
        pids: set[int] = set()
        for victim in victims:
            if victim.engine is not None:
                pids |= process_tree(victim.engine.pid)
        async with anyio.create_task_group() as tg:
            for victim in victims:
                tg.start_soon(manager.finish_stop, victim, "evicted to make room")
        if not await self.wait_released(pids):
            log.warning("GPU memory of evicted engines (pids %s) was not released after %.0fs",
                        sorted(pids), manager.config.gpus.release_timeout)
        manager.metrics.evicted([victim.name for victim in victims], time.monotonic() - started)

    async def wait_released(self, pids: set[int]) -> bool:
        """Wait until the GPUs show no memory held by `pids` (a driver may free it after the
        process is gone); False if that took longer than `[gpus] release_timeout`."""
        with anyio.move_on_after(self.manager.config.gpus.release_timeout):
            while self.manager.planner.usage_of(pids):
                await anyio.sleep(RELEASE_POLL_SECONDS)
            return True
        return False

    def _learn_usage(self, inst: Instance, engine: EngineProcess) -> None:
        if getattr(self.manager.drivers.get(inst.profile.engine), "allocations", None) is not None:
            # The engine's own report, device by device, is the truth (see `allocations`).
            self.manager.task_group.start_soon(record_engine_report, self.manager, inst, engine)
            return
        placement = inst.placement
        if placement is None or placement.cpu_only or placement.gpu_layers is not None or placement.cpu_moe_layers:
            return  # only a whole-model placement gives a total worth reusing
        try:
            self.manager.planner.learn(inst.profile, self.local_model_path(inst.profile), process_tree(engine.pid))
        except (LlmdError, OSError) as exc:
            log.warning("could not measure %s's GPU memory: %s", inst.name, exc)

    async def abandon(self, inst: Instance, load: Load, started: list[EngineProcess], state: State, why: str | None) -> None:
        """End a load that did not make the model ready: stop what it started, give back its
        claim, leave the instance in `state`, and wake everyone waiting on it with the error."""
        manager = self.manager
        if load.error is None:
            load.error = EngineStartError(f"{inst.name!r} did not start: {why}")
        log.warning("load of %s ended: %s", inst.name, load.error)
        manager.metrics.load_finished(inst.name, time.monotonic() - load.started, ok=False)
        await close_client(inst)  # set only when a parked engine failed to wake
        with anyio.CancelScope(shield=True):
            for engine in started:
                await engine.stop(manager.config.server.stop_grace)
        manager.clear(inst, state)
        inst.error = str(load.error) if state is State.FAILED else None
        load.done.set()

    @staticmethod
    def local_model_path(profile: Profile) -> Path:
        """The model on disk now, without downloading: for plans and measurements."""
        source = profile.model
        if source.path is not None:
            if not source.path.exists():
                raise EngineStartError(
                    f"model file {source.path} for {profile.name!r} does not exist; fix [model] path in its profile"
                )
            return source.path
        cached = resolve_cached(source)
        if cached is None:
            raise EngineStartError(
                f"{profile.name!r}: {source.hf_repo} is not downloaded yet; run `llmctl pull {profile.name}` "
                "(a request for the model downloads it too)"
            )
        return cached

    async def fetch(self, inst: Instance, profile: Profile, update: bool = False) -> Path:
        """The model on disk, downloading it first if needed, with progress in `ps` and `llmctl load`."""
        if profile.model.path is not None:
            return self.local_model_path(profile)

        def show(line: str) -> None:
            inst.progress = f"downloading {line}"

        def count(progress: DownloadProgress) -> None:
            inst.download = progress

        try:
            return await fetch_model(profile.model, show, on_download=count, update=update)
        finally:
            inst.progress = ""
            inst.download = None

    def _ports_in_use(self) -> set[int]:
        return {inst.engine.port for inst in self.manager.instances.values() if inst.engine is not None}
