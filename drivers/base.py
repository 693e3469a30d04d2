"""The types a driver works with: what the scheduler decided, and what the supervisor runs.

Third-party drivers import these from `llmd.drivers.base`. The driver API stands alone: it
imports nothing from the daemon, which builds on it instead (`tests/test_driver_api_isolation.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import LlmdError
from .estimate import Estimate, Estimator
from .settings import ProfileView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuShare:
    """One card in a placement and the VRAM planned on it."""

    index: int
    uuid: str
    vram_mib: int
    # The card's whole memory, when the scheduler knows it (0: unknown). Engines that size
    # themselves as a fraction of the card (vLLM's --gpu-memory-utilization) need it.
    total_mib: int = 0
    # Set for a device on another machine, reached over llama.cpp's RPC: its "HOST:PORT".
    # Only drivers with `supports_rpc_devices` get such shares.
    endpoint: str = ""
    # The model's layers planned on this device, the output layer counted as one (llama.cpp's
    # `-ngl` counts it so); 0: the plan does not say, and the engine splits by `vram_mib`.
    layers: int = 0

    @property
    def remote(self) -> bool:
        return bool(self.endpoint)


@dataclass(frozen=True)
class Placement:
    """Where the scheduler put a model. No GPUs means it runs on the CPU."""

    gpus: tuple[GpuShare, ...] = ()
    # Layers on the GPUs; None means all of them.
    gpu_layers: int | None = None
    # Layers whose MoE expert tensors stay in host memory.
    cpu_moe_layers: int = 0
    # Context length to launch with (the scheduler may lower it to fit).
    ctx: int = 4096
    # Why it was placed this way, for `llmctl plan` and `ps`.
    reason: str = ""
    # The cores the engine computes on when it computes on the CPU (a CPU placement, or layers or
    # MoE experts kept in host memory by an engine that runs them there): its share of the cores
    # llmd may use, with one thread per core. Empty: no CPU share (the engine's own default).
    cpu_cores: tuple[int, ...] = ()
    # Host RAM the plan reserved for what stays in host memory (weights, KV cache), in MiB.
    host_mib: int = 0
    # Workers of tensor parallelism on the CPU (vLLM's CPU workers), the cores split between them.
    cpu_tensor_parallel: int = 1

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    @property
    def tensor_parallel(self) -> int:
        """Cards in a GPU placement; CPU workers in a CPU one."""
        return len(self.gpus) if self.gpus else max(1, self.cpu_tensor_parallel)

    @property
    def threads(self) -> int | None:
        """Compute threads for the engine: one per core of its CPU share; None without one."""
        return len(self.cpu_cores) or None

    def worker_cores(self) -> list[tuple[int, ...]]:
        """The CPU share split between the `tensor_parallel` workers of a CPU placement, in
        contiguous runs; with fewer cores than workers, workers share cores."""
        return split_cores(self.cpu_cores, self.tensor_parallel)

    @property
    def vram_mib(self) -> int:
        return sum(share.vram_mib for share in self.gpus)

    def per_card(self) -> dict[int, int]:
        """MiB planned on each card, by card index."""
        return {share.index: share.vram_mib for share in self.gpus}

    def cuda_visible_devices(self) -> str:
        """By UUID, so a placement survives NVML and CUDA disagreeing on the order of cards.
        Only this machine's cards: RPC devices are reached through their endpoints."""
        return ",".join(share.uuid for share in self.gpus if not share.remote)

    def rpc_endpoints(self) -> list[str]:
        """The endpoints of the placement's RPC devices, in placement order."""
        return [share.endpoint for share in self.gpus if share.remote]


def split_cores(cores: tuple[int, ...], parts: int) -> list[tuple[int, ...]]:
    """`cores` in `parts` contiguous runs as even as they can be; with fewer cores than parts,
    each part gets one core, reused round the set."""
    if not cores or parts <= 1:
        return [tuple(cores)]
    if len(cores) < parts:
        return [(cores[i % len(cores)],) for i in range(parts)]
    base, extra = divmod(len(cores), parts)
    runs, start = [], 0
    for part in range(parts):
        size = base + (1 if part < extra else 0)
        runs.append(tuple(cores[start:start + size]))
        start += size
    return runs


