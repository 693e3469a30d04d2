"""The types a driver works with: what the scheduler decided, and what the supervisor runs.

Third-party drivers import these from `llmd.drivers.base`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from llmd.daemon.profiles import Profile


@dataclass(frozen=True)
class GpuShare:
    """One card in a placement and the VRAM planned on it."""

    index: int
    uuid: str
    vram_mib: int


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

    @property
    def cpu_only(self) -> bool:
        return not self.gpus

    @property
    def tensor_parallel(self) -> int:
        return max(1, len(self.gpus))

    @property
    def vram_mib(self) -> int:
        return sum(share.vram_mib for share in self.gpus)

    def cuda_visible_devices(self) -> str:
        """By UUID, so a placement survives NVML and CUDA disagreeing on the order of cards."""
        return ",".join(share.uuid for share in self.gpus)


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a driver needs to build one engine's command line."""

    profile: Profile
    placement: Placement
    model_path: Path
    host: str
    port: int
    # argv prefix from `[engines.NAME] command`, already resolved to an executable.
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Readiness:
    """How to tell that an engine is ready: an HTTP GET on `path` answers 200.

    Until then the engine may refuse connections, or answer 503 while it loads.
    """

    path: str = "/health"


@dataclass(frozen=True)
class LaunchSpec:
    """The exact process to start. argv is never passed through a shell."""

    argv: list[str]
    env: dict[str, str]
    readiness: Readiness = Readiness()


class Driver(Protocol):
    """An engine driver. `name` is the `engine` value profiles use."""

    name: str
    # argv prefix used when llmd.toml names no `[engines.NAME] command`.
    default_command: list[str]

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        """Build the argv and env that start this engine for `request`."""
        ...
