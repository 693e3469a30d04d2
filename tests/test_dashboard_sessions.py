"""The dashboard's logins and its count of wrong tokens, on a clock the test moves.

The same rules through a real daemon are in test_dashboard.py.
"""

from __future__ import annotations

import pytest

from llmd.daemon.config import DaemonConfig
from llmd.daemon.web.dashboard_sessions import SessionStore
from llmd.daemon.web.login_throttle import LoginThrottle

HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_sessions_are_random_and_end_at_logout(clock: Clock) -> None:
    store = SessionStore(12 * HOUR, 7 * 24 * HOUR, clock=clock)
    first, second = store.create(), store.create()
    assert first != second and len(first) >= 43  # 256 random bits, URL-safe base64
    assert store.check(first) and store.check(second)
    store.revoke(first)
    assert not store.check(first) and store.check(second)  # the other login goes on
    assert not store.check("made-up") and not store.check("")
    store.revoke("made-up")  # not a login: nothing happens


def test_a_session_ends_when_unused_and_at_its_lifetime_however_used(clock: Clock) -> None:
    store = SessionStore(idle=10.0, lifetime=25.0, clock=clock)
    idle, busy = store.create(), store.create()
    for _ in range(4):  # used every 6 s: never idle for 10 s
        clock.now += 6
        assert store.check(busy)
    assert not store.check(idle)  # unused for 24 s
    clock.now += 1.5  # 25.5 s after it began
    assert not store.check(busy)
    assert len(store) == 0  # ended logins are forgotten


def test_the_number_of_sessions_is_bounded(clock: Clock) -> None:
    store = SessionStore(HOUR, HOUR, clock=clock, max_sessions=3)
    sessions = []
    for _ in range(3):
        sessions.append(store.create())
        clock.now += 1
    assert store.check(sessions[0])  # now the most recently used
    newest = store.create()
    assert len(store) == 3 and not store.check(sessions[1])  # the least recently used one ended
    assert store.check(sessions[0]) and store.check(sessions[2]) and store.check(newest)


def test_session_lengths_are_settings() -> None:
    defaults = DaemonConfig().dashboard
    assert (defaults.session_idle, defaults.session_lifetime) == (12 * HOUR, 7 * 24 * HOUR)
    custom = DaemonConfig.model_validate({"dashboard": {"session_idle": 60, "session_lifetime": 120}}).dashboard
    assert (custom.session_idle, custom.session_lifetime) == (60, 120)


def test_an_address_that_sent_too_many_wrong_tokens_waits_for_its_window(clock: Clock) -> None:
    throttle = LoginThrottle(per_address=5, overall=100, window=60.0, clock=clock)
    for _ in range(5):
        assert throttle.retry_after("203.0.113.7") is None
        throttle.failed("203.0.113.7")
        clock.now += 1
    # Blocked until its first failure leaves the window, at 1060: 55 s from now.
    assert throttle.retry_after("203.0.113.7") == 55
    assert throttle.retry_after("203.0.113.8") is None  # other addresses are not
    clock.now += 54.5
    assert throttle.retry_after("203.0.113.7") == 1  # never "0": Retry-After counts whole seconds
    clock.now += 0.5
    assert throttle.retry_after("203.0.113.7") is None  # the window has passed: a login is looked at again
    throttle.failed("203.0.113.7")  # one more slot freed, and used
    assert throttle.retry_after("203.0.113.7") == 1


def test_a_good_login_clears_its_address(clock: Clock) -> None:
    throttle = LoginThrottle(per_address=3, overall=100, window=60.0, clock=clock)
    for _ in range(2):
        throttle.failed("198.51.100.1")
    throttle.succeeded("198.51.100.1")
    for _ in range(2):
        throttle.failed("198.51.100.1")
    assert throttle.retry_after("198.51.100.1") is None


def test_failures_from_every_address_together_are_bounded_too(clock: Clock) -> None:
    throttle = LoginThrottle(per_address=5, overall=10, window=60.0, clock=clock)
    for n in range(10):
        throttle.failed(f"192.0.2.{n}")  # one each: no address is over its own limit
    assert throttle.retry_after("192.0.2.200") == 60  # but every login now waits
    clock.now += 60
    assert throttle.retry_after("192.0.2.200") is None


def test_the_tracked_addresses_are_bounded(clock: Clock) -> None:
    throttle = LoginThrottle(per_address=2, overall=10_000, window=60.0, clock=clock, max_addresses=100)
    for n in range(1000):
        throttle.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(throttle._addresses) <= 100