def cpu_list(cores: tuple[int, ...] | list[int]) -> str:
    """Cores in the kernel's cpulist form ("0-3,6"), as vLLM's thread binding and taskset read it."""
    ordered = sorted(set(cores))
    runs: list[str] = []
    start = previous = None
    for core in [*ordered, None]:
        if core is not None and previous is not None and core == previous + 1:
            previous = core
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = core
    return ",".join(runs)


def cpu_mask(cores: tuple[int, ...] | list[int]) -> str:
    """Cores as a hexadecimal affinity mask without "0x" (llama.cpp's --cpu-mask)."""
    return format(sum(1 << core for core in set(cores)), "x")


# The `DeviceAllocation.index` of host memory.
HOST_MEMORY = -1


@dataclass(frozen=True)
class DeviceAllocation:
    """What an engine reported allocating on one device of its placement, in MiB: weights,
    KV cache (with any recurrent state) and compute buffers. `index` is the share's (the
    inventory's) index; `HOST_MEMORY` stands for host memory."""

    index: int
    model_mib: float = 0.0
    kv_mib: float = 0.0
    compute_mib: float = 0.0

    @property
    def total_mib(self) -> float:
        return self.model_mib + self.kv_mib + self.compute_mib


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a driver needs to build one engine's command line."""

    # The profile's name, aliases and `[launch]` settings (the daemon passes its whole profile).
    profile: ProfileView
    placement: Placement
    model_path: Path
    host: str
    port: int
    # argv prefix from `[engines.NAME] command`, already resolved to an executable.
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Where `planned_estimate` gets the estimate, by context length: the daemon passes its
    # planner's cache, which already holds the one the scheduler placed the model with.
    # None: no estimate (`planned_estimate` returns None).
    estimator: Estimator | None = None
    # Set when the profile asks to keep the prompt cache across restarts (`[policy] persist_kv`)
    # and the driver says it can (`supports_persist_kv`): the directory, owned by llmd, where the
    # engine must read and write its saved cache. The driver then returns a `KvPersistence`.
    kv_dir: Path | None = None


def planned_estimate(request: LaunchRequest) -> Estimate | None:
    """llmd's memory estimate for the request's model at the placement's context length.

    This is what the scheduler planned with, so drivers that must cap an engine's KV cache or
    offload (fastllm's --kv_cache_limit, vLLM's --kv-cache-memory-bytes) use the same numbers.
    None when the request carries no estimator, or when the model cannot be read well enough:
    the engine then reports the problem itself, with a better message than a guess here could give.
    """
    if request.estimator is None:
        return None
    try:
        return request.estimator(request.placement.ctx)
    except (LlmdError, OSError, ValueError) as exc:
        log.warning("%s: cannot estimate the model's memory (%s)", request.profile.name, exc)
        return None


@dataclass(frozen=True)
class Readiness:
    """How to tell that an engine is ready: an HTTP GET on `path` answers 200.

    Until then the engine may refuse connections, or answer 503 while it loads.
    """

    path: str = "/health"


@dataclass(frozen=True)
class SleepControl:
    """How to park an engine instead of stopping it, for a fast swap (vLLM's sleep mode).

    A POST to `sleep_path` frees most of the engine's GPU memory and keeps its weights in host
    RAM; a POST to `wake_path` puts them back, in a fraction of a cold start. Both answer 200
    once done. llmd parks an engine on eviction when host RAM has room for `host_ram_mib`.
    """

    sleep_path: str = "/sleep?level=1"
    wake_path: str = "/wake_up"
    # Host memory the parked engine holds (its weights): what must be free before parking.
    host_ram_mib: int = 0


@dataclass(frozen=True)
class KvPersistence:
    """How an engine saves its prompt cache to files and loads it back (llama-server's slot
    save and restore), so that a model stopped and started again answers a conversation it has
    seen without processing its prompt again.

    The engine reads and writes the files in `directory` (the request's `kv_dir`). For each of
    its `slots` (numbered from 0), a POST to `save_path` or `restore_path`, with `{slot}` filled
    in and the JSON body `{"filename": NAME}`, saves the slot's cache to `directory/NAME` or
    loads it back, answering 200 once done (with `n_saved` / `n_restored` tokens, as
    llama-server does). A GET of `slots_path`, when the engine has it, lists the slots, so that
    llmd saves only those holding a prompt. llmd chooses the file names, checks each file before
    it is restored, and drops any it cannot trust.
    """

    directory: Path
    slots: int = 1
    save_path: str = "/slots/{slot}?action=save"
    restore_path: str = "/slots/{slot}?action=restore"
    slots_path: str | None = "/slots"


