"""Prometheus metrics: what the proxy served, what the manager did, and what the GPUs hold.

Three sources feed one registry per daemon (never prometheus-client's global one, so two
daemons in one process, as in tests, never share counts):

- `RequestMetrics`, an ASGI middleware around the proxy app, times and counts each request
  from the ASGI messages it passes on, and reads the engine's `timings` / `usage` from the reply
  (it also hands each finished request to the request log, request_log.py);
- the manager calls `load_finished`, `evicted` and `swap_finished` as those happen;
- `_StateCollector` reads the manager's model states and GPU report (memory and telemetry)
  when Prometheus scrapes, so nothing is updated on every change;
- `GpuEnergy` counts each reply's generated tokens to the cards its model runs on, for the
  energy per token of each card.

docs/metrics.md lists every metric with its labels.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmd.daemon.http.anthropic_errors import ANTHROPIC_ROUTES
from llmd.daemon.http.client_link import BODY_TAP_KEY, client_link
from llmd.daemon.http.gpu_energy import CardsOf, GpuEnergy
from llmd.daemon.http.ollama_errors import NDJSON, OLLAMA_ROUTES
from llmd.daemon.http.openai_errors import CLIENT_GONE, MODEL_ROUTES, MODELS_LIST_ROUTE
from llmd.daemon.http.request_log import BodyCapture, RequestLog, RequestRecord, api_of, logged_path
from llmd.daemon.http.upstream import find_header
from llmd.drivers.base import OPENAI_RESPONSES

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# The label of requests that never reached a model: malformed bodies, unknown models, /v1/models.
NO_MODEL = ""
# Paths counted under their own name; anything else is "other", so that clients probing
# random paths cannot create unbounded label values.
_ENDPOINTS = frozenset({*MODEL_ROUTES, MODELS_LIST_ROUTE, *OLLAMA_ROUTES, *ANTHROPIC_ROUTES, OPENAI_RESPONSES})
# The label of requests to a path no API of llmd's serves.
NO_API = "other"
# Replies that stream: server-sent events (OpenAI's API), or a JSON object a line (Ollama's).
_STREAM_TYPES = (b"text/event-stream", NDJSON.encode())
# Set by the proxy on the ASGI scope (through `name_model`) once a request's model is resolved
# to a profile.
MODEL_SCOPE_KEY = "llmd.model"
# Set by the proxy to the model name the request asked for, once its body is read: the request
# log shows it for requests that reached no profile (an unknown model's 404).
ASKED_MODEL_KEY = "llmd.model_asked"
# Where the request's `_Exchange` hears of it at once, so in-flight counts move to the model
# before a cold load, not after it.
_MODEL_NAMED_KEY = "llmd.model_named"
# Where a route that translates the engine's reply into another API's shape hands the engine's
# own `timings` and `usage` (see `engine_figures`): its reply no longer shows them.
_FIGURES_KEY = "llmd.engine_figures"
MIB = 1024 * 1024
# Model states as the manager names them; each model gets a 0/1 series for every one (and for
# any other state a model is seen in), so dashboards find every series even when it is 0.
STATES = ("stopped", "starting", "ready", "sleeping", "stopping", "failed")

# llama-server's `timings` and every engine's `usage` objects are small; a reply whose object
# is still not complete after this many bytes is not something to keep buffering.
MAX_CAPTURE_BYTES = 64 * 1024
_TIMINGS = b'"timings"'
_USAGE = b'"usage"'
_COLON = re.compile(r"\s*:\s*")
_DECODER = json.JSONDecoder()
_CUT_OFF = object()  # a value that continues in a later chunk

# Cold requests include a model load, so the time buckets reach minutes.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_LOAD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
_STOP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
# Saving and restoring a prompt cache: milliseconds for a small one, a few seconds at most (a
# save is cut off at the profile's kv_save_timeout).
_KV_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

ModelRows = Callable[[], list[dict[str, Any]]]
GpuReport = Callable[[], dict[str, Any]]


class Metrics:
    """The daemon's metrics: one registry, the manager's hooks, and the `/metrics` route.

    `models` and `gpus` are read at scrape time (the manager's `status` and `gpu_report`);
    `cards_of` names the cards a model runs on, so that its generated tokens count to them.
    With `enabled` false, nothing is served, but the hooks still work, so callers need no checks.
    """

    def __init__(self, enabled: bool, models: ModelRows, gpus: GpuReport, cards_of: CardsOf | None = None) -> None:
        self.enabled = enabled
        # Without this, every counter and histogram also exports a `_created` timestamp series,
        # doubling what Prometheus stores for nothing a dashboard uses. (A process-wide switch.)
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llmd_requests", "Proxied requests, by the HTTP status sent", ["model", "endpoint", "code"], registry=r
        )
        self.errors = Counter(
            "llmd_request_errors", "Requests that failed: 4xx/5xx replies, broken streams, clients gone",
            ["model", "endpoint", "reason"], registry=r,
        )
        self.api_requests = Counter(
            "llmd_api_requests", "Requests by the API they used (openai, ollama, ...), by the HTTP status sent",
            ["api", "code"], registry=r,
        )
        self.in_flight = Gauge("llmd_requests_in_flight", "Requests being handled now", ["model"], registry=r)
        self.duration = Histogram(
            "llmd_request_duration_seconds", "From request arrival to the reply's last byte",
            ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "llmd_time_to_first_token_seconds", "From request arrival to the first byte of a streamed reply",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.generation_speed = Histogram(
            "llmd_generation_tokens_per_second", "Generation speed the engine reported for a reply (llama-server)",
            ["model"], buckets=_SPEED_BUCKETS, registry=r,
        )
        self.prompt_speed = Histogram(
            "llmd_prompt_tokens_per_second", "Prompt processing speed the engine reported for a reply (llama-server)",
            ["model"], buckets=_SPEED_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("llmd_prompt_tokens", "Prompt tokens the engines reported", ["model"], registry=r)
        self.completion_tokens = Counter(
            "llmd_completion_tokens", "Generated tokens the engines reported", ["model"], registry=r
        )
        self.load_duration = Histogram(
            "llmd_load_duration_seconds", "Model loads, from start to ready or failure",
            ["model", "result"], buckets=_LOAD_BUCKETS, registry=r,
        )
        self.evictions = Counter("llmd_evictions", "Models stopped to make room for another", ["model"], registry=r)
        self.eviction_duration = Histogram(
            "llmd_eviction_duration_seconds", "From stopping evicted models to their GPU memory showing released",
            buckets=_STOP_BUCKETS, registry=r,
        )
        self.parks = Counter(
            "llmd_parks", "Models put to sleep (parked) to make room for another, instead of stopped", ["model"], registry=r
        )
        self.wake_duration = Histogram(
            "llmd_wake_duration_seconds", "Parked models woken for a request, from the request to ready",
            ["model"], buckets=_LOAD_BUCKETS, registry=r,
        )
        self.swap_duration = Histogram(
            "llmd_swap_duration_seconds", "`llmctl load NEW --replace OLD`, from start to NEW ready and OLD stopped",
            ["model"], buckets=_LOAD_BUCKETS, registry=r,
        )
        self.queue_refusals = Counter(
            "llmd_queue_refusals", "Requests refused by a model's admission: its queue was full (429) or no slot came in time (503)",
            ["model", "reason"], registry=r,
        )
        # Prompt caches kept across stops (`[policy] persist_kv`).
        self.kv_saves = Counter(
            "llmd_kv_saves", "Engine slots whose prompt cache was saved before a stop, or not (skipped: past kv_save_timeout)",
            ["model", "result"], registry=r,
        )
        self.kv_restores = Counter(
            "llmd_kv_restores", "Saved prompt caches restored at a start, or dropped (failed their check, or the engine refused them)",
            ["model", "result"], registry=r,
        )
        self.kv_saved_bytes = Counter("llmd_kv_saved_bytes", "Bytes of prompt cache saved", ["model"], registry=r)
        self.kv_restored_bytes = Counter("llmd_kv_restored_bytes", "Bytes of prompt cache restored", ["model"], registry=r)
        self.kv_saved_tokens = Counter("llmd_kv_saved_tokens", "Tokens of prompt cache saved", ["model"], registry=r)
        self.kv_restored_tokens = Counter(
            "llmd_kv_restored_tokens", "Tokens of prompt cache restored: prompt the engine need not process again",
            ["model"], registry=r,
        )
        self.kv_save_duration = Histogram(
            "llmd_kv_save_duration_seconds", "Each slot's save, from the request to the file checked and recorded",
            ["model"], buckets=_KV_BUCKETS, registry=r,
        )
        self.kv_restore_duration = Histogram(
            "llmd_kv_restore_duration_seconds", "Each slot's restore into a starting engine",
            ["model"], buckets=_KV_BUCKETS, registry=r,
        )
        self.gpu_energy = GpuEnergy(cards_of)
        r.register(_StateCollector(models, gpus, self.gpu_energy))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: every proxied request needs several, and
        prometheus_client checks and locks on each call. Label values are model names (from the
        profiles), endpoints and status codes, so the cache stays small."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    # ----- manager hooks -----

    def load_finished(self, name: str, seconds: float, ok: bool) -> None:
        self.load_duration.labels(name, "ready" if ok else "failed").observe(seconds)

    def evicted(self, names: Sequence[str], seconds: float) -> None:
        for name in names:
            self.evictions.labels(name).inc()
        self.eviction_duration.observe(seconds)

    def parked(self, name: str) -> None:
        self.parks.labels(name).inc()

    def woke(self, name: str, seconds: float) -> None:
        self.wake_duration.labels(name).observe(seconds)

    def swap_finished(self, name: str, seconds: float) -> None:
        self.swap_duration.labels(name).observe(seconds)

    def kv_saved(self, name: str, tokens: int, size: int, seconds: float) -> None:
        self.kv_saves.labels(name, "saved").inc()
        self.kv_saved_tokens.labels(name).inc(tokens)
        self.kv_saved_bytes.labels(name).inc(size)
        self.kv_save_duration.labels(name).observe(seconds)

    def kv_not_saved(self, name: str, result: str) -> None:
        """A slot of `name` was not saved: `skipped` (no time left) or `failed`."""
        self.kv_saves.labels(name, result).inc()

    def kv_restored(self, name: str, tokens: int, size: int, seconds: float) -> None:
        self.kv_restores.labels(name, "restored").inc()
        self.kv_restored_tokens.labels(name).inc(tokens)
        self.kv_restored_bytes.labels(name).inc(size)
        self.kv_restore_duration.labels(name).observe(seconds)

    def kv_not_restored(self, name: str, result: str) -> None:
        """A save of `name` was not restored: `dropped` (failed its check, or the engine refused it)."""
        self.kv_restores.labels(name, result).inc()

    def queue_refused(self, name: str, reason: str) -> None:
        """A request for `name` was refused: `full` (its queue was full) or `timeout`."""
        self.queue_refusals.labels(name, reason).inc()

    # ----- serving -----

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format. Call it on the event loop: the collector
        reads manager state, which only the event loop may touch."""
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        # An async endpoint runs on the event loop; a sync one would run in a worker thread.
        return Response(self.exposition(), media_type=CONTENT_TYPE_LATEST)

    def routes(self) -> list[Route]:
        """`GET /metrics`, or nothing when `[metrics] enabled = false`."""
        return [Route(METRICS_PATH, self.endpoint, methods=["GET"])] if self.enabled else []

    def instrument(self, app: ASGIApp, requests: RequestLog | None = None) -> ASGIApp:
        """`app` with its requests counted and kept in `requests`; `app` itself when metrics are
        off and no request log is kept."""
        kept = requests if requests is not None and requests.enabled else None
        if not self.enabled and kept is None:
            return app
        return RequestMetrics(app, self, kept)


class _StateCollector(Collector):
    """Model states, GPU memory and telemetry, read from the manager at scrape time."""

    def __init__(self, models: ModelRows, gpus: GpuReport, energy: GpuEnergy) -> None:
        self._models = models
        self._gpus = gpus
        self._energy = energy

    def collect(self) -> Iterable[Metric]:
        ok = GaugeMetricFamily("llmd_scrape_source_ok", "1 if the source could be read for this scrape", labels=["source"])
        for source, families in (("models", self._model_families), ("gpus", self._gpu_families)):
            try:
                yield from families()
                ok.add_metric([source], 1)
            except Exception:  # a failing NVML read must not cost the request metrics
                log.exception("metrics: reading %s failed", source)
                ok.add_metric([source], 0)
        yield ok

    def _model_families(self) -> list[Metric]:
        state = GaugeMetricFamily("llmd_model_state", "1 for the state each model is in, 0 for the others", labels=["model", "state"])
        rows = self._models()
        states = STATES + tuple(sorted({row["state"] for row in rows} - set(STATES)))
        queued = GaugeMetricFamily("llmd_queue_depth", "Requests waiting for a slot on the model", labels=["model"])
        active = GaugeMetricFamily(
            "llmd_slots_busy", "Slots taken on the model: requests at its engine or waiting for it to load", labels=["model"]
        )
        for row in rows:
            for name in states:
                state.add_metric([row["model"], name], 1 if row["state"] == name else 0)
            queued.add_metric([row["model"]], row.get("queued", 0))
            active.add_metric([row["model"]], row.get("slots_busy", 0))
        return [state, queued, active]

    def _gpu_families(self) -> list[Metric]:
        labels = ["gpu"]
        info = GaugeMetricFamily("llmd_gpu_info", "Each card's name and UUID (always 1)", labels=["gpu", "uuid", "name"])
        total = GaugeMetricFamily("llmd_gpu_memory_total_bytes", "Card memory", labels=labels)
        free = GaugeMetricFamily("llmd_gpu_memory_free_bytes", "Card memory free now", labels=labels)
        foreign = GaugeMetricFamily("llmd_gpu_memory_foreign_bytes", "Card memory held by processes that are not llmd's engines", labels=labels)
        placed = GaugeMetricFamily("llmd_gpu_memory_placed_bytes", "Card memory llmd has placed a model on", labels=["gpu", "model"])
        cards = self._gpus()["gpus"]
        for card in cards:
            gpu = str(card["index"])
            info.add_metric([gpu, str(card["uuid"]), str(card["name"])], 1)
            total.add_metric([gpu], card["total_mib"] * MIB)
            free.add_metric([gpu], card["free_mib"] * MIB)
            foreign.add_metric([gpu], card["foreign_mib"] * MIB)
            for claim in card["models"]:
                placed.add_metric([gpu, claim["model"]], claim["vram_mib"] * MIB)
        return [info, total, free, foreign, placed, *self._telemetry_families(cards)]

    def _telemetry_families(self, cards: list[dict[str, Any]]) -> list[Metric]:
        """Each reading a card gives; a card without one has no sample in that family (never NaN)."""
        labels = ["gpu"]
        readings = [
            # (family, the report's key, what to divide it by for the metric's unit)
            (GaugeMetricFamily("llmd_gpu_temperature_celsius", "GPU temperature", labels=labels), "temperature_c", 1),
            (GaugeMetricFamily("llmd_gpu_power_watts", "Power draw now", labels=labels), "power_w", 1),
            (GaugeMetricFamily("llmd_gpu_power_limit_watts", "Power limit the driver enforces", labels=labels), "power_limit_w", 1),
            (GaugeMetricFamily("llmd_gpu_utilization_ratio", "Share of the last sample period a kernel ran (0-1)", labels=labels),
             "utilization_gpu_pct", 100),
            (GaugeMetricFamily("llmd_gpu_memory_utilization_ratio", "Share of the last sample period card memory was read or written (0-1)",
                               labels=labels), "utilization_memory_pct", 100),
            (GaugeMetricFamily("llmd_gpu_fan_speed_ratio", "Fan speed, as a share of its maximum (0-1)", labels=labels), "fan_pct", 100),
            (CounterMetricFamily("llmd_gpu_energy_joules", "Energy the card used since its driver was loaded", labels=labels), "energy_j", 1),
        ]
        tokens = CounterMetricFamily("llmd_gpu_completion_tokens", "Generated tokens of the models placed on the card", labels=labels)
        per_token = GaugeMetricFamily(
            "llmd_gpu_energy_per_token_joules", "Card energy per token generated on it, since llmd first read its energy counter",
            labels=labels,
        )
        counted = self._energy.tokens()
        for card in cards:
            gpu = str(card["index"])
            for family, key, divisor in readings:
                value = card.get(key)
                if value is not None:
                    family.add_metric([gpu], value / divisor)
            tokens.add_metric([gpu], counted.get(card["index"], 0.0))
            energy = card.get("energy_j")
            spent = None if energy is None else self._energy.joules_per_token(card["index"], energy)
            if spent is not None:
                per_token.add_metric([gpu], spent)
        return [family for family, _, _ in readings] + [tokens, per_token]


# ----- requests -----


def _value_after(text: str, key: str) -> object:
    """The JSON value after `"key":` in `text`: None if the key is absent, _CUT_OFF if the value
    is incomplete (it goes on in the next chunk, or is not JSON at all)."""
    at = text.find(key)
    if at < 0:
        return None
    colon = _COLON.match(text, at + len(key))
    if colon is None:
        return _CUT_OFF
    try:
        value, _ = _DECODER.raw_decode(text, colon.end())
    except json.JSONDecodeError:
        return _CUT_OFF
    return value


def _values_after(text: str, key: str) -> list[object]:
    """The JSON value after each `"key":` in `text`, in order (`_value_after` for every one):
    an Anthropic stream may carry two `usage` objects in one chunk. An occurrence followed by no
    colon is a string value, not a key, and is passed over."""
    values: list[object] = []
    at = text.find(key)
    while at >= 0:
        after = at + len(key)
        colon = _COLON.match(text, after)
        if colon is None:
            if not text[after:].strip():
                values.append(_CUT_OFF)  # the colon is in the next chunk
                break
            at = text.find(key, after)
            continue
        try:
            value, end = _DECODER.raw_decode(text, colon.end())
        except json.JSONDecodeError:
            values.append(_CUT_OFF)
            break
        values.append(value)
        at = text.find(key, end)
    return values


def _number(values: dict[str, Any], key: str) -> float | None:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


class _EngineReport:
    """The `timings` (llama-server) and `usage` (every engine) objects found in one reply.

    Only chunks that contain one of the two keys are decoded, and only from the key on; the
    object may continue in later chunks, which are then appended until it is complete."""

    __slots__ = ("capture", "timings", "usage")

    def __init__(self) -> None:
        self.capture: bytearray | None = None
        self.timings: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None

    def feed(self, body: bytes) -> None:
        if self.capture is not None:
            self.capture += body
        else:
            at_timings = body.find(_TIMINGS)
            at_usage = body.find(_USAGE)
            if at_timings < 0 and at_usage < 0:
                return
            start = at_usage if at_timings < 0 else at_timings if at_usage < 0 else min(at_timings, at_usage)
            self.capture = bytearray(body[start:])
        self._read()

    def _read(self) -> None:
        assert self.capture is not None
        text = self.capture.decode("utf-8", "replace")
        timings = _value_after(text, '"timings"')
        usages = _values_after(text, '"usage"')
        if timings is _CUT_OFF or any(usage is _CUT_OFF for usage in usages):
            if len(self.capture) > MAX_CAPTURE_BYTES:
                self.capture = None  # not a reply we can read; keep what was found before
            return
        self.capture = None
        # Later values replace earlier ones: llama-server may send timings with every chunk.
        if isinstance(timings, dict):
            self.timings = timings
        for usage in usages:
            if isinstance(usage, dict):
                # Merged, key by key: an Anthropic stream counts the input tokens in its first
                # event and the output tokens in its last.
                self.usage = usage if self.usage is None else {**self.usage, **usage}

    def record(self, metrics: Metrics, model: str) -> None:
        if self.timings is not None:
            for histogram, key in ((metrics.generation_speed, "predicted_per_second"), (metrics.prompt_speed, "prompt_per_second")):
                speed = _number(self.timings, key)
                if speed:
                    metrics.child(histogram, model).observe(speed)
        prompt, completion = self.token_counts()
        if prompt:
            metrics.child(metrics.prompt_tokens, model).inc(prompt)
        if completion:
            metrics.child(metrics.completion_tokens, model).inc(completion)
            metrics.gpu_energy.generated(model, completion)

    def token_counts(self) -> tuple[float | None, float | None]:
        """From `usage`; without it (llama-server's streams), from `timings`, where the prompt
        is the part processed now plus the part reused from the cache."""
        if self.usage is not None:
            prompt, completion = _number(self.usage, "prompt_tokens"), _number(self.usage, "completion_tokens")
            if prompt is None and completion is None:
                # Anthropic's Messages and OpenAI's Responses count input and output tokens;
                # Anthropic's input leaves out the prompt read from (or written to) the cache.
                given = _number(self.usage, "input_tokens")
                cached = [_number(self.usage, key) or 0.0 for key in ("cache_read_input_tokens", "cache_creation_input_tokens")]
                prompt = None if given is None else given + sum(cached)
                completion = _number(self.usage, "output_tokens")
            return prompt, completion
        if self.timings is not None:
            processed, cached = _number(self.timings, "prompt_n"), _number(self.timings, "cache_n")
            prompt = None if processed is None else processed + (cached or 0.0)
            return prompt, _number(self.timings, "predicted_n")
        return None, None


def name_model(scope: Scope, model: str) -> None:
    """Label the request in `scope` with the profile it reached, from now on."""
    scope[MODEL_SCOPE_KEY] = model
    learn = scope.get(_MODEL_NAMED_KEY)
    if learn is not None:
        learn()


def engine_figures(scope: Scope, timings: dict[str, Any] | None, usage: dict[str, Any] | None) -> None:
    """Count the engine's `timings` and `usage` for the request in `scope`: for routes whose
    reply is the engine's translated into another API's shape, which the metrics cannot read."""
    given = scope.get(_FIGURES_KEY)
    if given is not None:
        given(timings, usage)


class _Exchange:
    """One request on its way through `RequestMetrics`: sees its ASGI messages, records it at the
    end in the metrics (when they are on) and in the request log (`requests`, when kept)."""

    __slots__ = (
        "_receive",
        "_send",
        "client_gone",
        "counting",
        "complete",
        "endpoint",
        "figures",
        "first_byte",
        "last_body",
        "metrics",
        "model",
        "report",
        "requests",
        "scope",
        "started",
        "status",
        "stream",
    )

    def __init__(
        self, metrics: Metrics, scope: Scope, receive: Receive, send: Send, requests: RequestLog | None = None
    ) -> None:
        self.metrics = metrics
        self.counting = metrics.enabled
        self.requests = requests
        self.scope = scope
        self._receive = receive
        self._send = send
        self.started = time.perf_counter()
        path = scope["path"]
        self.endpoint = path if path in _ENDPOINTS else "other"
        self.model: str | None = None  # counted under NO_MODEL until the proxy names it
        self.status = 0
        self.stream = False
        self.first_byte: float | None = None
        self.complete = False
        self.client_gone = False
        self.last_body = b""
        # Only successful replies are read for the engine's figures.
        self.report: _EngineReport | None = None
        # The engine's figures as a translating route handed them (`engine_figures`).
        self.figures: _EngineReport | None = None
        scope[BODY_TAP_KEY] = self.saw_body
        scope[_MODEL_NAMED_KEY] = self._learn_model
        scope[_FIGURES_KEY] = self._take_figures
        if self.counting:
            metrics.child(metrics.in_flight, NO_MODEL).inc()

    def _learn_model(self) -> None:
        model = self.scope.get(MODEL_SCOPE_KEY)
        if model is not None and self.model is None:
            self.model = model
            if self.counting:
                self.metrics.child(self.metrics.in_flight, NO_MODEL).dec()
                self.metrics.child(self.metrics.in_flight, model).inc()

    def _take_figures(self, timings: dict[str, Any] | None, usage: dict[str, Any] | None) -> None:
        figures = self.figures = self.figures or _EngineReport()
        figures.timings = timings if timings is not None else figures.timings
        figures.usage = usage if usage is not None else figures.usage

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.client_gone = True
        return message

    def saw_body(self, body: bytes) -> None:
        """One piece of the reply's body on its way to the client; also called by the proxy for
        the pieces it writes past `send` (see `client_link`)."""
        # The hot path: called for every chunk of every reply, so each chunk costs a check or
        # two and, for a successful reply, two byte searches.
        if self.first_byte is None:
            self.first_byte = time.perf_counter()
        if self.report is not None:
            self.report.feed(body)
        self.last_body = body

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.saw_body(body)
            if not message.get("more_body", False):
                self.complete = True
        elif kind == "http.response.start":
            self._start(message)
        # uvicorn's `send` does not fail once the client is gone: the disconnect is seen in receive().
        await self._send(message)

    def _start(self, message: Message) -> None:
        self._learn_model()
        self.status = message["status"]
        if 200 <= self.status < 300 and self.model is not None:
            self.report = _EngineReport()
            content_type = find_header(message.get("headers", []), b"content-type") or b""
            self.stream = content_type.startswith(_STREAM_TYPES)

    def finish(self) -> None:
        """Record the request; called once, however it ended."""
        if not self.client_gone:
            # Under llmd's own server the proxy learns of a disconnect from the connection, so
            # nobody may have read the http.disconnect message.
            link = client_link(self.scope)
            self.client_gone = link is not None and link.disconnected
        end = time.perf_counter()
        code = self.status or (CLIENT_GONE if self.client_gone else 500)
        reason = self._failure(code)
        if self.figures is not None and self.report is not None:
            self.report = self.figures
        if self.counting:
            self._count(code, reason, end)
        if self.requests is not None:
            self.requests.add(self._record(code, reason, end))

    def _count(self, code: int, reason: str | None, end: float) -> None:
        m = self.metrics
        model = self.model if self.model is not None else NO_MODEL
        m.child(m.in_flight, model).dec()
        m.child(m.requests, model, self.endpoint, str(code)).inc()
        m.child(m.api_requests, api_of(self.scope["path"]) or NO_API, str(code)).inc()
        m.child(m.duration, model, self.endpoint).observe(end - self.started)
        if reason is not None:
            m.child(m.errors, model, self.endpoint, reason).inc()
        if self.report is not None:
            if self.stream and self.first_byte is not None:
                m.child(m.ttft, model).observe(self.first_byte - self.started)
            self.report.record(m, model)

    def _record(self, code: int, reason: str | None, end: float) -> RequestRecord:
        """The request as the request log keeps it: the same facts the metrics count."""
        scope = self.scope
        report = self.report
        prompt, completion = report.token_counts() if report is not None else (None, None)
        ttft = None
        if report is not None and self.stream and self.first_byte is not None:
            ttft = round(self.first_byte - self.started, 4)
        client = scope.get("client")
        duration = end - self.started
        return RequestRecord(
            time=round(time.time() - duration, 3),
            api=api_of(scope["path"]),
            method=scope["method"],
            path=logged_path(scope["path"]),
            model=self.model if self.model is not None else scope.get(ASKED_MODEL_KEY),
            status=code,
            client=client[0] if client else None,
            stream=self.stream,
            ttft_s=ttft,
            prompt_tokens=None if prompt is None else int(prompt),
            completion_tokens=None if completion is None else int(completion),
            duration_s=round(duration, 4),
            error=reason,
        )

    def _failure(self, code: int) -> str | None:
        if code == CLIENT_GONE:
            return "client_gone"
        if code >= 500:
            return "server_error"
        if code >= 400:
            return "client_error"
        if self.complete and not (self.stream and b'"error"' in self.last_body):
            return None
        # A reply that started well but did not end well. The proxy ends a stream the engine
        # broke off with an error event, as engines do with their own errors mid-stream.
        return "client_gone" if self.client_gone and not self.complete else "stream_broken"


class _BodyKeepingExchange(_Exchange):
    """An `_Exchange` that also keeps the first bytes of the request's and the reply's bodies for
    the request log (`[server] log_bodies`); a class of its own, so that without it no chunk
    pays for it."""

    __slots__ = ("reply_body", "request_body")

    def __init__(
        self, metrics: Metrics, scope: Scope, receive: Receive, send: Send, requests: RequestLog | None = None
    ) -> None:
        super().__init__(metrics, scope, receive, send, requests)
        self.request_body = BodyCapture()
        self.reply_body = BodyCapture()

    async def receive(self) -> Message:
        message = await super().receive()
        if message["type"] == "http.request":
            self.request_body.feed(message.get("body", b""))
        return message

    def saw_body(self, body: bytes) -> None:
        super().saw_body(body)
        self.reply_body.feed(body)

    def _record(self, code: int, reason: str | None, end: float) -> RequestRecord:
        record = super()._record(code, reason, end)
        record.request_body = self.request_body.text()
        record.response_body = self.reply_body.text()
        return record


class RequestMetrics:
    """ASGI middleware: counts and times each HTTP request to `app`, except scrapes of /metrics,
    and keeps it in `requests` (the request log) when given one."""

    def __init__(self, app: ASGIApp, metrics: Metrics, requests: RequestLog | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.requests = requests if requests is not None and requests.enabled else None
        self._exchange = _BodyKeepingExchange if self.requests is not None and self.requests.keep_bodies else _Exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        exchange = self._exchange(self.metrics, scope, receive, send, self.requests)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        finally:
            exchange.finish()
