"""The one owner of model state. Every load, use, unload and crash goes through here.

All state lives in `Manager.instances` and changes only on the event loop, without awaits
between a check and the change it guards, so there are no locks to get wrong. Loads run in
the manager's own task group: a client that gives up waiting never cancels a load that
others are waiting for. The load path, parking, supervision and the reports are in modules of
their own (see `llmd.daemon.manager`); they work on the instances this class holds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from llmd.drivers.base import Driver

from llmd.daemon.config import DaemonConfig
from llmd.daemon.engines.ledger import PidLedger
from llmd.daemon.errors import EngineStartError, LlmdError, NoRoomError, QueueFullError, UnknownModelError
from llmd.daemon.http.metrics import Metrics
from llmd.daemon.manager import reports
from llmd.daemon.manager.kv_persist import KvPersist
from llmd.daemon.manager.admission import limits_for
from llmd.daemon.manager.loading import Loader
from llmd.daemon.manager.parking import Parking
from llmd.daemon.manager.profile_changes import Change, aliases_reach_engine, classify
from llmd.daemon.manager.state import MAX_ATTEMPTS, Instance, Job, Load, State, backoff_seconds, close_client, engine_log_path
from llmd.daemon.manager.remote_devices import RemoteDeviceWatch
from llmd.daemon.manager.supervision import Supervision
from llmd.daemon.models.names import unknown_model_message
from llmd.daemon.models.profiles import Profile, ProfileSet
from llmd.daemon.placement.planner import Planner
from llmd.daemon.placement.scheduler import Plan

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 1.0


class Manager:
    def __init__(self, config: DaemonConfig, drivers: dict[str, Driver], profiles: ProfileSet) -> None:
        self.config = config
        self.drivers = drivers
        self.profiles = profiles
        self.instances: dict[str, Instance] = {}
        self.planner = Planner(config.gpus.simulate, config.server.state_dir, config.gpus.margin_mib, drivers,
                               rpc_devices=config.gpus.rpc)
        self.ledger = PidLedger(config.server.state_dir / "engines.json")
        self.metrics = Metrics(config.metrics.enabled, models=self.status, gpus=self.gpu_report, cards_of=self.model_cards)
        # The parts of the work that have modules of their own; they change `instances` only
        # through this manager's rules.
        self.loader = Loader(self)
        self.parking = Parking(self)
        self.supervision = Supervision(self)
        # Whether each device of another machine answers (`[[gpus.rpc]]`).
        self.remote_devices = RemoteDeviceWatch(self)
        # Prompt caches kept across stops, for profiles with `[policy] persist_kv`.
        self.kv = KvPersist(self)
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
                # The devices of other machines are looked at once before the first load plans.
                await self.remote_devices.check_all()
                tg.start_soon(self.remote_devices.watch_forever)
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.stop_all()

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """Where background work (loads, wakes, engine watches) runs: only while `run` runs."""
        assert self._tg is not None, "manager is not running"
        return self._tg

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
        """Take new settings and profiles (SIGHUP), keeping what works. Returns the names of
        the profiles `added`, and of the models `restarted` (their engine settings changed),
        `updated` (changed, applied without a restart: see `profile_changes`), `stopped` (parked
        with settings that changed), `kept` and `removed`.

        A running model whose profile is now invalid is `kept` on its last good version, with
        the error shown by `ls` and `ps`. A model whose profile was deleted is stopped and
        forgotten, so that it leaves `ps` and the metrics."""
        old = self.profiles
        self.config = config
        self.profiles = profiles
        self.planner.margin_mib = config.gpus.margin_mib
        changes: dict[str, list[str]] = {
            "added": sorted(name for name in profiles.profiles if name not in old.profiles),
            "restarted": [], "updated": [], "stopped": [], "kept": [], "removed": [],
        }
        for name in sorted(set(old.profiles) | set(self.instances)):
            new = profiles.profiles.get(name)
            error = profiles.errors.get(name) if new is None else None
            inst = self.instances.get(name)
            if inst is None:  # never used since llmd started: nothing runs
                if new is None and error is None:
                    changes["removed"].append(name)
                elif new is not None and new.model_dump() != old.profiles[name].model_dump():
                    changes["updated"].append(name)
                continue
            inst.profile_error = error
            if new is not None:
                self._take_profile(inst, new, changes)
            elif error is None:
                self.run_job(self._forget, inst, "its profile was removed")
                changes["removed"].append(name)
            elif inst.state in (State.READY, State.STARTING, State.SLEEPING):
                profiles.keep_last_good(inst.profile, old.sources.get(name))
                log.error("%s keeps running on its last good profile until the file is fixed: %s", name, error)
                changes["kept"].append(name)
        return changes

    def _take_profile(self, inst: Instance, new: Profile, changes: dict[str, list[str]]) -> None:
        """Give `inst` its edited profile `new`, restarting its engine only if the engine would
        be started differently now (see `profile_changes`)."""
        driver = self.drivers.get(new.engine)

        def reach(aliases: Sequence[str]) -> bool:
            return driver is None or aliases_reach_engine(driver, inst.request, inst.spec, aliases)

        change = classify(inst.profile, new, reach)
        inst.profile = new
        if change is Change.NONE:
            return
        if change is Change.IN_PLACE:
            changes["updated"].append(inst.name)
            return
        # The engine settings changed: the next start begins afresh, without the old ones' failures.
        inst.ctx_override = None
        inst.failures = 0
        if inst.state in (State.READY, State.STARTING):
            self.run_job(self._restart, inst.name)
            changes["restarted"].append(inst.name)
        elif inst.state is State.SLEEPING:  # parked with the old settings: the next request starts it anew
            self.run_job(self._unload_instance, inst, "its profile changed")
            changes["stopped"].append(inst.name)
        else:
            changes["updated"].append(inst.name)

    async def _restart(self, name: str) -> None:
        await self.unload(name, "its profile changed")
        await self.ensure_ready(name)

    async def _forget(self, inst: Instance, reason: str) -> None:
        """Stop `inst` and drop it, unless a profile of its name came back meanwhile."""
        await self._unload_instance(inst, reason)
        gone = inst.state in (State.STOPPED, State.FAILED)
        if gone and self.instances.get(inst.name) is inst and inst.name not in self.profiles.profiles:
            del self.instances[inst.name]

    def run_job(self, action: Callable[..., Awaitable[object]], *args: object) -> Job:
        """Run `action(*args)` in the manager's task group; its error lands in the Job.

        Any exception, not only an LlmdError: one raised into the task group would end the
        daemon. An unexpected one is logged with its traceback and reported to the caller as
        a fault of llmd's own."""
        assert self._tg is not None, "manager is not running"
        job = Job()

        async def runner() -> None:
            try:
                await action(*args)
            except LlmdError as exc:
                job.error = exc
            except Exception as exc:
                what = getattr(action, "__name__", "a background job").lstrip("_")
                model = next((arg for arg in args if isinstance(arg, str)), None)
                what += f" {model!r}" if model is not None else ""
                log.exception("%s failed", what)
                job.error = LlmdError(f"{what} failed on an internal error of llmd ({type(exc).__name__}); "
                                      "the daemon's log has the details")
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
            raise UnknownModelError(unknown_model_message(model, [*self.profiles.profiles, *self.profiles.aliases]))
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
            self.parking.begin_wake(inst)
        if inst.state is State.FAILED:
            if explicit:
                inst.failures = 0
            elif inst.failures >= MAX_ATTEMPTS:
                raise EngineStartError(
                    f"{inst.name!r} failed {inst.failures} times in a row, so llmd stopped retrying. "
                    f"Last error: {inst.error}\nFix the cause, then run `llmctl load {inst.name}`."
                )
        if inst.state in (State.STOPPED, State.FAILED):
            self.loader.begin_load(inst, backoff_seconds(inst.failures))
        assert inst.load is not None
        return inst.load

    async def acquire(self, name: str) -> Instance:
        """Take a slot on the model (waiting in its queue if all are taken), wait until the
        model is ready and mark it busy: it is never idle-unloaded or evicted until `release`.

        Raises QueueFullError at once when the model's queue is full, and NoRoomError when no
        slot came within queue_timeout (see `admission`). Nothing may await between the
        readiness check and the count."""
        inst = self.instance(name)
        gate = inst.gate
        gate.configure(*limits_for(inst.profile))
        try:
            ticket = gate.enter()
        except QueueFullError:
            self.metrics.queue_refused(inst.name, "full")
            raise
        try:
            timeout = self.config.server.queue_timeout
            if not await gate.wait(ticket, timeout):
                self.metrics.queue_refused(inst.name, "timeout")
                raise NoRoomError(
                    f"no free slot on {inst.name!r} after waiting {timeout:.0f}s in its queue "
                    f"({gate.active} running, max_concurrency = {gate.limit}); try again shortly",
                    retry_after=gate.retry_after(),
                )
            await self.ensure_ready(inst.name)
        except BaseException:  # the slot (or queue place) is given back whatever ends the wait
            gate.withdraw(ticket)
            self._slot_freed(inst)
            raise
        inst.in_flight += 1
        return inst

    def release(self, inst: Instance) -> None:
        """The request is done with the engine: its slot goes to the next request queued for
        the model, in this same call, so the model never looks idle in between."""
        inst.in_flight -= 1
        inst.last_used = time.monotonic()
        inst.gate.leave()
        self._slot_freed(inst)

    def _slot_freed(self, inst: Instance) -> None:
        if inst.in_flight == 0 and inst.gate.idle:
            self.notify_changed()

    def hold_for(self, inst: Instance, names: list[str]) -> None:
        """`inst`'s load waits for the busy models `names` to drain: requests that reach them
        from now on queue behind it (see `admission`). Holds on any other model are lifted."""
        for other in self.instances.values():
            if other.name in names:
                other.gate.hold(inst.name)
            else:
                other.gate.unhold(inst.name)

    def lift_holds(self, inst: Instance) -> None:
        """`inst`'s load no longer waits for room: the models it held take requests again."""
        for other in self.instances.values():
            other.gate.unhold(inst.name)

    def engine_failed(self, inst: Instance) -> None:
        """A proxied request to this engine failed: check its health now, not at the next tick."""
        inst.probe_now.set()

    def keep_alive(self, name: str, seconds: float) -> None:
        """Stop the model after `seconds` idle (0: as soon as it is idle; math.inf: never),
        instead of after its profile's TTL, until it stops (Ollama's `keep_alive`)."""
        inst = self.instance(name)
        if inst.state in (State.READY, State.SLEEPING):
            inst.keep_alive = seconds

    async def pull(self, name: str) -> Path:
        """Download (or update) a model's files without loading it."""
        inst = self.instance(name)
        return await self.loader.fetch(inst, inst.profile, update=True)

    async def wait_released(self, pids: set[int]) -> bool:
        """Wait until the GPUs show no memory held by `pids`; see `Loader.wait_released`."""
        return await self.loader.wait_released(pids)

    # ----- room for loads -----

    def notify_changed(self) -> None:
        """Room may have appeared (a model went idle, stopped or failed): wake loads waiting for it."""
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self) -> None:
        """Wait for the next `notify_changed`."""
        await self._changed.wait()

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
        self.begin_stop(inst)
        await self.finish_stop(inst, reason)
        return True

    def begin_stop(self, inst: Instance) -> None:
        """Mark a ready (or parked) model as stopping, synchronously, so no new request is routed to it."""
        assert inst.state in (State.READY, State.SLEEPING)
        inst.state = State.STOPPING
        inst.stopped = anyio.Event()
        inst.settled.set()  # a wake waiting for a park to end sees STOPPING instead

    async def finish_stop(self, inst: Instance, reason: str) -> None:
        """Stop the engine of a model `begin_stop` marked, and clear the instance."""
        engine = inst.engine
        assert engine is not None
        log.info("stopping %s (%s)", inst.name, reason)
        # A planned stop: the engine's prompt cache is saved first (persist_kv), within its time limit.
        await self.kv.save(inst, engine)
        await close_client(inst)
        with anyio.CancelScope(shield=True):
            code = await engine.stop(self.config.server.stop_grace)
        log.info("%s stopped (exit code %s)", inst.name, code)
        self.clear(inst, State.STOPPED)

    def clear(self, inst: Instance, state: State) -> None:
        """The instance holds nothing any more: no engine, no claim."""
        inst.engine = None
        inst.spec = None
        inst.request = None
        inst.parked = None
        inst.state = state
        inst.progress = ""
        inst.keep_alive = None  # a client's keep_alive lasts until the model stops
        self.clear_claim(inst)
        self.ledger.remove(inst.name)
        inst.stopped.set()

    def clear_claim(self, inst: Instance) -> None:
        """Give back the instance's placement: its memory is free for other loads."""
        inst.placement = None
        self.planner.release(inst.name)
        self.notify_changed()

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
            model_path = await self.loader.fetch(new_inst, new_inst.profile)
            result, _ = self.planner.place(new_inst.profile, model_path, self.loader.running_except(new_inst))
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
                ttl = inst.idle_ttl()
                if (
                    ttl is not None
                    # A parked model past its TTL is stopped too, giving back its host RAM.
                    and (inst.state is State.READY or (inst.state is State.SLEEPING and inst.settled.is_set()))
                    and inst.in_flight == 0
                    and inst.gate.idle
                    and now - inst.last_used >= ttl
                ):
                    self.task_group.start_soon(self._unload_instance, inst, f"idle for {ttl:.0f}s")

    # ----- reporting (read-only; see reports.py) -----

    def status(self) -> list[dict[str, Any]]:
        """What `llmctl ps` shows: one entry per model that has run since startup."""
        return reports.status(self)

    def progress_of(self, inst: Instance, log_tail: list[str] | None = None) -> str:
        """What the model is doing now; see `reports.progress_of`."""
        return reports.progress_of(self, inst, log_tail)

    def load_report(self, inst: Instance) -> tuple[str, str]:
        """(what the model is doing, the last line of its engine's log), from one read of the log."""
        return reports.load_report(self, inst)

    async def plan_preview(self, name: str, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """What loading `name` now would do, without doing it: for `llmctl plan`. A Hugging Face
        GGUF not downloaded yet is planned from its header, read from the Hub (`on_progress`
        hears how that goes)."""
        return await reports.plan_preview(self, name, on_progress)

    def gpu_report(self) -> dict[str, Any]:
        """Each card with its memory, which of llmd's models claims how much of it, and its telemetry."""
        return reports.gpu_report(self)

    def model_cards(self, name: str) -> list[int]:
        """The cards the model `name` is placed on now; see `reports.model_cards`."""
        return reports.model_cards(self, name)

    def log_tail(self, name: str, lines: int) -> list[str]:
        return reports.log_tail(self, name, lines)

    def log_path(self, name: str) -> Path:
        return engine_log_path(self.config, self.resolve(name).name)
