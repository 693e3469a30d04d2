"""How many wrong tokens the dashboard's login page takes before it stops looking at them.

Failed logins are counted in a sliding window, per client address and over all addresses. Once
an address has used up its failures, every login from it (the right token too: it is not even
compared) is answered 429 with Retry-After until the oldest failure leaves the window; once all
addresses together have, every login is. A good login clears its address's count. Clients that
send the Bearer header are not counted here.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

PER_ADDRESS = 5
OVERALL = 30
WINDOW_SECONDS = 60.0
# Addresses tracked at once; past it, those without a failure in the window are forgotten first.
MAX_ADDRESSES = 10_000

Clock = Callable[[], float]


class SlidingWindow:
    """At most `limit` events in any `window` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.window = window
        # Only the newest `limit` events can decide whether another one is allowed.
        self._events: deque[float] = deque(maxlen=limit)

    def wait(self, now: float) -> float:
        """Seconds until one more event is allowed; 0 when it is now."""
        if len(self._events) < (self._events.maxlen or 0):
            return 0.0
        return max(0.0, self._events[0] + self.window - now)

    def add(self, now: float) -> None:
        self._events.append(now)

    def idle(self, now: float) -> bool:
        """Whether no event is left in the window."""
        return not self._events or self._events[-1] + self.window <= now


class LoginThrottle:
    """Failed dashboard logins, per address and over all addresses."""

    def __init__(self, *, per_address: int = PER_ADDRESS, overall: int = OVERALL, window: float = WINDOW_SECONDS,
                 clock: Clock = time.monotonic, max_addresses: int = MAX_ADDRESSES) -> None:
        self.per_address = per_address
        self.window = window
        self._clock = clock
        self._max_addresses = max_addresses
        self._overall = SlidingWindow(overall, window)
        self._addresses: dict[str, SlidingWindow] = {}

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until `address` may try to log in again; None if it may now."""
        now = self._clock()
        own = self._addresses.get(address)
        wait = max(self._overall.wait(now), own.wait(now) if own is not None else 0.0)
        return max(1, math.ceil(wait)) if wait > 0 else None

    def failed(self, address: str) -> None:
        now = self._clock()
        self._overall.add(now)
        own = self._addresses.get(address)
        if own is None:
            self._make_room(now)
            own = self._addresses[address] = SlidingWindow(self.per_address, self.window)
        own.add(now)

    def succeeded(self, address: str) -> None:
        self._addresses.pop(address, None)

    def _make_room(self, now: float) -> None:
        if len(self._addresses) < self._max_addresses:
            return
        for address in [a for a, window in self._addresses.items() if window.idle(now)]:
            del self._addresses[address]
        while len(self._addresses) >= self._max_addresses:
            del self._addresses[next(iter(self._addresses))]  # the one tracked longest
