"""Admission: how many requests a model's engine gets at once, how many may wait, in what order.

Each model has a `Gate`. A request takes one of its slots (`[policy] max_concurrency`, by
default the profile's `[launch] parallel`) before it is sent to the engine, or else a place in
its queue (`[policy] max_queue`); past that it is refused at once with `QueueFullError`, which
the APIs answer with 429 and `Retry-After`. A slot holds from admission until the reply ends,
including any wait for the model to load.

A slot given back goes straight to the head of the queue, in the same call (`leave`), so a
model with requests waiting never looks idle between two of them: no load can evict it in that
gap. That is what keeps a group of requests for one model together instead of swapping models
back and forth.

A load that has waited long for room which busy models hold may `hold` their gates: requests
that reach a held gate from then on wait behind the swap, while those queued before the hold
still go first. So the busy models drain, the swap happens, and nobody waits past
`[server] queue_timeout` behind a group that keeps growing.

No manager and no I/O here; the clock is passed in for tests. Like all model state, a gate is
only touched on the event loop, and nothing in it awaits between a check and a change.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from llmd.daemon.errors import QueueFullError

if TYPE_CHECKING:
    from llmd.daemon.models.profiles import Profile

# Retry-After bounds for a full queue, in seconds.
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 60
# The share of `[server] queue_timeout` a waiting load lets busy models go on taking new
# requests before it holds them: the other share is for their requests in flight to finish.
HOLD_AFTER_SHARE = 0.5


def limits_for(profile: Profile) -> tuple[int, int | None]:
    """(slots, queue places) of a model's gate: `max_concurrency`, by default the engine's own
    parallel slots, and `max_queue` (None: no cap)."""
    policy = profile.policy
    return policy.max_concurrency or profile.launch.parallel, policy.max_queue


def hold_after(queue_timeout: float) -> float:
    """How long a load waits for busy models to free room before it holds them."""
    return queue_timeout * HOLD_AFTER_SHARE


@dataclass(eq=False)
class Ticket:
    """One request's place at a gate: granted a slot at once, or queued until `event` is set."""

    seq: int
    arrived: float
    granted: bool = False
    # Set once the ticket no longer counts: its slot was given back, or it left the queue.
    finished: bool = False
    event: anyio.Event = field(default_factory=anyio.Event)


class Gate:
    """One model's slots and its queue, first come first served."""

    def __init__(self, name: str, limit: int = 1, max_queue: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.limit = limit
        self.max_queue = max_queue
        self._clock = clock
        self.active = 0  # slots taken: requests admitted and not yet done
        self._queue: deque[Ticket] = deque()
        self._next_seq = 0
        # Loads holding this gate, each with the first ticket number it holds back.
        self._holds: dict[str, int] = {}
        # For Retry-After: slot-seconds held so far and slots given back (Little's law gives
        # the mean time a request holds a slot).
        self._slot_seconds = 0.0
        self._given_back = 0
        self._since = clock()

    # ----- reading -----

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """No slot taken: nothing running on the engine or about to be."""
        return self.active == 0

    @property
    def held(self) -> bool:
        return bool(self._holds)

    def mean_hold_seconds(self) -> float | None:
        """How long a request has held a slot, on average; None before the first one ended."""
        if not self._given_back:
            return None
        self._account()
        return self._slot_seconds / self._given_back

    def retry_after(self) -> int:
        """Seconds after which a refused request may find a place: the time the queue ahead of
        it takes to move through the slots, at the mean time a request holds one."""
        mean = self.mean_hold_seconds()
        if mean is None:
            return MIN_RETRY_AFTER
        wait = mean * (self.queued + 1) / max(1, self.limit)
        return min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, math.ceil(wait)))

    # ----- changing -----

    def configure(self, limit: int, max_queue: int | None) -> None:
        """Take the profile's current limits (they change on reload); a higher limit admits
        waiting requests at once."""
        self.limit, self.max_queue = limit, max_queue
        self._grant()

    def enter(self) -> Ticket:
        """Admit a request: a slot now, or a place in the queue; QueueFullError when the queue
        is full. A held gate queues every new request, even with slots free."""
        ticket = Ticket(seq=self._next_seq, arrived=self._clock())
        self._next_seq += 1
        if not self._queue and self.active < self.limit and self._may_grant(ticket):
            self._give(ticket)
        elif self.max_queue is not None and len(self._queue) >= self.max_queue:
            ticket.finished = True
            raise QueueFullError(self._full_message(), retry_after=self.retry_after())
        else:
            self._queue.append(ticket)
        return ticket

    async def wait(self, ticket: Ticket, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the ticket's slot. False if none came: the ticket
        has left the queue then. A caller cancelled here must `withdraw` the ticket."""
        if not ticket.granted:
            with anyio.move_on_after(timeout):
                await ticket.event.wait()
        if ticket.granted:
            return True
        self.withdraw(ticket)
        return False

    def withdraw(self, ticket: Ticket) -> None:
        """The request will not use its place (it gave up, timed out or failed before reaching
        the engine): leave the queue, or give back the slot. Safe to call more than once."""
        if ticket.finished:
            return
        if ticket.granted:
            self.leave()
        else:
            self._queue.remove(ticket)
        ticket.finished = True

    def leave(self) -> None:
        """A request is done with its slot: the next in the queue takes it, in this same call."""
        assert self.active > 0, f"{self.name}: a slot given back that was never taken"
        self._account()
        self.active -= 1
        self._given_back += 1
        self._grant()

    def hold(self, holder: str) -> None:
        """From now on, new requests wait behind `holder` (a load that needs this model to
        drain); those already queued still go first. Holding again keeps the first cut-off."""
        self._holds.setdefault(holder, self._next_seq)

    def unhold(self, holder: str) -> None:
        """`holder` no longer waits: admit what its hold kept back."""
        if self._holds.pop(holder, None) is not None:
            self._grant()

    # ----- internals -----

    def _full_message(self) -> str:
        running = f"{self.active} request{'s' if self.active != 1 else ''} running (max_concurrency = {self.limit})"
        waiting = f"{len(self._queue)} waiting (max_queue = {self.max_queue})"
        if self.held:
            return f"{self.name!r} is making room for another model: {running} and {waiting}; try again shortly"
        return f"{self.name!r} is busy: {running} and {waiting}; try again shortly"

    def _may_grant(self, ticket: Ticket) -> bool:
        return not self._holds or ticket.seq < min(self._holds.values())

    def _give(self, ticket: Ticket) -> None:
        self._account()
        self.active += 1
        ticket.granted = True
        ticket.event.set()

    def _grant(self) -> None:
        while self._queue and self.active < self.limit and self._may_grant(self._queue[0]):
            self._give(self._queue.popleft())

    def _account(self) -> None:
        now = self._clock()
        self._slot_seconds += self.active * (now - self._since)
        self._since = now
