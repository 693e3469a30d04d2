"""Measure a model's prompt and generation speed through llmd's proxy, at 1..N concurrent streams.

Every request is a streaming chat with the same prompt length and `max_tokens`, so rows compare.
Times are taken here, on the client, as a user of the proxy sees them; token counts come from the
engine: its OpenAI `usage` (asked for with `stream_options.include_usage`), or llama-server's
`timings` when an engine sends no usage. The result says which.

Each prompt starts with its own request number, so no engine can serve it from a prompt cache
filled by an earlier request: prompt speed is the speed of really processing the prompt.

Sizes the user did not choose are fitted to the model's context (see `bench_fit`), and the result
says so, as it says when a level had more streams than the model has slots.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from itertools import count
from typing import Any

import anyio
import httpx

from llmd.daemon.diagnostics.bench_fit import ModelRoom, PromptCost, Sizes, fit_sizes, queue_note, shrink_note
from llmd.daemon.errors import LlmdError
from llmd.daemon.http.openai_errors import error_message

__all__ = ["BenchError", "BenchRow", "format_rate", "headline", "parse_concurrency", "run_bench"]

MAX_STREAMS = 256
_SENTENCE = "The farmer counts the sheep in the valley while the river runs past the old mill. "
# Prompts of these lengths (in words) measure what a word costs: one whole sentence apart, so
# the difference holds each of its words once.
_COST_WORDS = (1, 1 + len(_SENTENCE.split()))
# A reply may take this long per stream before the bench gives up on it.
REQUEST_TIMEOUT_S = 600.0
# While a level runs, how often to say how far it got.
PROGRESS_SECONDS = 5.0

Progress = Callable[[str], None]


class BenchError(LlmdError):
    """A bench request failed; the message says what the proxy or engine answered and what to do."""


@dataclass(frozen=True)
class StreamSample:
    """One streamed reply: its token counts and when it was sent, began and ended (monotonic seconds)."""

    prompt_tokens: int
    completion_tokens: int
    sent_at: float
    first_at: float
    done_at: float
    tokens_from: str


@dataclass(frozen=True)
class BenchRow:
    """One concurrency level. Rates are tokens/s; "stream" is the mean over streams, "total" the sum."""

    streams: int
    prompt_tps_stream: float
    prompt_tps_total: float
    gen_tps_stream: float
    gen_tps_total: float
    ttft_p50_ms: float
    prompt_tokens: int
    completion_tokens: int
    # Streams that had to wait for a slot: the level had more streams than the model has slots.
    waited: int = 0


def parse_concurrency(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]. Raise ValueError saying the accepted form."""
    try:
        levels = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1 or levels[-1] > MAX_STREAMS:
        raise ValueError(f"{text!r} is not a list of stream counts; write whole numbers from 1 to {MAX_STREAMS}, like 1,2,4")
    return levels


def format_rate(tokens_per_s: float) -> str:
    """"46.1", "512": three significant digits read well in a table."""
    return f"{tokens_per_s:.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.1f}"


def headline(row: BenchRow) -> str:
    """The figure people quote: "46.1 tok/s gen, 512 tok/s prompt (1 stream)"."""
    streams = f"{row.streams} stream{'s' if row.streams != 1 else ''}"
    if row.streams == 1:
        return f"{format_rate(row.gen_tps_stream)} tok/s gen, {format_rate(row.prompt_tps_stream)} tok/s prompt ({streams})"
    return f"{format_rate(row.gen_tps_total)} tok/s gen, {format_rate(row.prompt_tps_total)} tok/s prompt ({streams} total)"


def build_prompt(words: int, request_number: int) -> str:
    """About `words` words of fixed text, led by the request's number (which defeats prompt caches)."""
    base = _SENTENCE.split()
    text = " ".join(base[i % len(base)] for i in range(words))
    return f"Request {request_number}. {text}"


