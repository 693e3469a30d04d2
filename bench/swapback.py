"""Swap-back: a long conversation's next turn after its model was unloaded and loaded again.

Two profiles serve the same model, one with `[policy] persist_kv = true` (llmd saves the
engine's prompt cache before the stop and restores it at the next start), one without. Each
repetition, for each profile in alternating order:

- load the model, send a conversation of about `tokens` tokens (new text each repetition, so
  nothing is cached): its time to first token is the cold prefill;
- unload the model, then load it again (timed: a restore happens inside this load);
- send the same conversation with one more exchange: the follow-up's time to first token, and
  how many of its prompt tokens the engine reports as cached.

The goal is for the follow-up with persist_kv to take at most a quarter of the cold prefill.
Without persist_kv the follow-up processes the whole prompt again, so it takes about as long as
the cold turn (a little longer: its prompt is longer).
"""

from __future__ import annotations

import json
import time

import httpx

from .harness import LOCALHOST, BenchError, Daemon
from .report import Section
from .stats import Figure, median

PATH = "/v1/chat/completions"
GOAL_RATIO = 0.25


def conversation(tokens: int, rep: int) -> list[dict[str, str]]:
    """A user turn of about `tokens` tokens, different for each repetition. The test models'
    byte-level tokenizer makes about one token a character."""
    words, length, i = [], 0, 0
    while length < tokens:
        word = f"r{rep}w{i}"
        words.append(word)
        length += len(word) + 1
        i += 1
    return [{"role": "user", "content": " ".join(words)}]


def follow_up(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then, one more question"}]


def turn(port: int, model: str, messages: list[dict[str, str]]) -> tuple[float, dict]:
    """One streamed turn through llmd: (seconds to its first event, its `usage`)."""
    body = {"model": model, "messages": messages, "max_tokens": 2, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    first, usage = None, None
    began = time.perf_counter()
    with httpx.stream("POST", f"http://{LOCALHOST}:{port}{PATH}", json=body, timeout=600, trust_env=False) as response:
        if response.status_code != 200:
            raise BenchError(f"{model}: the conversation's turn answered {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                first = time.perf_counter() - began if first is None else first
                usage = json.loads(line.removeprefix("data: ")).get("usage") or usage
    if first is None or usage is None:
        raise BenchError(f"{model}: the turn's stream had no events or no usage")
    return first, usage


def _cached(usage: dict) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))


def measure(daemon: Daemon, plain: str, kept: str, tokens: int, reps: int) -> Section:
    section = Section("swapback", "Swap-back: a long conversation's next turn after an unload and a reload")
    cold: list[float] = []
    follow: dict[str, list[float]] = {plain: [], kept: []}
    reload: dict[str, list[float]] = {plain: [], kept: []}
    cached: dict[str, list[int]] = {plain: [], kept: []}
    ratios: dict[str, list[float]] = {plain: [], kept: []}
    prompt_tokens: list[int] = []
    for rep in range(reps):
        for name in ((plain, kept) if rep % 2 == 0 else (kept, plain)):
            messages = conversation(tokens, rep)
            daemon.load(name)
            first, usage = turn(daemon.port, name, messages)
            cold.append(first)
            prompt_tokens.append(int(usage["prompt_tokens"]))
            daemon.unload(name)
            began = time.perf_counter()
            daemon.load(name)
            reload[name].append(time.perf_counter() - began)
            again, usage = turn(daemon.port, name, follow_up(messages))
            follow[name].append(again)
            cached[name].append(_cached(usage))
            ratios[name].append(again / first)
            daemon.unload(name)
    if not all(cached[kept]):
        raise BenchError(f"{kept} (persist_kv) found nothing cached after its reload: {cached[kept]}")

    def ms(values: list[float]) -> tuple[float, float, float]:
        return median(values) * 1000, min(values) * 1000, max(values) * 1000

    value, low, high = ms(cold)
    section.add(Figure("swapback.cold.ms", f"cold prefill of a {median(prompt_tokens):.0f}-token conversation, first token",
                       value, "ms", low, high, samples=len(cold)))
    for name, label, goal in ((plain, "without persist_kv", None), (kept, "with persist_kv", GOAL_RATIO)):
        key = "kept" if name == kept else "plain"
        value, low, high = ms(follow[name])
        section.add(Figure(f"swapback.{key}.ms", f"{label}: next turn after unload and reload, first token",
                           value, "ms", low, high, samples=reps))
        ratio = median(ratios[name])
        section.add(Figure(f"swapback.{key}.ratio", f"{label}: next turn / cold prefill", ratio, "ratio",
                           min(ratios[name]), max(ratios[name]), samples=reps,
                           goal=f"<= {goal:g}" if goal is not None else None,
                           met=ratio <= goal if goal is not None else None))
        value, low, high = ms(reload[name])
        section.add(Figure(f"swapback.{key}.reload_ms", f"{label}: the reload (a restore included)", value, "ms", low, high,
                           samples=reps))
    section.details = {
        "reps": reps,
        "prompt_tokens": prompt_tokens,
        "cold_ms": [x * 1000 for x in cold],
        "follow_up_ms": {key: [x * 1000 for x in values] for key, values in follow.items()},
        "reload_ms": {key: [x * 1000 for x in values] for key, values in reload.items()},
        "cached_tokens": cached,
    }
    section.notes.append(
        "ratio = the next turn's time to first token / the cold turn's, paired per repetition (the same "
        "conversation); median over repetitions, spread their range. The reload is timed apart: with "
        "persist_kv it includes restoring the saved cache"
    )
    return section
