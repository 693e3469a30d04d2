"""What each of llmd's errors means over HTTP, whatever the API a client speaks: the status, a
short code, and how long to wait before trying again.

This is the one place where an error raised behind the proxy (by the manager's `acquire`, for
one) becomes a status. Each API renders an `ErrorStatus` in its own error shape: OpenAI's in
`openai_errors.llmd_error_response`; another API's module does the same with its own body, so
that a full queue is a 429 with `Retry-After` in every API.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmd.daemon.errors import LlmdError, NoRoomError, QueueFullError, UnknownModelError


@dataclass(frozen=True)
class ErrorStatus:
    status: int
    # What went wrong, for clients that branch on it: `queue_full`, `no_room`,
    # `model_not_found`, `engine_unavailable`.
    code: str
    retry_after: int | None = None

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def status_of(error: LlmdError) -> ErrorStatus:
    """The HTTP meaning of an error that kept a request from its engine."""
    if isinstance(error, QueueFullError):  # the model's queue is full: come back shortly
        return ErrorStatus(429, "queue_full", max(1, int(error.retry_after)))
    if isinstance(error, NoRoomError):  # no room or no slot within queue_timeout
        return ErrorStatus(503, "no_room", max(1, int(error.retry_after)))
    if isinstance(error, UnknownModelError):
        return ErrorStatus(404, "model_not_found")
    return ErrorStatus(503, "engine_unavailable")  # the engine could not be started


def failure_message(method: str, path: str) -> str:
    """What a client is told of a fault of llmd's own (a 500): where, never the exception's text,
    which may hold paths, settings or parts of other requests; the traceback goes to the log."""
    return f"llmd failed on {method} {path}; the daemon's log has the details"