@dataclass(frozen=True)
class LaunchSpec:
    """The exact process to start. argv is never passed through a shell."""

    argv: list[str]
    env: dict[str, str]
    readiness: Readiness = Readiness()
    # Set when the engine can be parked (see SleepControl); None: eviction stops it.
    sleep: SleepControl | None = None
    # Set when the engine was started to keep its prompt cache across restarts (see
    # KvPersistence); None: a stop loses it.
    kv: KvPersistence | None = None


class Driver(Protocol):
    """An engine driver. `name` is the `engine` value profiles use.

    A driver may also implement `load_progress(log_line) -> str | None` (see `ReportsLoadProgress`)
    to turn the engine's log lines into progress while it loads. It is optional: call it through
    `load_progress(driver, line)`, which works for drivers with and without it.

    A driver whose engine can save and restore its prompt cache sets `supports_persist_kv = True`
    and, for a request with `kv_dir`, returns a `KvPersistence` in its `LaunchSpec`. Profiles that
    set `[policy] persist_kv` for an engine without it are refused (see `persists_kv`).

    A driver may also declare `native_routes`, the client API routes its engine serves itself
    (see `NATIVE_ROUTES`). It is optional too: read it through `native_routes(driver)`.

    A driver whose engine can use devices on other machines over llama.cpp's RPC (`[[gpus.rpc]]`)
    sets `supports_rpc_devices = True`; only such drivers get placements with RPC devices (shares
    with an `endpoint`), and each share then says how many layers go there (`GpuShare.layers`).
    Read it through `uses_rpc_devices(driver)`.

    How an engine uses devices, for the scheduler: `tensor_parallel_splits_heads` (see
    `splits_heads`) and `offload_computes_on_cpu` (see `offload_computes_on_cpu`), both optional.
    An engine that computes on the CPU gets `placement.cpu_cores`, and should start as many
    compute threads as there are cores in it (`placement.threads`); llmd also confines the
    process to those cores.

    A driver whose engine serves OpenAI's /v1/embeddings sets `supports_embeddings = True` and,
    for a profile with `[launch] embeddings = true`, starts the engine so that it does. Profiles
    that ask for embeddings from an engine without it are refused (see `serves_embeddings`).
    """

    name: str
    # argv prefix used when llmd.toml names no `[engines.NAME] command`.
    default_command: list[str]

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        """Build the argv and env that start this engine for `request`."""
        ...


@runtime_checkable
class ReportsLoadProgress(Protocol):
    """The optional part of a driver: progress while the engine loads its model."""

    def load_progress(self, log_line: str) -> str | None:
        """A short human progress string for one line of the engine's log, such as
        "loading weights 45%", or None when the line says nothing about progress.

        Called for every line the engine writes (stdout and stderr interleaved, so a line may
        carry another message before the part a driver looks for) until it is ready. It must be
        cheap and must not raise.
        """
        ...


@runtime_checkable
class ReportsAllocations(Protocol):
    """The optional part of a driver whose engine logs what it allocated on each device."""

    def allocations(self, log_lines: list[str], placement: Placement) -> list[DeviceAllocation]:
        """What the engine allocated on each device of `placement`, read from the log lines it
        wrote while starting (this launch's only), host memory under `HOST_MEMORY`; empty when the
        log does not say. It must not raise."""
        ...


def engine_allocations(driver: Driver, log_lines: list[str], placement: Placement) -> list[DeviceAllocation]:
    """`driver.allocations(...)` when the driver has it, else nothing. A driver's bug here is
    logged and treated as "the engine did not say": it must never fail a load."""
    method = getattr(driver, "allocations", None)
    if method is None:
        return []
    try:
        found = method(log_lines, placement)
    except Exception:  # a report is a measurement: never let it break a load
        log.exception("driver %r: allocations failed", getattr(driver, "name", driver))
        return []
    return [item for item in found if isinstance(item, DeviceAllocation)] if isinstance(found, list) else []


