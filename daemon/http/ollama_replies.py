"""An engine's OpenAI-shaped replies in Ollama's shape. Pure: no I/O.

A whole reply (`chat_reply`, `generate_reply`, `embed_reply`, `embeddings_reply`) is one JSON
object. A streamed one goes through `StreamTranslator`, which reads the engine's server-sent
events as they arrive and writes Ollama's NDJSON: one line per piece of text, then a last line
with `"done": true`, the reason and the figures. Ollama's figures are nanoseconds and token
counts; they come from the engine's own `usage` and, from llama-server, `timings` (how long the
prompt and the generation took); where an engine gives no timings, from the clock.

Tool calls arrive from the engine in pieces (the arguments as JSON text, a few characters per
event); Ollama sends each call whole, its arguments an object, so they are gathered and sent
on one line before the last one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llmd.daemon.http.openai_errors import error_message

# finish_reason as Ollama's done_reason: it knows "stop" and "length" (a tool call is a "stop").
_DONE_REASONS = {"length": "length"}

FiguresHook = Callable[[dict[str, Any] | None, dict[str, Any] | None], None]


def created_at() -> str:
    """Now, as Ollama writes times (RFC 3339, UTC, with fractions of a second)."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Clock:
    """When one request's stages happened (`time.perf_counter_ns()`): for Ollama's durations."""

    started: int = field(default_factory=time.perf_counter_ns)  # the request arrived
    sent: int = 0  # the request went to the model (after its body was read and translated)
    load_ns: int = 0  # how long the model took to load (or wake) for it; 0 if it was ready
    first_token: int | None = None

    def durations(self, timings: dict[str, Any] | None) -> dict[str, int]:
        """total, load, prompt and generation time in nanoseconds: the engine's own figures for
        the last two where it gave them, else what the clock saw."""
        end = time.perf_counter_ns()
        sent = self.sent or self.started
        first = self.first_token if self.first_token is not None else sent + self.load_ns
        prompt_ns = max(0, first - sent - self.load_ns)
        eval_ns = max(0, end - first)
        if timings is not None:
            prompt_ms, predicted_ms = _number(timings.get("prompt_ms")), _number(timings.get("predicted_ms"))
            prompt_ns = round(prompt_ms * 1e6) if prompt_ms is not None else prompt_ns
            eval_ns = round(predicted_ms * 1e6) if predicted_ms is not None else eval_ns
        return {
            "total_duration": max(0, end - self.started),
            "load_duration": self.load_ns,
            "prompt_eval_duration": prompt_ns,
            "eval_duration": eval_ns,
        }


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _counts(usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> tuple[int, int]:
    """(prompt tokens, generated tokens): from `usage`, else llama-server's `timings`, else 0."""
    if isinstance(usage, dict):
        prompt, generated = _number(usage.get("prompt_tokens")), _number(usage.get("completion_tokens"))
        if prompt is not None or generated is not None:
            return int(prompt or 0), int(generated or 0)
    if isinstance(timings, dict):
        processed, cached = _number(timings.get("prompt_n")), _number(timings.get("cache_n"))
        return int((processed or 0) + (cached or 0)), int(_number(timings.get("predicted_n")) or 0)
    return 0, 0


def _figures(clock: Clock, usage: dict[str, Any] | None, timings: dict[str, Any] | None) -> dict[str, int]:
    """Ollama's closing figures, in the order Ollama sends them."""
    durations = clock.durations(timings if isinstance(timings, dict) else None)
    prompt, generated = _counts(usage, timings)
    return {
        "total_duration": durations["total_duration"],
        "load_duration": durations["load_duration"],
        "prompt_eval_count": prompt,
        "prompt_eval_duration": durations["prompt_eval_duration"],
        "eval_count": generated,
        "eval_duration": durations["eval_duration"],
    }


def done_reason(finish_reason: object) -> str:
    return _DONE_REASONS.get(finish_reason, "stop") if isinstance(finish_reason, str) else "stop"


def tool_call(name: str, arguments: object) -> dict[str, Any]:
    """One tool call as Ollama writes it: the arguments an object, not JSON text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            arguments = {"arguments": arguments}  # not JSON: kept as the text the model wrote
    if not isinstance(arguments, dict):
        arguments = {"arguments": arguments}
    return {"function": {"name": name, "arguments": arguments}}


def _tool_calls(calls: object) -> list[dict[str, Any]]:
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            out.append(tool_call(function["name"], function.get("arguments")))
    return out


def _first_choice(engine: dict[str, Any]) -> dict[str, Any]:
    choices = engine.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    return choice if isinstance(choice, dict) else {}


def _message(content: str, thinking: str = "", tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        message["thinking"] = thinking
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


# ----- whole replies -----


def chat_reply(engine: dict[str, Any], model: str, clock: Clock) -> dict[str, Any]:
    """A chat completion as /api/chat's reply."""
    choice = _first_choice(engine)
    said = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    message = _message(
        _string(said.get("content")), _string(said.get("reasoning_content")), _tool_calls(said.get("tool_calls"))
    )
    return {
        "model": model,
        "created_at": created_at(),
        "message": message,
        "done_reason": done_reason(choice.get("finish_reason")),
        "done": True,
        **_figures(clock, engine.get("usage"), engine.get("timings")),
    }


def generate_reply(engine: dict[str, Any], model: str, clock: Clock) -> dict[str, Any]:
    """A chat completion, or a plain one (`"raw": true`), as /api/generate's reply."""
    choice = _first_choice(engine)
    said = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    reply: dict[str, Any] = {
        "model": model,
        "created_at": created_at(),
        "response": _string(said.get("content")) if said else _string(choice.get("text")),
    }
    thinking = _string(said.get("reasoning_content"))
    if thinking:
        reply["thinking"] = thinking
    reply.update({
        "done": True,
        "done_reason": done_reason(choice.get("finish_reason")),
        **_figures(clock, engine.get("usage"), engine.get("timings")),
    })
    return reply


def _string(value: object) -> str:
    return value if isinstance(value, str) else ""


def _vectors(engine: dict[str, Any]) -> list[list[float]]:
    data = engine.get("data")
    rows = sorted(
        (row for row in data if isinstance(row, dict)) if isinstance(data, list) else [],
        key=lambda row: row.get("index", 0) if isinstance(row.get("index"), int) else 0,
    )
    return [row["embedding"] for row in rows if isinstance(row.get("embedding"), list)]


def embed_reply(engine: dict[str, Any], model: str, clock: Clock) -> dict[str, Any]:
    """An embeddings reply as /api/embed's."""
    figures = _figures(clock, engine.get("usage"), None)
    return {
        "model": model,
        "embeddings": _vectors(engine),
        "total_duration": figures["total_duration"],
        "load_duration": figures["load_duration"],
        "prompt_eval_count": figures["prompt_eval_count"],
    }


def embeddings_reply(engine: dict[str, Any]) -> dict[str, Any]:
    """An embeddings reply as the older /api/embeddings' (one prompt, one vector)."""
    vectors = _vectors(engine)
    return {"embedding": vectors[0] if vectors else []}


def engine_error(status: int, body: bytes) -> str:
    """The message of an engine's error reply, whatever its shape."""
    return error_message(status, body, unstated=f"the engine answered HTTP {status}")


# ----- streamed replies -----


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class StreamTranslator:
    """An engine's stream of server-sent events, as Ollama's NDJSON lines.

    `feed` takes the bytes as they arrive (events may be cut anywhere) and returns the lines
    they complete; `finish` returns the last line, if the stream did not already end. The
    engine's `usage` and `timings` go to `on_figures` as well, for the metrics.
    """

    def __init__(self, model: str, clock: Clock, *, chat: bool, on_figures: FiguresHook | None = None) -> None:
        self.model = model
        self.clock = clock
        self.chat = chat
        self._on_figures = on_figures
        self._pending = b""
        self._finish_reason: object = None
        self._usage: dict[str, Any] | None = None
        self._timings: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, str]] = {}  # tool calls being gathered, by index
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        if self.ended:
            return b""
        self._pending += data
        out = []
        while not self.ended:
            # An event ends at a blank line; engines write "\n\n", the format allows "\r\n" too.
            cut = min((i for i in (self._pending.find(b"\n\n"), self._pending.find(b"\r\n\r\n")) if i >= 0), default=-1)
            if cut < 0:
                break
            event, self._pending = self._pending[:cut], self._pending[cut:].lstrip(b"\r\n")
            out.append(self._event(event))
        return b"".join(out)

    def finish(self) -> bytes:
        """The last line, for a stream that ended without its `[DONE]`."""
        if self.ended:
            return b""
        tail = self._event(self._pending) if self._pending.strip() else b""
        return tail + (b"" if self.ended else self._done())

    def _event(self, event: bytes) -> bytes:
        data = b"\n".join(
            line[5:].removeprefix(b" ") for line in event.replace(b"\r\n", b"\n").split(b"\n") if line.startswith(b"data:")
        )
        if not data:
            return b""  # a comment or keep-alive
        if data.strip() == b"[DONE]":
            return self._done()
        try:
            chunk = json.loads(data)
        except ValueError:
            return b""  # not JSON: nothing Ollama's clients could use
        if not isinstance(chunk, dict):
            return b""
        if chunk.get("error") is not None:
            self.ended = True
            return _line({"error": engine_error(500, data)})
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self._timings = chunk["timings"]
        choice = _first_choice(chunk)
        if choice.get("finish_reason") is not None:
            self._finish_reason = choice["finish_reason"]
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else None
        if delta is not None:
            self._gather_calls(delta.get("tool_calls"))
            text, thinking = _string(delta.get("content")), _string(delta.get("reasoning_content"))
        else:
            text, thinking = _string(choice.get("text")), ""
        if not text and not thinking:
            return b""
        if self.clock.first_token is None:
            self.clock.first_token = time.perf_counter_ns()
        return _line(self._piece(text, thinking))

    def _piece(self, text: str, thinking: str = "", tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        piece: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.chat:
            piece["message"] = _message(text, thinking, tool_calls)
        else:
            piece["response"] = text
            if thinking:
                piece["thinking"] = thinking
        piece["done"] = False
        return piece

    def _gather_calls(self, deltas: object) -> None:
        for position, delta in enumerate(deltas if isinstance(deltas, list) else []):
            if not isinstance(delta, dict):
                continue
            index = delta.get("index") if isinstance(delta.get("index"), int) else position
            call = self._calls.setdefault(index, {"name": "", "arguments": ""})
            function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
            call["name"] += _string(function.get("name"))
            call["arguments"] += _string(function.get("arguments"))

    def _done(self) -> bytes:
        self.ended = True
        if self._on_figures is not None:
            self._on_figures(self._timings, self._usage)
        out = b""
        if self._calls:
            calls = [tool_call(call["name"], call["arguments"]) for _, call in sorted(self._calls.items())]
            out += _line(self._piece("", tool_calls=calls))
        last = self._piece("")
        last.update({"done": True, "done_reason": done_reason(self._finish_reason)})
        last.update(_figures(self.clock, self._usage, self._timings))
        return out + _line(last)
