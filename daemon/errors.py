"""One exception hierarchy for llmd, so callers catch `LlmdError` and show its message."""

from __future__ import annotations

# The base lives in the driver API, which drivers import without the daemon.
from llmd.drivers.errors import LlmdError

__all__ = [
    "AddressInUseError",
    "ConfigError",
    "EngineNotInstalledError",
    "EngineStartError",
    "LlmdError",
    "NoRoomError",
    "QueueFullError",
    "UnknownModelError",
]


class ConfigError(LlmdError):
    """A config or profile file is missing, unreadable or invalid."""


class AddressInUseError(ConfigError):
    """A configured listen address is held by another socket."""


class UnknownModelError(LlmdError):
    """A request named a model that no valid profile serves."""


class EngineStartError(LlmdError):
    """An engine process exited or did not become ready; the message carries its log tail."""


class EngineNotInstalledError(LlmdError):
    """The engine binary for a profile cannot be found."""


class NoRoomError(LlmdError):
    """The model does not fit now; `retry_after` says when asking again may help."""

    def __init__(self, message: str, retry_after: int = 10) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(LlmdError):
    """The model has no free slot and its queue is full (`[policy] max_queue`): each API answers
    429 with `Retry-After: retry_after` in its own error shape."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
