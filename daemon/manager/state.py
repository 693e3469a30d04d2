"""What the manager keeps per model (`Instance`, its `State`, the `Load` under way) and the
small rules about it that need no manager: retry backoff, out-of-memory detection, log paths.

Only the manager and its collaborators change these objects, on the event loop (see
`llmd.daemon.manager`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import anyio

from llmd.drivers.base import LaunchRequest, LaunchSpec, Placement

from llmd.daemon.config import DaemonConfig
from llmd.daemon.engines.supervisor import EngineProcess
from llmd.daemon.errors import LlmdError
from llmd.daemon.http.upstream import Pool
from llmd.daemon.manager.admission import Gate
from llmd.daemon.models.downloads import DownloadProgress
from llmd.daemon.models.profiles import Profile
from llmd.daemon.placement.estimate import GPU_OVERHEAD_MIB
from llmd.daemon.placement.scheduler import RunningModel

ENGINE_HOST = "127.0.0.1"
# Crash handling: consecutive failed starts or crashes before llmd stops retrying on its own.
MAX_ATTEMPTS = 5
# What a parked engine is taken to keep per card when NVML cannot say (its CUDA context).
PARKED_DEFAULT_MIB = GPU_OVERHEAD_MIB
_OOM_MARKERS = ("out of memory", "failed to allocate", "cudamalloc failed", "outofmemoryerror", "cannot allocate memory")


def backoff_seconds(failures: int) -> float:
    """Wait before the next attempt after `failures` consecutive failures: 0, 1, 2, 4 ... 30 s."""
    return 0.0 if failures <= 0 else float(min(2 ** (failures - 1), 30))


def looks_like_oom(error: LlmdError) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def engine_log_path(config: DaemonConfig, name: str) -> Path:
    """Where the engine of the model `name` (a profile's own name, not an alias) logs."""
    return config.logs_dir / f"{name}.log"


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
    # The models this load made room by, for `llmctl load` to report: stopped, or put to sleep.
    evicted: list[str] = field(default_factory=list)
    parked: list[str] = field(default_factory=list)


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
    # Admission: the slots requests hold (from admission until their reply ends, a wait for
    # the load included) and the queue of those waiting for one. Set from the profile's name.
    gate: Gate = field(init=False)
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float | None = None
    error: str | None = None
    progress: str = ""
    # Consecutive failed starts or crashes; drives the backoff and the retry limit.
    failures: int = 0
    # Set after an out-of-memory load: the context the next loads use instead of the profile's.
    ctx_override: int | None = None
    spec: LaunchSpec | None = None
    # What the running engine was started from (`spec` is what the driver made of it): a reload
    # asks the driver again with an edited profile, to tell whether the engine must restart.
    request: LaunchRequest | None = None
    # Set while the profile's file is invalid and the model runs on its last good version.
    profile_error: str | None = None
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
    # While the model's files download: the latest report, with byte counts (`progress` has it
    # as a line for people).
    download: DownloadProgress | None = None
    # The idle TTL a client asked for (Ollama's `keep_alive`), in place of the profile's until
    # the model stops: 0 stops it once idle, math.inf never. None: the profile's TTL.
    keep_alive: float | None = None

    def idle_ttl(self) -> float | None:
        """Seconds of idleness after which the model is stopped; None: never."""
        if self.keep_alive is not None:
            return None if self.keep_alive == math.inf else self.keep_alive
        return self.profile.policy.ttl_seconds

    def __post_init__(self) -> None:
        self.gate = Gate(self.profile.name)

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
        awaiting it (a slot given to a request that has not reached the engine yet counts), or
        a parked one, can be evicted; a starting, stopping or falling-asleep one
        holds its claim. `parkable`: eviction would park it rather than stop it."""
        assert self.placement is not None
        if self.state is State.READY:
            busy = max(self.in_flight, self.gate.active) + self.waiters
        elif self.state is State.SLEEPING and self.settled.is_set():
            busy = 0
        else:
            busy = 1
        policy = self.profile.policy
        parks = parkable and self.state is State.READY
        # Host RAM: what the placement keeps in host memory, and a parked engine's weights.
        sleep = self.spec.sleep if self.spec is not None else None
        parked_weights = sleep.host_ram_mib if sleep is not None else 0
        host_mib = self.placement.host_mib + (parked_weights if self.state is State.SLEEPING else 0)
        return RunningModel(
            name=self.name,
            gpus=self.claimed(),
            in_flight=busy,
            pinned=policy.pinned,
            priority=policy.priority,
            last_used=self.last_used,
            parked_gpus=self.parked_share() if parks else None,
            cpu_cores=self.placement.cpu_cores,
            host_mib=host_mib,
            parked_host_mib=self.placement.host_mib + parked_weights if parks else 0,
        )


async def close_client(inst: Instance) -> None:
    """Close the instance's pooled connections to its engine, if it has any."""
    client, inst.client = inst.client, None
    if client is not None:
        with anyio.CancelScope(shield=True):
            await client.aclose()


@dataclass
class Job:
    """A manager action run on behalf of a client that may go away before it ends."""

    done: anyio.Event = field(default_factory=anyio.Event)
    error: LlmdError | None = None