def load_progress(driver: Driver, log_line: str) -> str | None:
    """`driver.load_progress(log_line)` when the driver has it, else None.

    A driver's bug here is logged and treated as "no progress", so it can never
    fail a load.
    """
    method = getattr(driver, "load_progress", None)
    if method is None:
        return None
    try:
        result = method(log_line)
    except Exception:  # progress is cosmetic: never let it break a load
        log.exception("driver %r: load_progress failed on %r", getattr(driver, "name", driver), log_line[:200])
        return None
    return result if isinstance(result, str) and result else None


# Routes of client APIs beyond OpenAI's chat, completions and embeddings (which every engine
# serves) that an engine may serve itself. The proxy passes a request on such a route straight
# to an engine that declares it in `native_routes`; for other engines it translates the request
# to OpenAI's chat completions where it can (Anthropic's Messages), or answers that the engine
# does not serve the route.
ANTHROPIC_MESSAGES = "/v1/messages"
ANTHROPIC_COUNT_TOKENS = "/v1/messages/count_tokens"
OPENAI_RESPONSES = "/v1/responses"
NATIVE_ROUTES = frozenset({ANTHROPIC_MESSAGES, ANTHROPIC_COUNT_TOKENS, OPENAI_RESPONSES})


def serves_embeddings(driver: Driver) -> bool:
    """Whether `driver`'s engine can serve /v1/embeddings (its `supports_embeddings`); False
    for a driver that does not say."""
    return getattr(driver, "supports_embeddings", False) is True


def native_routes(driver: Driver) -> frozenset[str]:
    """The routes of `NATIVE_ROUTES` that `driver`'s engine serves itself: its `native_routes`
    attribute, or none for a driver without one. Other paths a driver names are ignored, so a
    driver cannot take over a route the proxy does not offer."""
    declared = getattr(driver, "native_routes", None)
    if not isinstance(declared, set | frozenset | tuple | list):
        return frozenset()
    return frozenset(route for route in declared if route in NATIVE_ROUTES)


def uses_rpc_devices(driver: Driver) -> bool:
    """Whether `driver`'s engine can run layers on devices of other machines over llama.cpp's
    RPC (its `supports_rpc_devices`); False for a driver that does not say."""
    return getattr(driver, "supports_rpc_devices", False) is True


def splits_heads(driver: Driver) -> bool:
    """Whether `driver`'s engine splits a model over several devices by attention heads (vLLM's
    and fastllm's tensor parallelism), so that a width must divide the head counts: its
    `tensor_parallel_splits_heads`, True for a driver that does not say. llama.cpp splits by
    layers and says False."""
    return getattr(driver, "tensor_parallel_splits_heads", True) is not False


def offload_computes_on_cpu(driver: Driver) -> bool:
    """Whether `driver`'s engine computes the layers (or MoE experts) a plan keeps in host memory
    on the CPU, so that it needs a share of the cores: its `offload_computes_on_cpu`, True for a
    driver that does not say. vLLM streams offloaded weights to the GPU and says False. A CPU
    placement always computes on the CPU."""
    return getattr(driver, "offload_computes_on_cpu", True) is not False


def persists_kv(driver: Driver) -> bool:
    """Whether `driver`'s engine can save and restore its prompt cache (its
    `supports_persist_kv`); False for a driver that does not say."""
    return getattr(driver, "supports_persist_kv", False) is True


def cache_type_args(engine: str, flag: str, names: dict[str, str | None], cache_type: str) -> list[str]:
    """`[flag, value]` for the profile's `cache_type` (llama.cpp's names) in `engine`'s terms;
    nothing when `names` maps it to None (the engine's default). Raise ValueError naming the
    accepted values."""
    key = cache_type.lower()
    if key not in names:
        raise ValueError(
            f"{engine} cannot use cache_type = {cache_type!r}; use one of "
            f"{', '.join(sorted(names))} in the profile's [launch] section"
        )
    value = names[key]
    return [flag, value] if value else []