def _token_counts(usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> tuple[int, int, str] | None:
    if usage and "prompt_tokens" in usage and "completion_tokens" in usage:
        return int(usage["prompt_tokens"]), int(usage["completion_tokens"]), "usage"
    if timings and "prompt_n" in timings and "predicted_n" in timings:
        return int(timings["prompt_n"]) + int(timings.get("cache_n", 0)), int(timings["predicted_n"]), "timings"
    return None


def _error_message(status: int, body: bytes, base_url: str) -> str:
    text = error_message(status, body)
    hint = ""
    if status == 401:
        hint = "; pass --api-key (or set LLMD_API_KEY) to one of the keys in [server] api_keys"
    elif status == 400 and "context" in text:
        hint = "; shorten the prompt (--prompt-words) or --max-tokens, or raise the profile's [launch] ctx"
    elif status == 404:
        hint = f"; is {base_url} the proxy of the daemon llmctl talks to? (pass the daemon's llmd.toml with --config)"
    return f"the proxy at {base_url} answered HTTP {status}: {text}{hint}"


async def stream_once(
    client: httpx.AsyncClient, base_url: str, model: str, prompt: str, max_tokens: int, headers: dict[str, str],
    received: list[int] | None = None,
) -> StreamSample:
    """Send one streaming chat and time it; raise BenchError when it fails or reports no token counts.

    `received[0]` counts the content chunks as they arrive, for progress while a level runs.
    """
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        # Every reply runs to max_tokens, so the rows compare the same amount of generation.
        "ignore_eos": True,
        "temperature": 0,
    }
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    first_at: float | None = None
    sent_at = time.monotonic()
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                raise BenchError(_error_message(response.status_code, await response.aread(), base_url))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise BenchError(f"the engine failed mid-stream: {json.dumps(chunk['error'])[:300]}")
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content"):
                        first_at = first_at or time.monotonic()
                        if received is not None:
                            received[0] += 1
                usage = chunk.get("usage") or usage
                timings = chunk.get("timings") or timings
    except httpx.ConnectError:
        raise BenchError(
            f"cannot reach llmd's proxy at {base_url} ([server] listen): is the daemon running with this "
            "config? Pass its llmd.toml with --config"
        ) from None
    except httpx.HTTPError as exc:
        raise BenchError(f"the stream from {base_url} broke off: {exc or type(exc).__name__}") from None
    except ValueError as exc:
        raise BenchError(f"the proxy at {base_url} sent a chunk that is not JSON: {exc}") from None
    done_at = time.monotonic()
    counts = _token_counts(usage, timings)
    if counts is None:
        raise BenchError(
            f"{model}'s engine reported no token counts: it sent neither `usage` "
            "(for stream_options.include_usage) nor llama-server's `timings`, so tokens/s cannot be measured"
        )
    prompt_tokens, completion_tokens, source = counts
    return StreamSample(prompt_tokens, completion_tokens, sent_at, first_at or done_at, done_at, source)


def summarize(streams: int, samples: list[StreamSample], slots: int | None = None) -> BenchRow:
    """One row from the samples of one concurrency level.

    Per stream: prompt tokens over the time to first token, and the tokens after the first over
    the time after it. Total: all tokens of a phase over the span from the first stream's start of
    that phase to the last one's end.
    """
    ttfts = [s.first_at - s.sent_at for s in samples]
    prompt_stream = statistics.fmean(s.prompt_tokens / max(t, 1e-6) for s, t in zip(samples, ttfts))
    prompt_span = max(s.first_at for s in samples) - min(s.sent_at for s in samples)
    prompt_total = sum(s.prompt_tokens for s in samples) / max(prompt_span, 1e-6)
    generated = [(s.completion_tokens - 1, s.done_at - s.first_at) for s in samples if s.completion_tokens > 1]
    gen_stream = statistics.fmean(n / max(t, 1e-6) for n, t in generated) if generated else 0.0
    gen_span = max(s.done_at for s in samples) - min(s.first_at for s in samples)
    gen_total = sum(n for n, _ in generated) / max(gen_span, 1e-6) if generated else 0.0
    return BenchRow(
        streams=streams,
        prompt_tps_stream=round(prompt_stream, 2),
        prompt_tps_total=round(prompt_total, 2),
        gen_tps_stream=round(gen_stream, 2),
        gen_tps_total=round(gen_total, 2),
        ttft_p50_ms=round(statistics.median(ttfts) * 1000, 1),
        prompt_tokens=round(statistics.median(s.prompt_tokens for s in samples)),
        completion_tokens=round(statistics.median(s.completion_tokens for s in samples)),
        waited=max(0, streams - slots) if slots else 0,
    )


