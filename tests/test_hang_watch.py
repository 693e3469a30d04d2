"""The health monitor's verdict on an engine that does not answer its probes: hung only when it
makes no progress, never while its replies flow."""

from __future__ import annotations

from llmd.daemon.manager.hang import GIVE_UP_SECONDS, HEALTH_WINDOW, HangWatch, Progress


def _fail(watch: HangWatch, at: float, cpu: float = 0.0, received: int = 0, stopped: bool = False,
          busy: bool = False) -> str | None:
    """A probe sent at `at` that went unanswered 1.5 s later."""
    return watch.unanswered(at, Progress(at + 1.5, cpu, stopped, received), busy)


def test_a_stopped_engine_is_hung_once_its_probes_failed_for_the_window() -> None:
    watch = HangWatch()
    assert _fail(watch, 0.0, stopped=True) is None
    assert _fail(watch, 2.0, stopped=True) is None  # two failures: not enough
    reason = _fail(watch, 4.0, stopped=True)
    assert reason is not None and "stopped" in reason


def test_an_engine_that_uses_no_cpu_while_its_probes_fail_is_hung() -> None:
    watch = HangWatch()
    for at in (0.0, 2.0):
        assert _fail(watch, at, cpu=5.0) is None
    reason = _fail(watch, 4.0, cpu=5.001)
    assert reason is not None and "no CPU time" in reason


def test_an_engine_that_runs_is_slow_not_hung() -> None:
    watch = HangWatch()
    for step in range(20):  # 40 s of failed probes while idle, but running on the CPU
        assert _fail(watch, step * 2.0, cpu=step * 0.5) is None


def test_an_engine_whose_replies_flow_is_never_hung() -> None:
    watch = HangWatch()
    for step in range(int(2 * GIVE_UP_SECONDS)):  # no CPU time measured, but bytes arrive
        assert _fail(watch, step * 2.0, received=step * 100) is None


def test_an_answer_starts_the_count_over() -> None:
    watch = HangWatch()
    _fail(watch, 0.0)
    _fail(watch, 2.0)
    watch.answered()
    assert _fail(watch, 4.0) is None
    assert _fail(watch, 6.0) is None
    assert _fail(watch, 4.0 + HEALTH_WINDOW) is not None


def test_an_idle_engine_that_spins_without_answering_is_hung_in_the_end() -> None:
    watch = HangWatch()
    verdicts = [_fail(watch, step * 2.0, cpu=step * 2.0) for step in range(int(GIVE_UP_SECONDS / 2) + 2)]
    assert verdicts[-1] is not None and "no request in flight" in verdicts[-1]
    busy = HangWatch()
    assert all(_fail(busy, step * 2.0, cpu=step * 2.0, busy=True) is None for step in range(100))
