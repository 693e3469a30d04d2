"""The one owner of model state. Every load, use, unload and crash goes through here.

All state lives in `Manager.instances` and changes only on the event loop, without awaits
between a check and the change it guards, so there are no locks to get wrong. Loads run in
the manager's own task group: a client that gives up waiting never cancels a load that
others are waiting for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil

from llmd.drivers.base import Driver, LaunchRequest, LaunchSpec, Placement, load_progress

from llmd.daemon.config import DaemonConfig
from llmd.daemon.engines.commands import resolve_command
from llmd.daemon.models.downloads import resolve_cached
from llmd.daemon.errors import EngineStartError, LlmdError, NoRoomError, UnknownModelError
from llmd.daemon.placement.estimate import GPU_OVERHEAD_MIB, launch_estimator
from llmd.daemon.engines.ledger import PidLedger
from llmd.daemon.http.metrics import Metrics
from llmd.daemon.placement.planner import Planner
from llmd.daemon.models.profiles import Profile, ProfileSet
from llmd.daemon.models.pull import fetch_model
from llmd.daemon.placement.scheduler import ModelNeed, NoFit, Plan, RunningModel, plan
from llmd.daemon.engines.supervisor import EngineProcess, free_port, http_ok, process_tree, spawn_engine, tail_lines
from llmd.daemon.http.upstream import Pool

log = logging.getLogger(__name__)

ENGINE_HOST = "127.0.0.1"
IDLE_CHECK_SECONDS = 1.0
RELEASE_POLL_SECONDS = 0.05
# Crash handling: consecutive failed starts or crashes before llmd stops retrying on its own,
# and how long a model must stay up for earlier failures to be forgiven.
MAX_ATTEMPTS = 5
STABLE_SECONDS = 60.0
# An idle engine is probed this often; this many failed probes in a row mark it hung.
HEALTH_INTERVAL = 1.0
HEALTH_TIMEOUT = 0.45
HEALTH_FAILURES = 2
# Before probing again after a failed probe. An engine that dies closes its port a moment before
# it can be reaped: the pause lets the exit be reported as one, not as a hang.
HEALTH_RETRY_PAUSE = 0.05
# A busy engine may answer its probe slowly; it still must answer, or its requests would hang.
BUSY_HEALTH_TIMEOUT = 5.0
# Parking (sleep mode): host RAM kept free beyond what a parked engine holds; what a parked
# engine is taken to keep per card when NVML cannot say (its CUDA context); and how long the
# engine may take to go to sleep (waking is bounded by `[server] ready_timeout`).
HOST_RAM_MARGIN_MIB = 2048
PARKED_DEFAULT_MIB = GPU_OVERHEAD_MIB
PARK_TIMEOUT = 120.0
# Out of memory at load: halve the context and try again, down to this.
MIN_CTX = 256
# How much of the end of a loading engine's log is searched for its progress.
PROGRESS_LOG_LINES = 5
_OOM_MARKERS = ("out of memory", "failed to allocate", "cudamalloc failed", "outofmemoryerror", "cannot allocate memory")


def _engine_client(base_url: str) -> Pool:
    # The proxy's hop to the engine, on the hot path: upstream.Pool rather than httpx (see
    # docs/benchmarks.md). Generation may take minutes: it has no read timeout.
    host, _, port = base_url.removeprefix("http://").rpartition(":")
    return Pool(host, int(port))


async def _close_client(inst: "Instance") -> None:
    client, inst.client = inst.client, None
    if client is not None:
        with anyio.CancelScope(shield=True):
            await client.aclose()


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


def backoff_seconds(failures: int) -> float:
    """Wait before the next attempt after `failures` consecutive failures: 0, 1, 2, 4 ... 30 s."""
    return 0.0 if failures <= 0 else float(min(2 ** (failures - 1), 30))


def looks_like_oom(error: LlmdError) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _OOM_MARKERS)


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    # Parked: the engine process lives on with its weights in host RAM and most of its GPU
    # memory given back; the next request wakes it (see SleepControl).
    SLEEPING = "sleeping"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass
class Load:
    """One attempt to start an engine; every request waiting for the model waits on it."""

    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    error: LlmdError | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass
class Instance:
    profile: Profile
    state: State = State.STOPPED
    engine: EngineProcess | None = None
    placement: Placement | None = None
    load: Load | None = None
    stopped: anyio.Event = field(default_factory=anyio.Event)
    in_flight: int = 0
    # Requests waiting for this model's load; they count as busy, so a model that just
    # became ready is not evicted before its waiting requests reach it.
    waiters: int = 0
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float | None = None
    error: str | None = None
    progress: str = ""
    # Consecutive failed starts or crashes; drives the backoff and the retry limit.
    failures: int = 0
    # Set after an out-of-memory load: the context the next loads use instead of the profile's.
    ctx_override: int | None = None
    spec: LaunchSpec | None = None
    # Set to make the health monitor probe at once (a proxied request just failed).
    probe_now: anyio.Event = field(default_factory=anyio.Event)
    # Pooled keep-alive connections to this engine, for proxied requests; closed before the
    # engine is stopped, so it need not wait for idle clients and no stale connection is reused.
    client: Pool | None = None
    # While parked: MiB per card the sleeping engine still holds. `settled` is cleared while
    # the engine is going to sleep, so nothing wakes or stops it halfway.
    parked: dict[int, int] | None = None
    settled: anyio.Event = field(default_factory=anyio.Event)
    wake_seconds: float | None = None

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def base_url(self) -> str:
        assert self.engine is not None
        return f"http://{ENGINE_HOST}:{self.engine.port}"

    def claimed(self) -> dict[int, int]:
        """MiB per card this instance holds now: less than its placement while parked."""
        if self.state is State.SLEEPING and self.parked is not None:
            return dict(self.parked)
        assert self.placement is not None
        return self.placement.per_card()

    def parked_share(self) -> dict[int, int]:
        """What this engine would keep per card once parked, before it has been measured."""
        assert self.placement is not None
        return {share.index: min(share.vram_mib, PARKED_DEFAULT_MIB) for share in self.placement.gpus}

    def as_running(self, parkable: bool = False) -> RunningModel:
        """This instance as the scheduler sees it. Only a ready model with nobody using or
        awaiting it, or a parked one, can be evicted; a starting, stopping or falling-asleep one
        holds its claim. `parkable`: eviction would park it rather than stop it."""
        assert self.placement is not None
        if self.state is State.READY:
            busy = self.in_flight + self.waiters
        elif self.state is State.SLEEPING and self.settled.is_set():
            busy = 0
        else:
            busy = 1
        policy = self.profile.policy
        return RunningModel(
            name=self.name,
            gpus=self.claimed(),
            in_flight=busy,
            pinned=policy.pinned,
            priority=policy.priority,
            last_used=self.last_used,
            parked_gpus=self.parked_share() if parkable and self.state is State.READY else None,
        )


@dataclass
class Job:
    """A manager action run on behalf of a client that may go away before it ends."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: LlmdError | None = None