@dataclass
class _Run:
    """What every request of one bench run shares."""

    client: httpx.AsyncClient
    base_url: str
    model: str
    headers: dict[str, str]
    max_tokens: int
    prompt_words: int
    progress: Progress
    numbers: Iterator[int] = field(default_factory=lambda: count(1))

    async def warm_up(self) -> None:
        prompt = build_prompt(self.prompt_words, next(self.numbers))
        await stream_once(self.client, self.base_url, self.model, prompt, min(self.max_tokens, 4), self.headers)

    async def prompt_cost(self) -> PromptCost:
        """What the model's tokenizer and chat template make of bench prompts: two short ones."""
        tokens = []
        for words in _COST_WORDS:
            prompt = build_prompt(words, next(self.numbers))
            sample = await stream_once(self.client, self.base_url, self.model, prompt, 1, self.headers)
            tokens.append(sample.prompt_tokens)
        return PromptCost.from_samples(_COST_WORDS, (tokens[0], tokens[1]))

    async def fit(self, context: int, *, fit_prompt: bool, fit_generation: bool) -> Sizes:
        """Shrink the sizes that may change until prompt and reply fit `context` tokens."""
        cost = await self.prompt_cost()
        try:
            sizes = fit_sizes(context, cost, self.prompt_words, self.max_tokens,
                              fit_prompt=fit_prompt, fit_generation=fit_generation)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        self.prompt_words, self.max_tokens = sizes.prompt_words, sizes.max_tokens
        return sizes

    async def level(self, streams: int) -> list[StreamSample]:
        """`streams` requests at once, with a progress line every few seconds until all have ended."""
        samples: list[StreamSample] = []
        errors: list[BenchError] = []
        received = [0]
        started = time.monotonic()

        async def one(number: int) -> None:
            prompt = build_prompt(self.prompt_words, number)
            try:
                samples.append(await stream_once(
                    self.client, self.base_url, self.model, prompt, self.max_tokens, self.headers, received))
            except BenchError as exc:  # kept, so the error reaches the user unwrapped from the task group
                errors.append(exc)

        async def tick() -> None:
            while True:
                await anyio.sleep(PROGRESS_SECONDS)
                self.progress(f"{self.model}: {streams} stream(s): {time.monotonic() - started:.0f}s, "
                              f"{received[0]} of {streams * self.max_tokens} chunks received")

        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            async with anyio.create_task_group() as requests:
                for _ in range(streams):
                    requests.start_soon(one, next(self.numbers))
            tg.cancel_scope.cancel()
        if errors:
            raise errors[0]
        return samples


async def run_bench(
    base_url: str,
    model: str,
    levels: list[int],
    *,
    max_tokens: int,
    prompt_words: int,
    api_key: str | None,
    progress: Progress,
    room: ModelRoom | None = None,
    fit_prompt: bool = False,
    fit_generation: bool = False,
) -> dict[str, Any]:
    """Measure each level in `levels` (after one warm-up request) and return the result to store.

    With the model's `room` known, the prompt (`fit_prompt`) and the generation (`fit_generation`)
    shrink where they would not fit its context, and levels with more streams than its slots say
    how many waited. The result has `headline`, `measured_at`, `rows`, how the tokens were counted
    and `notes` on what was shrunk or waited; the caller adds the engine's name.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 1, max_keepalive_connections=max(levels) + 1)
    rows: list[BenchRow] = []
    sources: set[str] = set()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=REQUEST_TIMEOUT_S), limits=limits) as client:
        run = _Run(client, base_url, model, headers, max_tokens, prompt_words, progress)
        context = room.context if room is not None else None
        sizes = None
        if room is not None and context is not None and (fit_prompt or fit_generation):
            progress(f"{model}: measuring its prompt tokens, to fit its {context}-token context (from {room.source})")
            sizes = await run.fit(context, fit_prompt=fit_prompt, fit_generation=fit_generation)
            if sizes.prompt_shrunk or sizes.generation_shrunk:
                progress(f"{model}: {run.prompt_words}-word prompt, {run.max_tokens} tokens generated per stream")
        progress(f"{model}: warm-up request")
        await run.warm_up()
        slots = room.slots if room is not None else None
        for streams in levels:
            progress(f"{model}: {streams} concurrent stream{'s' if streams != 1 else ''} of {run.max_tokens} tokens")
            started = time.monotonic()
            samples = await run.level(streams)
            row = summarize(streams, samples, slots)
            sources.update(s.tokens_from for s in samples)
            rows.append(row)
            progress(f"{model}: {streams} stream(s): {format_rate(row.gen_tps_total)} tok/s gen in total "
                     f"({time.monotonic() - started:.1f}s)")
    single = next((row for row in rows if row.streams == 1), rows[0])
    notes = [note for note in (
        shrink_note(context, single.prompt_tokens, run.max_tokens, sizes) if context and sizes else None,
        *(queue_note(row.streams, slots) for row in rows),
    ) if note]
    return {
        "model": model,
        "headline": headline(single),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tokens_from": "+".join(sorted(sources)),
        "prompt_tokens": single.prompt_tokens,
        "max_tokens": run.max_tokens,
        "context": context,
        "slots": slots,
        "notes": notes,
        "proxy": base_url,
        "rows": [asdict(row) for row in rows],
    }
