"""The one owner of model state. Every load, use, unload and crash goes through here.

All state lives in `Manager.instances` and changes only on the event loop, without awaits
between a check and the change it guards, so there are no locks to get wrong. Loads run in
the manager's own task group: a client that gives up waiting never cancels a load that
others are waiting for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio
import httpx

from llmd.drivers.base import Driver, LaunchRequest, Placement

from .config import DaemonConfig
from .engines import resolve_command
from .errors import EngineStartError, LlmdError, UnknownModelError
from .profiles import Profile, ProfileSet
from .supervisor import EngineProcess, free_port, spawn_engine, tail_lines

log = logging.getLogger(__name__)

ENGINE_HOST = "127.0.0.1"
IDLE_CHECK_SECONDS = 0.5


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
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
    last_used: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    load_seconds: float | None = None
    error: str | None = None
    progress: str = ""

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def base_url(self) -> str:
        assert self.engine is not None
        return f"http://{ENGINE_HOST}:{self.engine.port}"


class Manager:
    def __init__(self, config: DaemonConfig, drivers: dict[str, Driver], profiles: ProfileSet) -> None:
        self.config = config
        self.drivers = drivers
        self.profiles = profiles
        self.instances: dict[str, Instance] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        # Readiness probes only; proxied traffic has its own pooled client.
        self._probe_client = httpx.AsyncClient(trust_env=False)

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
                await self._probe_client.aclose()

    def kill_all_now(self) -> None:
        """Synchronous last resort when the event loop is going away."""
        for inst in self.instances.values():
            if inst.engine is not None:
                inst.engine.kill_now()

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

    async def ensure_ready(self, name: str) -> Instance:
        """Return the model's instance once its engine is ready, starting it if needed.

        Concurrent callers for a cold model share one load.
        """
        while True:
            load = await self.start_loading(name)
            if load is None:
                return self.instance(name)
            await load.done.wait()
            if load.error is not None:
                raise load.error

    async def start_loading(self, name: str) -> Load | None:
        """Begin loading the model unless it is loading already; None if it is ready now."""
        inst = self.instance(name)
        while inst.state is State.STOPPING:
            await inst.stopped.wait()
        if inst.state is State.READY:
            return None
        if inst.state in (State.STOPPED, State.FAILED):
            self._begin_load(inst)
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

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Instance]:
        """`acquire` and `release` around a block."""
        inst = await self.acquire(name)
        try:
            yield inst
        finally:
            self.release(inst)

    # ----- loading -----

    def _begin_load(self, inst: Instance) -> None:
        assert self._tg is not None, "manager is not running"
        inst.state = State.STARTING
        inst.error = None
        inst.progress = "planning"
        inst.load = Load()
        inst.stopped = anyio.Event()
        self._tg.start_soon(self._load, inst, inst.load)

    async def _load(self, inst: Instance, load: Load) -> None:
        """Run one load to its end, whatever ends it: ready, failed, unloaded, or daemon shutdown."""
        started: list[EngineProcess] = []
        try:
            with load.scope:
                await self._start_engine(inst, started)
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
            await self._abandon_load(inst, load, started, State.FAILED, None)
        else:
            engine = started[0]
            inst.state = State.READY
            inst.ready_at = inst.last_used = time.monotonic()
            inst.load_seconds = inst.ready_at - load.started
            inst.progress = ""
            log.info("%s ready in %.2fs", inst.name, inst.load_seconds)
            assert self._tg is not None
            self._tg.start_soon(self._watch_exit, inst, engine)
            load.done.set()

    async def _start_engine(self, inst: Instance, started: list[EngineProcess]) -> None:
        """Plan, spawn and wait for readiness; the spawned engine is appended to `started` at once."""
        profile = inst.profile
        driver = self.drivers[profile.engine]
        placement = self._plan(profile)
        port = free_port(ENGINE_HOST, self._ports_in_use())
        request = LaunchRequest(
            profile=profile,
            placement=placement,
            model_path=self._model_path(profile),
            host=ENGINE_HOST,
            port=port,
            command=resolve_command(self.config, driver),
            env=dict(self.config.engine(driver.name).env),
        )
        spec = driver.launch(request)
        engine = spawn_engine(profile.name, spec, port, self._log_path(profile.name), str(self.config.server.state_dir))
        started.append(engine)
        inst.engine, inst.placement = engine, placement
        inst.progress = f"waiting for {profile.engine} (pid {engine.pid}) to load the model"
        log.info("starting %s: pid %d port %d", profile.name, engine.pid, port)
        await engine.wait_ready(spec, self.config.server.ready_timeout, self._probe_client)

    async def _abandon_load(
        self, inst: Instance, load: Load, started: list[EngineProcess], state: State, why: str | None
    ) -> None:
        if load.error is None:
            load.error = EngineStartError(f"{inst.name!r} did not start: {why}")
        log.warning("load of %s ended: %s", inst.name, load.error)
        with anyio.CancelScope(shield=True):
            for engine in started:
                await engine.stop(self.config.server.stop_grace)
        inst.engine = None
        inst.state = state
        inst.error = str(load.error) if state is State.FAILED else None
        inst.progress = ""
        inst.stopped.set()
        load.done.set()

    def _plan(self, profile: Profile) -> Placement:
        return Placement(ctx=profile.launch.ctx, gpu_layers=0, reason="CPU only")

    def _model_path(self, profile: Profile) -> Path:
        source = profile.model
        if source.path is not None:
            if not source.path.exists():
                raise EngineStartError(
                    f"model file {source.path} for {profile.name!r} does not exist; fix [model] path in its profile"
                )
            return source.path
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            if source.hf_file:
                return Path(hf_hub_download(source.hf_repo, source.hf_file, revision=source.revision, local_files_only=True))
            return Path(snapshot_download(source.hf_repo, revision=source.revision, local_files_only=True))
        except LocalEntryNotFoundError:
            raise EngineStartError(
                f"{profile.name!r}: {source.hf_repo} is not in the Hugging Face cache; "
                "download it first (for example with `hf download`)"
            ) from None

    def _ports_in_use(self) -> set[int]:
        return {inst.engine.port for inst in self.instances.values() if inst.engine is not None}

    def _log_path(self, name: str) -> Path:
        return self.config.logs_dir / f"{name}.log"

    async def _watch_exit(self, inst: Instance, engine: EngineProcess) -> None:
        code = await engine.wait_exit()
        if inst.engine is not engine or inst.state is not State.READY:
            return  # an ordinary stop
        tail = "\n".join(engine.log_tail())
        inst.state = State.FAILED
        inst.error = f"engine exited unexpectedly with code {code}. Last lines of {engine.log_path}:\n{tail}"
        log.error("%s: %s", inst.name, inst.error)
        inst.engine = None
        inst.stopped.set()
        # The leader is gone; make sure nothing it forked keeps running.
        with anyio.CancelScope(shield=True):
            await engine.stop(grace=1.0)

    # ----- unloading -----

    async def unload(self, name: str, reason: str = "requested") -> bool:
        """Stop the model's engine. Returns False if it was not running."""
        inst = self.instance(name)
        if inst.state is State.STARTING and inst.load is not None:
            inst.load.scope.cancel()
            await inst.load.done.wait()
            return True
        if inst.state is State.STOPPING:
            await inst.stopped.wait()
            return True
        if inst.state is not State.READY or inst.engine is None:
            return False
        engine = inst.engine
        inst.state = State.STOPPING
        log.info("stopping %s (%s)", inst.name, reason)
        with anyio.CancelScope(shield=True):
            code = await engine.stop(self.config.server.stop_grace)
        log.info("%s stopped (exit code %s)", inst.name, code)
        inst.engine = None
        inst.state = State.STOPPED
        inst.ready_at = None
        inst.stopped.set()
        return True

    async def stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for name, inst in list(self.instances.items()):
                if inst.state in (State.READY, State.STARTING, State.STOPPING):
                    tg.start_soon(self.unload, name, "shutdown")

    async def _unload_idle_forever(self) -> None:
        while True:
            await anyio.sleep(IDLE_CHECK_SECONDS)
            now = time.monotonic()
            for name, inst in list(self.instances.items()):
                ttl = inst.profile.policy.ttl_seconds
                if (
                    ttl is not None
                    and inst.state is State.READY
                    and inst.in_flight == 0
                    and now - inst.last_used >= ttl
                ):
                    assert self._tg is not None
                    self._tg.start_soon(self.unload, name, f"idle for {ttl:.0f}s")

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
                    "vram_mib": placement.vram_mib if placement else 0,
                    "load_s": round(inst.load_seconds, 3) if inst.load_seconds is not None and engine else None,
                    "progress": inst.progress or None,
                    "error": inst.error,
                    "log": str(self._log_path(name)),
                }
            )
        return rows

    @staticmethod
    def _idle_seconds(inst: Instance, now: float) -> float | None:
        if inst.state is not State.READY:
            return None
        return 0.0 if inst.in_flight else round(now - inst.last_used, 1)

    def log_tail(self, name: str, lines: int) -> list[str]:
        return tail_lines(self._log_path(self.resolve(name).name), lines)

    def log_path(self, name: str) -> Path:
        return self._log_path(self.resolve(name).name)