class Manager:
    def __init__(self, config: DaemonConfig, drivers: dict[str, Driver], profiles: ProfileSet) -> None:
        self.config = config
        self.drivers = drivers
        self.profiles = profiles
        self.instances: dict[str, Instance] = {}
        self.planner = Planner(config.gpus.simulate, config.server.state_dir, config.gpus.margin_mib)
        self.ledger = PidLedger(config.server.state_dir / "engines.json")
        self.metrics = Metrics(config.metrics.enabled, models=self.status, gpus=self.gpu_report, cards_of=self.model_cards)
        self._tg: anyio.abc.TaskGroup | None = None
        # Set (and replaced) whenever room may have appeared: a model went idle, stopped or failed.
        self._changed = anyio.Event()

    # ----- lifecycle of the manager itself -----

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own every background task until cancelled; then stop every engine."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._unload_idle_forever)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.stop_all()

    def kill_all_now(self) -> None:
        """Synchronous last resort when the event loop is going away."""
        for inst in self.instances.values():
            if inst.engine is not None:
                inst.engine.kill_now()

    def reap_leftovers(self) -> None:
        """Stop engines a previous run of this daemon left behind (after a crash or SIGKILL)."""
        for what in self.ledger.reap_leftovers(str(self.config.server.state_dir)):
            log.warning("stopped an engine left by a previous run: %s", what)

    def autostart(self) -> None:
        """Load every `[policy] autostart = true` profile, in the background."""
        for name, profile in sorted(self.profiles.profiles.items()):
            if profile.policy.autostart:
                log.info("autostart: loading %s", name)
                self.run_job(self.ensure_ready, name)

    def reload(self, config: DaemonConfig, profiles: ProfileSet) -> dict[str, list[str]]:
        """Take new settings and profiles (SIGHUP). Only models whose profile changed are
        restarted; models whose profile is gone or now invalid are stopped."""
        self.config = config
        self.profiles = profiles
        self.planner.margin_mib = config.gpus.margin_mib
        changes: dict[str, list[str]] = {"restarted": [], "stopped": [], "updated": []}
        for name, inst in list(self.instances.items()):
            new = profiles.profiles.get(name)
            running = inst.state in (State.READY, State.STARTING)
            if new is None:
                if running or inst.state is State.SLEEPING:
                    self.run_job(self._unload_instance, inst, "its profile was removed or is invalid")
                    changes["stopped"].append(name)
                continue
            if new.model_dump() == inst.profile.model_dump():
                inst.profile = new
                continue
            inst.profile = new
            inst.ctx_override = None
            inst.failures = 0
            changes["updated"].append(name)
            if running:
                self.run_job(self._restart, name)
                changes["restarted"].append(name)
            elif inst.state is State.SLEEPING:  # parked with the old settings: the next request starts it anew
                self.run_job(self._unload_instance, inst, "its profile changed")
                changes["stopped"].append(name)
        return changes

    async def _restart(self, name: str) -> None:
        await self.unload(name, "its profile changed")
        await self.ensure_ready(name)

    def run_job(self, action: Callable[..., Awaitable[object]], *args: object) -> Job:
        """Run `action(*args)` in the manager's task group; its LlmdError lands in the Job."""
        assert self._tg is not None, "manager is not running"
        job = Job()

        async def runner() -> None:
            try:
                await action(*args)
            except LlmdError as exc:
                job.error = exc
            finally:
                job.done.set()

        self._tg.start_soon(runner)
        return job

    # ----- lookups -----

    def resolve(self, model: str) -> Profile:
        profile = self.profiles.resolve(model)
        if profile is None:
            if model in self.profiles.errors:
                raise UnknownModelError(f"model {model!r} has an invalid profile: {self.profiles.errors[model]}")
            raise UnknownModelError(
                f"model {model!r} does not exist; `llmctl ls` or GET /v1/models lists the served models"
            )
        return profile

    def instance(self, name: str) -> Instance:
        profile = self.resolve(name)
        inst = self.instances.get(profile.name)
        if inst is None:
            inst = self.instances[profile.name] = Instance(profile=profile)
        return inst

    # ----- using a model -----

    async def ensure_ready(self, name: str, explicit: bool = False) -> Instance:
        """Return the model's instance once its engine is ready, starting it if needed.

        Concurrent callers for a cold model share one load. `explicit` (llmctl load) also
        retries a model llmd gave up on after repeated failures.
        """
        inst = self.instance(name)
        while True:
            load = await self.start_loading(name, explicit)
            explicit = False
            if load is None:
                return inst
            inst.waiters += 1
            try:
                await load.done.wait()
            finally:
                inst.waiters -= 1
            if load.error is not None:
                raise load.error

    async def start_loading(self, name: str, explicit: bool = False) -> Load | None:
        """Begin loading the model unless it is loading already; None if it is ready now."""
        inst = self.instance(name)
        while inst.state is State.STOPPING or (inst.state is State.SLEEPING and not inst.settled.is_set()):
            if inst.state is State.STOPPING:
                await inst.stopped.wait()
            else:
                await inst.settled.wait()
        if inst.state is State.READY:
            return None
        if inst.state is State.SLEEPING:
            self._begin_wake(inst)
        if inst.state is State.FAILED:
            if explicit:
                inst.failures = 0
            elif inst.failures >= MAX_ATTEMPTS:
                raise EngineStartError(
                    f"{inst.name!r} failed {inst.failures} times in a row, so llmd stopped retrying. "
                    f"Last error: {inst.error}\nFix the cause, then run `llmctl load {inst.name}`."
                )
        if inst.state in (State.STOPPED, State.FAILED):
            self._begin_load(inst, backoff_seconds(inst.failures))
        assert inst.load is not None
        return inst.load

    async def acquire(self, name: str) -> Instance:
        """Wait until the model is ready and mark it busy: it is never idle-unloaded or evicted
        until `release`. Nothing may await between the readiness check and the count."""
        inst = await self.ensure_ready(name)
        inst.in_flight += 1
        return inst

    def release(self, inst: Instance) -> None:
        inst.in_flight -= 1
        inst.last_used = time.monotonic()
        if inst.in_flight == 0:
            self._notify_changed()

    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # ----- loading -----

    def _begin_load(self, inst: Instance, delay: float = 0.0) -> None:
        assert self._tg is not None, "manager is not running"
        inst.state = State.STARTING
        inst.progress = f"retrying in {delay:.0f}s (attempt {inst.failures + 1})" if delay else "planning"
        inst.load = Load()
        inst.stopped = anyio.Event()
        self._tg.start_soon(self._load, inst, inst.load, delay)

    async def _load(self, inst: Instance, load: Load, delay: float = 0.0) -> None:
        """Run one load to its end, whatever ends it: ready, failed, unloaded, or daemon shutdown."""
        started: list[EngineProcess] = []
        try:
            with load.scope:
                await anyio.sleep(delay)
                await self._start_with_oom_replan(inst, started)
        except NoRoomError as exc:  # not the engine's fault: back to stopped, not failed
            load.error = exc
            await self._abandon_load(inst, load, started, State.STOPPED, None)
            return
        except LlmdError as exc:
            load.error = exc
        except Exception as exc:  # a driver bug must fail this load, not the daemon
            log.exception("loading %s failed", inst.name)
            load.error = EngineStartError(f"loading {inst.name!r} failed: {exc!r}")
        except BaseException:  # the daemon is shutting down: clean up, then let it go on
            with anyio.CancelScope(shield=True):
                await self._abandon_load(inst, load, started, State.STOPPED, "llmd is shutting down")
            raise
        if load.scope.cancelled_caught:
            await self._abandon_load(inst, load, started, State.STOPPED, "it was unloaded while starting")
        elif load.error is not None:
            inst.failures += 1
            await self._abandon_load(inst, load, started, State.FAILED, None)
        else:
            engine = started[-1]
            inst.state = State.READY
            inst.last_used = time.monotonic()
            inst.load_seconds = inst.last_used - load.started
            inst.progress = ""
            inst.client = _engine_client(inst.base_url)
            log.info("%s ready in %.2fs", inst.name, inst.load_seconds)
            self.metrics.load_finished(inst.name, inst.load_seconds, ok=True)
            self._learn_usage(inst, engine)
            assert self._tg is not None
            self._tg.start_soon(self._supervise, inst, engine)
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
                        await engine.stop(self.config.server.stop_grace)
                started.clear()
                self._clear_claim(inst)
                inst.ctx_override = ctx // 2
                log.warning("%s ran out of memory with ctx %d; planning again with ctx %d", inst.name, ctx, ctx // 2)

    def _effective_profile(self, inst: Instance) -> Profile:
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
        profile = self._effective_profile(inst)
        driver = self.drivers[profile.engine]
        model_path = await self._fetch_model(inst, profile)
        command = resolve_command(self.config, driver)
        await self._reserve_placement(inst, profile, model_path)
        placement = inst.placement
        assert placement is not None
        if profile is not inst.profile:
            placement = dc_replace(placement, reason=f"{placement.reason}; ctx lowered to {profile.launch.ctx} after running out of memory")
            inst.placement = placement
        port = free_port(ENGINE_HOST, self._ports_in_use())
        request = LaunchRequest(
            profile=profile,
            placement=placement,
            model_path=model_path,
            host=ENGINE_HOST,
            port=port,
            command=command,
            env=dict(self.config.engine(driver.name).env),
            # The estimate just planned with, from the planner's cache.
            estimator=launch_estimator(profile, model_path, self.planner.estimate),
        )
        spec = driver.launch(request)
        engine = spawn_engine(profile.name, spec, port, self._log_path(profile.name), str(self.config.server.state_dir))
        started.append(engine)
        self.ledger.add(engine)
        inst.engine, inst.spec = engine, spec
        self.planner.claim(profile.name, engine.pid, placement.per_card())
        inst.progress = f"waiting for {profile.engine} (pid {engine.pid}) to load the model"
        log.info("starting %s: pid %d port %d, %s", profile.name, engine.pid, port, placement.reason or "placed")
        await engine.wait_ready(spec, self.config.server.ready_timeout)

    async def _reserve_placement(self, inst: Instance, profile: Profile, model_path: Path) -> None:
        """Find room for `inst`, waiting up to queue_timeout for busy models to finish, and
        evicting idle ones the plan names. The placement is claimed (set on the instance)
        before any await, so concurrent loads never plan into the same memory."""
        deadline = time.monotonic() + self.config.server.queue_timeout
        while True:
            running = self._running_except(inst)
            result, _ = self.planner.place(profile, model_path, running)
            if isinstance(result, Plan):
                inst.placement = result.placement
                await self._make_room(inst, result, running)
                return
            if not self._room_may_appear(inst):
                raise LlmdError(f"{inst.name!r} cannot be placed: {result.reason}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoRoomError(
                    f"no room for {inst.name!r} after waiting {self.config.server.queue_timeout:.0f}s "
                    f"for busy models: {result.reason}",
                    retry_after=10,
                )
            inst.progress = f"waiting for room: {result.reason}"
            with anyio.move_on_after(remaining):
                await self._changed.wait()

    def _running_except(self, inst: Instance) -> list[RunningModel]:
        running = []
        budget: int | None = None  # host RAM for parking, read once and only if some model can park
        for other in self.instances.values():
            if other is inst or other.placement is None:
                continue
            parkable = False
            need = self._park_ram(other)
            if need:
                budget = self._parking_budget_mib() if budget is None else budget
                # One budget for all: a plan that evicts several never parks more than RAM holds.
                parkable = self._can_park(other, budget)
                if parkable:
                    budget -= need
            running.append(other.as_running(parkable=parkable))
        return running

    @staticmethod
    def _park_ram(inst: Instance) -> int:
        """MiB of host RAM parking this model would take; 0 when it cannot be parked (its engine
        cannot sleep, it is not ready, it runs on the CPU, or its weights' size is unknown)."""
        sleep = inst.spec.sleep if inst.spec is not None else None
        if inst.state is not State.READY or sleep is None or inst.placement is None or inst.placement.cpu_only:
            return 0
        return max(0, sleep.host_ram_mib)

    def _parking_budget_mib(self) -> int:
        """Host RAM that parking may take now: what is free beyond the margin, less the weights
        of engines still falling asleep (not yet moved out of VRAM)."""
        available = psutil.virtual_memory().available // (1024 * 1024) - HOST_RAM_MARGIN_MIB
        pending = sum(
            other.spec.sleep.host_ram_mib
            for other in self.instances.values()
            if other.state is State.SLEEPING and not other.settled.is_set() and other.spec and other.spec.sleep
        )
        return available - pending

    def _can_park(self, inst: Instance, budget_mib: int | None = None) -> bool:
        """Whether evicting this model would park it: its engine can sleep, it is on GPUs, and
        `budget_mib` (default: what host RAM has for parking now) holds the weights it keeps."""
        need = self._park_ram(inst)
        if not need:
            return False
        return need <= (self._parking_budget_mib() if budget_mib is None else budget_mib)

    async def _make_room(self, inst: Instance, result: Plan, running: list[RunningModel]) -> None:
        """Evict what `result` names: park the victims the plan counted as parked, stop the rest.
        Each victim changes state before the first await, so no request is routed to it."""
        parks = {model.name for model in running if model.parked_gpus is not None}
        to_park = [self.instances[name] for name in result.evict if name in parks]
        to_stop = [self.instances[name] for name in result.evict if name not in parks]
        for victim in to_park:
            self._begin_park(victim)
        for victim in to_stop:
            self._begin_stop(victim)
        if not result.evict:
            return
        inst.progress = f"evicting {', '.join(result.evict)}"
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._evict, to_stop)
            for victim in to_park:
                tg.start_soon(self._park, victim)

    def _room_may_appear(self, inst: Instance) -> bool:
        """Whether waiting can help: some other model is busy, starting or stopping now."""
        return any(
            not other.as_running().evictable and not other.profile.policy.pinned
            for other in self.instances.values()
            if other is not inst and other.placement is not None
        )

    async def _evict(self, victims: list[Instance]) -> None:
        """Stop the victims together, then wait until the GPUs show their memory released."""
        if not victims:
            return
        started = time.monotonic()
        pids: set[int] = set()
        for victim in victims:
            if victim.engine is not None:
                pids |= process_tree(victim.engine.pid)
        async with anyio.create_task_group() as tg:
            for victim in victims:
                tg.start_soon(self._finish_stop, victim, "evicted to make room")
        if not await self.wait_released(pids):
            log.warning("GPU memory of evicted engines (pids %s) was not released after %.0fs",
                        sorted(pids), self.config.gpus.release_timeout)
        self.metrics.evicted([victim.name for victim in victims], time.monotonic() - started)

    async def wait_released(self, pids: set[int]) -> bool:
        """Wait until the GPUs show no memory held by `pids` (a driver may free it after the
        process is gone); False if that took longer than `[gpus] release_timeout`."""
        with anyio.move_on_after(self.config.gpus.release_timeout):
            while self.planner.usage_of(pids):
                await anyio.sleep(RELEASE_POLL_SECONDS)
            return True
        return False

    def _learn_usage(self, inst: Instance, engine: EngineProcess) -> None:
        placement = inst.placement
        if placement is None or placement.cpu_only or placement.gpu_layers is not None or placement.cpu_moe_layers:
            return  # only a whole-model placement gives a total worth reusing
        try:
            self.planner.learn(inst.profile, self._local_model_path(inst.profile), process_tree(engine.pid))
        except (LlmdError, OSError) as exc:
            log.warning("could not measure %s's GPU memory: %s", inst.name, exc)

    async def _abandon_load(
        self, inst: Instance, load: Load, started: list[EngineProcess], state: State, why: str | None
    ) -> None:
        if load.error is None:
            load.error = EngineStartError(f"{inst.name!r} did not start: {why}")
        log.warning("load of %s ended: %s", inst.name, load.error)
        self.metrics.load_finished(inst.name, time.monotonic() - load.started, ok=False)
        await _close_client(inst)  # set only when a parked engine failed to wake
        with anyio.CancelScope(shield=True):
            for engine in started:
                await engine.stop(self.config.server.stop_grace)
        self._clear(inst, state)
        inst.error = str(load.error) if state is State.FAILED else None
        load.done.set()

    def _clear(self, inst: Instance, state: State) -> None:
        """The instance holds nothing any more: no engine, no claim."""
        inst.engine = None
        inst.spec = None
        inst.parked = None
        inst.state = state
        inst.progress = ""
        self._clear_claim(inst)
        self.ledger.remove(inst.name)
        inst.stopped.set()

    def _clear_claim(self, inst: Instance) -> None:
        inst.placement = None
        self.planner.release(inst.name)
        self._notify_changed()

    def _local_model_path(self, profile: Profile) -> Path:
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

    async def _fetch_model(self, inst: Instance, profile: Profile, update: bool = False) -> Path:
        """The model on disk, downloading it first if needed, with progress in `ps` and `llmctl load`."""
        if profile.model.path is not None:
            return self._local_model_path(profile)

        def show(line: str) -> None:
            inst.progress = f"downloading {line}"

        try:
            return await fetch_model(profile.model, show, update=update)
        finally:
            inst.progress = ""

    async def pull(self, name: str) -> Path:
        """Download (or update) a model's files without loading it."""
        inst = self.instance(name)
        return await self._fetch_model(inst, inst.profile, update=True)

    def _ports_in_use(self) -> set[int]:
        return {inst.engine.port for inst in self.instances.values() if inst.engine is not None}

    def _log_path(self, name: str) -> Path:
        return self.config.logs_dir / f"{name}.log"

    async def _supervise(self, inst: Instance, engine: EngineProcess) -> None:
        """Watch a ready engine until it stops: an exit is seen at once (pidfd), a hang within
        about HEALTH_INTERVAL × HEALTH_FAILURES + HEALTH_TIMEOUT while idle."""
        hung: list[str] = []
        async with anyio.create_task_group() as tg:

            async def exited() -> None:
                await engine.wait_exit()
                tg.cancel_scope.cancel()

            tg.start_soon(exited)
            tg.start_soon(self._probe_health, inst, engine, hung)
        if inst.engine is not engine or inst.state not in (State.READY, State.SLEEPING):
            return  # an ordinary stop, or a wake that will see the engine gone
        code = engine.returncode
        tail = "\n".join(engine.log_tail())
        what = hung[0] if hung else f"exited unexpectedly with code {code}"
        if inst.state is State.SLEEPING:
            # Nobody was using it: no restart, the next request starts it afresh.
            log.warning("%s died while parked (%s)", inst.name, what)
            self._begin_stop(inst)
            await self._finish_stop(inst, "it died while parked")
            return
        inst.state = State.STOPPING
        await _close_client(inst)
        with anyio.CancelScope(shield=True):
            await engine.stop(grace=1.0)  # the leader is gone or hung: nothing it forked may stay
        self._clear(inst, State.FAILED)
        inst.error = f"engine {what}. Last lines of {engine.log_path}:\n{tail}"
        log.error("%s: %s", inst.name, inst.error)
        self._after_crash(inst, engine)

    def _after_crash(self, inst: Instance, engine: EngineProcess) -> None:
        """Restart with backoff, unless it keeps failing."""
        if time.monotonic() - engine.started_monotonic > STABLE_SECONDS:
            inst.failures = 0  # it ran fine for a while: this is a new problem, not a crash loop
        inst.failures += 1
        if inst.failures >= MAX_ATTEMPTS:
            log.error("%s failed %d times in a row; not restarting it on its own", inst.name, inst.failures)
            return
        delay = backoff_seconds(inst.failures)
        log.info("restarting %s in %.0fs (attempt %d of %d)", inst.name, delay, inst.failures + 1, MAX_ATTEMPTS)
        self._begin_load(inst, delay)

    async def _probe_health(self, inst: Instance, engine: EngineProcess, hung: list[str]) -> None:
        assert inst.spec is not None
        url = f"http://{ENGINE_HOST}:{engine.port}{inst.spec.readiness.path}"
        failed = 0
        while True:
            if not failed:
                with anyio.move_on_after(HEALTH_INTERVAL):
                    await inst.probe_now.wait()
            else:  # after a failed probe, probe again almost at once
                await anyio.sleep(HEALTH_RETRY_PAUSE)
            if inst.probe_now.is_set():
                inst.probe_now = anyio.Event()
            if inst.state is State.SLEEPING:
                continue  # asleep or falling asleep: an exit is still seen at once, through the pidfd
            # Busy, or waking up (still parked): it may answer slowly, but it must answer.
            timeout = BUSY_HEALTH_TIMEOUT if inst.in_flight or inst.parked is not None else HEALTH_TIMEOUT
            ok = await http_ok(engine.port, inst.spec.readiness.path, timeout)
            if not ok and engine.returncode is not None:
                return  # it exited: the exit watcher reports that, with its code
            failed = 0 if ok else failed + 1
            if failed >= HEALTH_FAILURES:
                hung.append(f"stopped answering its health probe ({url})")
                log.error("%s (pid %d) stopped answering %s; killing it", inst.name, engine.pid, url)
                await engine.stop(grace=0.1)  # a hung process will not act on SIGTERM
                return

    def engine_failed(self, inst: Instance) -> None:
        """A proxied request to this engine failed: check its health now, not at the next tick."""
        inst.probe_now.set()

    # ----- unloading -----

    async def unload(self, name: str, reason: str = "requested") -> bool:
        """Stop the model's engine. Returns False if it was not running."""
        return await self._unload_instance(self.instance(name), reason)

    async def _unload_instance(self, inst: Instance, reason: str) -> bool:
        if inst.state is State.STARTING and inst.load is not None:
            inst.load.scope.cancel()
            await inst.load.done.wait()
            return True
        if inst.state is State.STOPPING:
            await inst.stopped.wait()
            return True
        if inst.state is State.SLEEPING and not inst.settled.is_set():
            await inst.settled.wait()  # let it finish falling asleep, then stop it
            return await self._unload_instance(inst, reason)
        if inst.state not in (State.READY, State.SLEEPING) or inst.engine is None:
            return False
        self._begin_stop(inst)
        await self._finish_stop(inst, reason)
        return True

    def _begin_stop(self, inst: Instance) -> None:
        """Mark a ready (or parked) model as stopping, synchronously, so no new request is routed to it."""
        assert inst.state in (State.READY, State.SLEEPING)
        inst.state = State.STOPPING
        inst.stopped = anyio.Event()
        inst.settled.set()  # a wake waiting for a park to end sees STOPPING instead

    async def _finish_stop(self, inst: Instance, reason: str) -> None:
        engine = inst.engine
        assert engine is not None
        log.info("stopping %s (%s)", inst.name, reason)
        await _close_client(inst)
        with anyio.CancelScope(shield=True):
            code = await engine.stop(self.config.server.stop_grace)
        log.info("%s stopped (exit code %s)", inst.name, code)
        self._clear(inst, State.STOPPED)

    # ----- parking (sleep mode) -----

    def _begin_park(self, inst: Instance) -> None:
        """Mark a ready model as going to sleep, synchronously: requests for it wait for the
        park to end, then wake it."""
        assert inst.state is State.READY
        inst.state = State.SLEEPING
        inst.settled = anyio.Event()
        inst.progress = "going to sleep"

    async def _park(self, inst: Instance) -> None:
        """Put the engine to sleep; its claim shrinks to what it still holds. If it will not
        sleep, stop it: either way, its memory is given back."""
        engine, spec = inst.engine, inst.spec
        assert engine is not None and spec is not None and spec.sleep is not None
        log.info("parking %s (pid %d): %s", inst.name, engine.pid, spec.sleep.sleep_path)
        try:
            problem = await _post(engine.port, spec.sleep.sleep_path, PARK_TIMEOUT)
        except BaseException:
            # The load that evicted it was cancelled (unloaded, or llmd is stopping): stop the
            # engine halfway to sleep, so that nothing waits for this park to end.
            if inst.engine is engine and inst.state is State.SLEEPING:
                self._begin_stop(inst)
                with anyio.CancelScope(shield=True):
                    await self._finish_stop(inst, "its park was interrupted")
            raise
        if inst.engine is not engine or inst.state is not State.SLEEPING:
            return  # stopped or crashed meanwhile
        if problem is not None:
            log.warning("%s did not go to sleep (%s); stopping it instead", inst.name, problem)
            self._begin_stop(inst)
            await self._evict([inst])
            return
        inst.parked = self._kept_while_parked(inst, engine)
        self.planner.claim(inst.name, engine.pid, inst.parked)
        inst.progress = ""
        inst.settled.set()
        self.metrics.parked(inst.name)
        log.info("%s is asleep, keeping %s MiB per GPU", inst.name, inst.parked)
        self._notify_changed()

    def _kept_while_parked(self, inst: Instance, engine: EngineProcess) -> dict[int, int]:
        """MiB per card the sleeping engine still holds: measured through NVML where it can
        say, else the size of a CUDA context."""
        default = inst.parked_share()
        if self.planner.simulated:
            return default
        measured = self.planner.usage_of(process_tree(engine.pid))
        placed = inst.placement.per_card()
        return {index: min(placed[index], measured[index]) if measured.get(index) else mib for index, mib in default.items()}

    def _begin_wake(self, inst: Instance) -> None:
        assert self._tg is not None, "manager is not running"
        assert inst.state is State.SLEEPING
        inst.state = State.STARTING  # holds its whole placement again from here on
        inst.progress = "waking up"
        inst.load = Load()
        inst.stopped = anyio.Event()
        self._tg.start_soon(self._wake, inst, inst.load)

    async def _wake(self, inst: Instance, load: Load) -> None:
        """Wake a parked engine on its own cards. If they cannot take it back now, or it does
        not wake, stop it and start it afresh, wherever the scheduler finds room."""
        engine, spec = inst.engine, inst.spec
        assert engine is not None and spec is not None and spec.sleep is not None
        problem: str | None = "it was unloaded"
        try:
            with load.scope:
                problem = await self._room_to_wake(inst)
                if problem is None:
                    self.planner.claim(inst.name, engine.pid, inst.placement.per_card())
                    problem = await _post(engine.port, spec.sleep.wake_path, self.config.server.ready_timeout)
        except Exception as exc:  # a bug here must not take the daemon down: start it afresh instead
            log.exception("waking %s failed", inst.name)
            problem = f"waking it failed: {exc!r}"
        except BaseException:  # the daemon is shutting down
            with anyio.CancelScope(shield=True):
                await self._abandon_load(inst, load, [engine], State.STOPPED, "llmd is shutting down")
            raise
        if load.scope.cancelled_caught:
            await self._abandon_load(inst, load, [engine], State.STOPPED, "it was unloaded while waking")
            return
        if problem is None and inst.engine is engine:
            inst.parked = None
            inst.state = State.READY
            inst.last_used = time.monotonic()
            inst.wake_seconds = inst.last_used - load.started
            inst.progress = ""
            self.metrics.woke(inst.name, inst.wake_seconds)
            log.info("%s woke up in %.2fs", inst.name, inst.wake_seconds)
            load.done.set()
            return
        log.warning("%s could not wake (%s); starting it afresh", inst.name, problem)
        inst.progress = "starting afresh"
        await _close_client(inst)
        with anyio.CancelScope(shield=True):
            await engine.stop(self.config.server.stop_grace)
        self._clear(inst, State.STARTING)
        inst.stopped = anyio.Event()
        await self._load(inst, load)

    async def _room_to_wake(self, inst: Instance) -> str | None:
        """Make room for the parked engine's memory on the cards it sleeps on, evicting idle
        models there; None when done, else why there is no room."""
        assert inst.placement is not None and inst.parked is not None
        placed = inst.placement.per_card()
        extra = max(placed[index] - inst.parked.get(index, 0) for index in placed)
        width = len(placed)
        need = ModelNeed.fixed(inst.name, extra * width, tensor_parallel=width, allowed_gpus=tuple(sorted(placed)))
        # What it keeps while asleep stays taken, by a model that cannot be evicted for itself.
        itself = RunningModel(f"{inst.name} (asleep)", dict(inst.parked), in_flight=1)
        running = self._running_except(inst)
        result = plan(need, self.planner.snapshot(), [*running, itself], self.planner.margin_mib)
        if isinstance(result, NoFit):
            return result.reason
        await self._make_room(inst, result, running)
        inst.progress = "waking up"
        return None

    async def replace(self, name: str, old: str) -> None:
        """Swap `old` for `name`. When both fit, the new engine starts before the old one stops,
        so clients never find neither; otherwise the old one makes room first."""
        started = time.monotonic()
        old_inst = self.instance(old)
        new_inst = self.instance(name)
        if old_inst is new_inst:
            await self.ensure_ready(name)
            return
        if old_inst.state is State.READY and old_inst.placement is not None and new_inst.state is not State.READY:
            model_path = await self._fetch_model(new_inst, new_inst.profile)
            result, _ = self.planner.place(new_inst.profile, model_path, self._running_except(new_inst))
            if not (isinstance(result, Plan) and not result.evict):
                await self.unload(old, f"replaced by {name}")
        await self.ensure_ready(name)
        await self.unload(old, f"replaced by {name}")
        self.metrics.swap_finished(name, time.monotonic() - started)

    async def stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for name, inst in list(self.instances.items()):
                if inst.state in (State.READY, State.STARTING, State.STOPPING, State.SLEEPING):
                    tg.start_soon(self._unload_instance, inst, "shutdown")

    async def _unload_idle_forever(self) -> None:
        while True:
            await anyio.sleep(IDLE_CHECK_SECONDS)
            now = time.monotonic()
            for name, inst in list(self.instances.items()):
                ttl = inst.profile.policy.ttl_seconds
                if (
                    ttl is not None
                    # A parked model past its TTL is stopped too, giving back its host RAM.
                    and (inst.state is State.READY or (inst.state is State.SLEEPING and inst.settled.is_set()))
                    and inst.in_flight == 0
                    and now - inst.last_used >= ttl
                ):
                    assert self._tg is not None
                    self._tg.start_soon(self._unload_instance, inst, f"idle for {ttl:.0f}s")

    # ----- reporting -----

    def status(self) -> list[dict[str, Any]]:
        """What `llmctl ps` shows: one entry per model that has run since startup."""
        now = time.monotonic()
        rows = []
        for name, inst in sorted(self.instances.items()):
            engine = inst.engine
            placement = inst.placement if engine is not None else None
            rows.append(
                {
                    "model": name,
                    "engine": inst.profile.engine,
                    "state": inst.state.value,
                    "pid": engine.pid if engine else None,
                    "port": engine.port if engine else None,
                    "uptime_s": round(now - engine.started_monotonic, 1) if engine else None,
                    "idle_s": self._idle_seconds(inst, now),
                    "in_flight": inst.in_flight,
                    "argv": engine.argv if engine else None,
                    "gpus": [share.index for share in placement.gpus] if placement else [],
                    "vram_mib": sum(inst.claimed().values()) if placement else 0,
                    # Parked engines keep their weights in host RAM instead.
                    "host_ram_mib": inst.spec.sleep.host_ram_mib if inst.parked is not None and inst.spec and inst.spec.sleep else 0,
                    "sleep_mode": bool(inst.spec is not None and inst.spec.sleep is not None),
                    "gpu_layers": placement.gpu_layers if placement else None,
                    "cpu_moe_layers": placement.cpu_moe_layers if placement else 0,
                    "placement": placement.reason if placement else None,
                    "load_s": round(inst.load_seconds, 3) if inst.load_seconds is not None and engine else None,
                    "wake_s": round(inst.wake_seconds, 3) if inst.wake_seconds is not None and engine else None,
                    "progress": self.progress_of(inst) or None,
                    "error": inst.error,
                    "log": str(self._log_path(name)),
                }
            )
        return rows

    def progress_of(self, inst: Instance, log_tail: list[str] | None = None) -> str:
        """What the model is doing now; while its engine loads, what the engine's log says of it.

        `log_tail`: the end of the engine's log when the caller has just read it, so that it is
        not read again."""
        if inst.state is State.STARTING and inst.engine is not None and inst.parked is None:
            driver = self.drivers.get(inst.profile.engine)
            if driver is not None:
                lines = log_tail if log_tail is not None else inst.engine.log_tail(PROGRESS_LOG_LINES)
                for line in reversed(lines[-PROGRESS_LOG_LINES:]):
                    said = load_progress(driver, line)
                    if said:
                        return f"{inst.progress}: {said}"
        return inst.progress

    def load_report(self, inst: Instance) -> tuple[str, str]:
        """(what the model is doing, the last line of its engine's log) for a load's progress
        events, from one read of the log."""
        tail = inst.engine.log_tail(PROGRESS_LOG_LINES) if inst.engine is not None else []
        return self.progress_of(inst, tail), (tail[-1] if tail else "")

    def plan_preview(self, name: str) -> dict[str, Any]:
        """What loading `name` now would do, without doing it: for `llmctl plan`."""
        inst = self.instance(name)
        result, details = self.planner.place(inst.profile, self._local_model_path(inst.profile), self._running_except(inst))
        report: dict[str, Any] = {"model": inst.name, "state": inst.state.value, **details}
        if isinstance(result, NoFit):
            report.update({"fits": False, "reason": result.reason})
            return report
        placement = result.placement
        report.update({
            "fits": True,
            "reason": result.reason,
            "gpus": [{"index": s.index, "uuid": s.uuid, "vram_mib": s.vram_mib} for s in placement.gpus],
            "gpu_layers": placement.gpu_layers,
            "cpu_moe_layers": placement.cpu_moe_layers,
            "ctx": placement.ctx,
            "evict": list(result.evict),
        })
        return report

    def gpu_report(self) -> dict[str, Any]:
        """Each card with its memory, which of llmd's models claims how much of it, and its
        telemetry (temperature, power, ...: None where the card gives no reading)."""
        cards = []
        claims: dict[int, list[dict[str, Any]]] = {}
        ours: set[int] = set()
        for inst in self.instances.values():
            if inst.placement is None:
                continue
            for index, mib in inst.claimed().items():
                claims.setdefault(index, []).append({"model": inst.name, "vram_mib": mib, "state": inst.state.value})
            if inst.engine is not None:
                ours |= process_tree(inst.engine.pid)
        for gpu in self.planner.snapshot(telemetry=True):
            foreign = sum(p.used_mib for p in gpu.processes if p.pid not in ours)
            cards.append({
                "index": gpu.index, "uuid": gpu.uuid, "name": gpu.name,
                "total_mib": gpu.total_mib, "free_mib": gpu.free_mib, "used_mib": gpu.used_mib,
                "models": sorted(claims.get(gpu.index, []), key=lambda c: c["model"]),
                "foreign_mib": 0 if self.planner.simulated else foreign,
                **gpu.telemetry.as_dict(),
            })
        return {"note": self.planner.inventory.note, "gpus": cards}

    def model_cards(self, name: str) -> list[int]:
        """The cards (by index) the model `name` is placed on now; none when it is not placed.
        Called for every reply that generated tokens (the metrics' energy per token): no I/O."""
        inst = self.instances.get(name)
        if inst is None or inst.placement is None:
            return []
        return [share.index for share in inst.placement.gpus]

    @staticmethod
    def _idle_seconds(inst: Instance, now: float) -> float | None:
        if inst.state not in (State.READY, State.SLEEPING):
            return None
        return 0.0 if inst.in_flight else round(now - inst.last_used, 1)

    def log_tail(self, name: str, lines: int) -> list[str]:
        return tail_lines(self._log_path(self.resolve(name).name), lines)

    def log_path(self, name: str) -> Path:
        return self._log_path(self.resolve(name).name)
