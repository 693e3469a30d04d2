"""What a driver reads from a profile: its name, its aliases and its `[launch]` table.

`LaunchSettings` is the `[launch]` table itself, validated here so that the daemon (which loads
profiles) and every driver (which turns them into argv) agree on one definition. A driver sees
the profile through `ProfileView`: the daemon's profiles satisfy it, and a driver needs nothing
else from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Flags through which extra_args could move an engine off 127.0.0.1 or off the port llmd picked,
# where it would be reachable without the proxy's API keys.
RESERVED_FLAGS = ("--host", "--port")
# Python engines parse argv with argparse, which takes any unambiguous prefix of a long flag
# ("--hos=0.0.0.0" is --host): those prefixes down to "--ho" and "--po" are reserved too.
_SHORTEST_RESERVED_PREFIX = 4


def reserved_flag(arg: str) -> str | None:
    """The reserved flag `arg` sets (as "--flag" or "--flag=value", or an abbreviation argparse
    would expand to it), or None."""
    flag = arg.split("=", 1)[0]
    if len(flag) < _SHORTEST_RESERVED_PREFIX:
        return None
    return next((reserved for reserved in RESERVED_FLAGS if reserved.startswith(flag)), None)


class LaunchSettings(BaseModel):
    """How the engine is started: a profile's `[launch]` table."""

    model_config = ConfigDict(extra="forbid")

    ctx: Annotated[int, Field(gt=0, le=10_000_000)] = 4096
    # Concurrent sequences (llama.cpp slots); the KV cache is sized for all of them.
    parallel: Annotated[int, Field(ge=1, le=1024)] = 1
    # 1, N cards, or "auto" to let the scheduler split across cards when one is too small.
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    # What may move to CPU when the GPUs are too small: nothing, whole layers, or MoE experts;
    # an integer fixes the number of layers kept on CPU.
    offload: Literal["none", "auto", "moe-experts"] | Annotated[int, Field(ge=0, le=100_000)] = "none"
    # KV cache element type, as llama.cpp names it (f16, q8_0, ...).
    cache_type: str = "f16"
    # CPU threads (and as many cores) for an engine that computes on the CPU; None: an even share
    # of the cores llmd may use, split with the other CPU engines (see the README's placement).
    threads: Annotated[int, Field(ge=1, le=4096)] | None = None
    # Serve OpenAI's /v1/embeddings: the driver starts the engine in its embedding mode
    # (llama-server --embeddings, vLLM --runner pooling). Such an engine may serve nothing else.
    embeddings: bool = False
    # Engine-specific flags, appended verbatim as argv items (never through a shell).
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("extra_args")
    @classmethod
    def _no_listen_flags(cls, value: list[str]) -> list[str]:
        for arg in value:
            flag = reserved_flag(arg)
            if flag is not None:
                means = "" if arg == flag else f" ({arg!r} means {flag} to the engine)"
                raise ValueError(
                    f"{flag} is set by llmd (engines listen on 127.0.0.1, on a port llmd picks); remove it{means}"
                )
        return value


class ProfileView(Protocol):
    """The part of a profile a driver reads. Read-only: a driver never changes a profile."""

    @property
    def name(self) -> str:
        """The served model id (the profile file's stem)."""
        ...

    @property
    def aliases(self) -> Sequence[str]:
        """Other names the model is served under."""
        ...

    @property
    def launch(self) -> LaunchSettings:
        """The profile's `[launch]` table."""
        ...
