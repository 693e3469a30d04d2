"""Telling a hung engine from a slow one.

An unanswered health probe proves little on a busy machine: with every core saturated a healthy
engine, or the daemon itself, may answer late. So an engine is hung only when its probes have
gone unanswered for HEALTH_WINDOW seconds in a row (at least HEALTH_FAILURES of them) and there
is evidence that it makes no progress:

- one of its processes is stopped (SIGSTOP, a debugger), or
- it used (almost) no CPU time for QUIET_SECONDS while its probes failed, or
- it used CPU time but answered nothing for GIVE_UP_SECONDS while no request was in flight
  (an engine spinning in a loop).

An engine whose replies are flowing is never hung: every byte its proxied requests receive
from it starts the window over.
"""

from __future__ import annotations

from dataclasses import dataclass

# How long probes must go unanswered, and how many of them, before an engine may be called hung.
HEALTH_WINDOW = 4.0
HEALTH_FAILURES = 3
# CPU time below this over QUIET_SECONDS is no progress: a deadlocked engine's timers and
# pollers may still tick a little, a working one uses far more.
QUIET_SECONDS = 2.0
QUIET_CPU_SECONDS = 0.02
# Unanswered this long while running on the CPU and serving no request: stuck in a loop.
GIVE_UP_SECONDS = 60.0


@dataclass(frozen=True)
class Progress:
    """What an engine had done by a moment (monotonic `at`): the CPU seconds its processes had
    used, whether one of them is stopped, and the bytes its proxied requests had received."""

    at: float
    cpu_seconds: float
    stopped: bool
    received: int


class HangWatch:
    """The health probes an engine failed in a row, and its progress meanwhile."""

    def __init__(self) -> None:
        self.failures = 0
        self._failing_since = 0.0  # when the first unanswered probe of the run was sent
        self._quiet: Progress | None = None  # since when it has used no CPU time, and what it had then

    def answered(self) -> None:
        """A probe was answered: the engine is alive, whatever came before."""
        self.failures = 0
        self._quiet = None

    def unanswered(self, sent_at: float, now: Progress, busy: bool) -> str | None:
        """Record a probe sent at `sent_at` that went unanswered, given the engine's progress
        `now` and whether requests are in flight. Returns why it is hung, or None while it
        may only be slow."""
        quiet = self._quiet
        if quiet is None or now.received != quiet.received:
            # The first failure, or replies flowed since the last one: the window (re)starts.
            self.failures, self._failing_since, self._quiet = 0, sent_at, now
            quiet = now
        elif now.cpu_seconds - quiet.cpu_seconds >= QUIET_CPU_SECONDS:
            self._quiet = quiet = now  # it is running: quiet only from here on
        self.failures += 1
        failing = now.at - self._failing_since
        if self.failures < HEALTH_FAILURES or failing < HEALTH_WINDOW:
            return None
        if now.stopped:
            return f"it is stopped (SIGSTOP?) and has not answered its health probe for {failing:.0f}s"
        if now.at - quiet.at >= QUIET_SECONDS:
            return f"it has not answered its health probe for {failing:.0f}s and used no CPU time for {now.at - quiet.at:.0f}s"
        if not busy and failing >= GIVE_UP_SECONDS:
            return f"it has not answered its health probe for {failing:.0f}s, running on the CPU with no request in flight"
        return None
