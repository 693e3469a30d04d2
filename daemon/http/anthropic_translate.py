"""Anthropic's Messages in OpenAI's chat completions, and back: for engines that do not serve
`/v1/messages` themselves (the driver's `native_routes`).

A request becomes one chat completions request: the system prompt a system message, content
blocks OpenAI's content parts (an image a data URL), `tool_use` blocks the assistant's
`tool_calls`, `tool_result` blocks `tool` messages, Anthropic's tools and `tool_choice` OpenAI's.
The engine's reply becomes a message with text and `tool_use` blocks; a streamed reply becomes
Anthropic's events (`StreamTranslator`). Everything here is pure: no I/O, no llmd state.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

# Anthropic's stop reasons for OpenAI's finish reasons.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Sampling settings both APIs name alike. `top_k` is not OpenAI's, but every engine llmd runs
# reads it from a chat completions request.
_SAME_NAMES = ("max_tokens", "temperature", "top_p", "top_k")


class TranslationError(ValueError):
    """The request cannot be put in OpenAI's terms; the message says what to change."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


# ----- the request -----


def to_openai_request(payload: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat completions request for the Messages request `payload`, for the engine serving `model`."""
    request: dict[str, Any] = {"model": model, "messages": _messages(payload)}
    for name in _SAME_NAMES:
        if payload.get(name) is not None:
            request[name] = payload[name]
    stops = payload.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise TranslationError("'stop_sequences' must be an array of strings", "stop_sequences")
        if stops:
            request["stop"] = stops
    if payload.get("stream"):
        request["stream"] = True
        # Without it, OpenAI-style engines send no token counts in a stream.
        request["stream_options"] = {"include_usage": True}
    tools = payload.get("tools")
    if tools:
        request["tools"] = [_tool(tool, i) for i, tool in enumerate(_array(tools, "tools"))]
    choice = payload.get("tool_choice")
    if choice is not None:
        request.update(_tool_choice(choice))
    return request


def _array(value: object, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise TranslationError(f"'{param}' must be an array", param)
    return value


def _object(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TranslationError(f"'{param}' must be an object", param)
    return value


def _messages(payload: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    system = payload.get("system")
    if system is not None:
        text = _system_text(system)
        if text:
            messages.append({"role": "system", "content": text})
    if "messages" not in payload:
        raise TranslationError("request body has no 'messages' field", "messages")
    for i, message in enumerate(_array(payload["messages"], "messages")):
        where = f"messages.{i}"
        message = _object(message, where)
        role = message.get("role")
        if role == "user":
            messages.extend(_user_messages(message.get("content"), where))
        elif role == "assistant":
            messages.append(_assistant_message(message.get("content"), where))
        else:
            raise TranslationError(f"'{where}.role' must be \"user\" or \"assistant\", not {role!r}", f"{where}.role")
    return messages


def _system_text(system: object) -> str:
    if isinstance(system, str):
        return system
    blocks = _array(system, "system")
    texts = []
    for i, block in enumerate(blocks):
        block = _object(block, f"system.{i}")
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise TranslationError(f"'system.{i}' must be a text block", f"system.{i}")
        texts.append(block["text"])
    return "\n\n".join(texts)


def _blocks(content: object, where: str) -> list[dict[str, Any]]:
    """A message's content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [_object(block, f"{where}.content.{i}") for i, block in enumerate(_array(content, f"{where}.content"))]


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise TranslationError(f"'{where}.text' must be a string", f"{where}.text")
    return text


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = _object(block.get("source"), f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if not isinstance(media_type, str) or not isinstance(data, str):
            raise TranslationError(f"'{where}.source' needs a 'media_type' and 'data' string", f"{where}.source")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise TranslationError(f"'{where}.source.type' must be \"base64\" or \"url\", not {kind!r}", f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """OpenAI content: a plain string when it is all text (what every engine reads), else parts."""
    if all(part["type"] == "text" for part in parts):
        return "\n\n".join(part["text"] for part in parts)
    return parts


def _user_messages(content: object, where: str) -> list[dict[str, Any]]:
    """One user message as OpenAI messages: a `tool` message for each tool result, then the
    rest of its content as a user message (OpenAI wants the tool results right after the
    assistant's calls)."""
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(_blocks(content, where)):
        at = f"{where}.content.{i}"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_result":
            result, images = _tool_result(block, at)
            tool_messages.append(result)
            parts.extend(images)  # a tool message carries text only: its images follow as the user's
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise TranslationError(f"content blocks of type {kind!r} ('{at}') cannot be sent to this engine", at)
    messages = tool_messages
    if parts:
        messages.append({"role": "user", "content": _content(parts)})
    return messages


def _tool_result(block: dict[str, Any], where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise TranslationError(f"'{where}.tool_use_id' must be a string", f"{where}.tool_use_id")
    content = block.get("content", "")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for i, part in enumerate(_blocks(content, where)):
        if part.get("type") == "text":
            texts.append(_text(part, f"{where}.content.{i}"))
        elif part.get("type") == "image":
            images.append(_image_part(part, f"{where}.content.{i}"))
        else:
            raise TranslationError(f"'{where}.content.{i}' must be a text or image block", f"{where}.content.{i}")
    text = "\n\n".join(texts)
    if block.get("is_error"):
        text = f"Error: {text}"  # OpenAI's tool messages have no error flag: say it in words
    return {"role": "tool", "tool_call_id": call_id, "content": text}, images


def _assistant_message(content: object, where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(_blocks(content, where)):
        at = f"{where}.content.{i}"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "tool_use":
            name, arguments = block.get("name"), block.get("input", {})
            if not isinstance(name, str):
                raise TranslationError(f"'{at}.name' must be a string", f"{at}.name")
            call_id = block.get("id") if isinstance(block.get("id"), str) else tool_use_id()
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the engine's own reasoning of an earlier turn: chat templates drop it anyway
        else:
            raise TranslationError(f"content blocks of type {kind!r} ('{at}') cannot be sent to this engine", at)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: object, i: int) -> dict[str, Any]:
    where = f"tools.{i}"
    tool = _object(tool, where)
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise TranslationError(f"'{where}' is Anthropic's server tool {kind!r}, which a local engine cannot run", where)
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise TranslationError(f"'{where}.name' must be a non-empty string", f"{where}.name")
    function: dict[str, Any] = {"name": name, "parameters": tool.get("input_schema") or {"type": "object", "properties": {}}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: object) -> dict[str, Any]:
    choice = _object(choice, "tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        chosen: Any = "auto"
    elif kind == "any":
        chosen = "required"
    elif kind == "none":
        chosen = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chosen = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise TranslationError(
            "'tool_choice.type' must be \"auto\", \"any\", \"none\" or \"tool\" (with a 'name')", "tool_choice"
        )
    translated: dict[str, Any] = {"tool_choice": chosen}
    if choice.get("disable_parallel_tool_use") is True:
        translated["parallel_tool_calls"] = False
    return translated


# ----- the reply -----


def stop_reason(finish_reason: object, called_tools: bool) -> str:
    if called_tools:
        return "tool_use"
    return _STOP_REASONS.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"


def _count(usage: dict[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def to_anthropic_usage(usage: object) -> dict[str, int]:
    """OpenAI's `usage` in Anthropic's terms, where `input_tokens` leaves out the prompt tokens
    read from the cache (`cache_read_input_tokens`)."""
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = _count(usage, "prompt_tokens")
    details = usage.get("prompt_tokens_details")
    cached = min(prompt, _count(details, "cached_tokens")) if isinstance(details, dict) else 0
    return {
        "input_tokens": prompt - cached,
        "output_tokens": _count(usage, "completion_tokens"),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _arguments(text: object) -> Any:
    """A tool call's arguments as the `input` object; text that is not a JSON object is kept
    whole under "arguments", so nothing the model wrote is lost."""
    if isinstance(text, dict):
        return text
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}


def to_anthropic_message(reply: dict[str, Any], model: str) -> dict[str, Any]:
    """The Messages reply for the engine's chat completions `reply`."""
    choices = reply.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else {}
        call_id = call.get("id") if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"] else tool_use_id()
        content.append({
            "type": "tool_use",
            "id": call_id,
            "name": function.get("name", ""),
            "input": _arguments(function.get("arguments")),
        })
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason"), bool(calls)),
        "stop_sequence": None,
        "usage": to_anthropic_usage(reply.get("usage")),
    }


# ----- a streamed reply -----


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class SseReader:
    """The `data:` payloads of a server-sent event stream, fed in pieces as they arrive."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, piece: bytes) -> Iterator[str]:
        self._pending += piece.replace(b"\r\n", b"\n")
        while b"\n\n" in self._pending:
            event, self._pending = self._pending.split(b"\n\n", 1)
            data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data).decode("utf-8", "replace")


def message_start(model: str) -> bytes:
    """The events that open a streamed reply: `message_start`, with the message still empty
    (the engine's token counts come at the end), and a `ping`."""
    message = {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    return sse_event("message_start", {"type": "message_start", "message": message}) + sse_event("ping", {"type": "ping"})


class StreamTranslator:
    """Turns the chunks of a streamed chat completion into Anthropic's stream events.

    `start()` gives the opening `message_start` and `ping`; `chunk(data)` the events for one
    chunk (the engine's text a `text_delta`, each tool call a `tool_use` block whose arguments
    arrive as `input_json_delta`s); `finish()` the closing `message_delta` (stop reason and
    usage) and `message_stop`. The engine's usage arrives with its last chunk, so the input
    tokens are reported in the `message_delta` too.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self.usage: dict[str, Any] | None = None  # the engine's own, for the metrics
        self._finish_reason: object = None
        self._block = -1  # the index of the open content block; -1 before the first
        self._open: str | None = None  # "text" or "tool_use" while a block is open
        self._tool_blocks: dict[int, int] = {}  # OpenAI's tool call index -> block index
        self._called_tools = False

    def start(self) -> bytes:
        return message_start(self.model)

    def chunk(self, data: dict[str, Any]) -> bytes:
        events: list[bytes] = []
        if isinstance(data.get("usage"), dict):
            self.usage = data["usage"]
        choices = data.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._open != "text":
                    events.append(self._open_block({"type": "text", "text": ""}, "text"))
                events.append(self._delta({"type": "text_delta", "text": text}))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                if isinstance(call, dict):
                    events.extend(self._tool_call(call))
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
        return b"".join(events)

    def _tool_call(self, call: dict[str, Any]) -> list[bytes]:
        index = call.get("index", 0)
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        events = []
        if index not in self._tool_blocks:
            # The first piece of a call carries its id and name.
            call_id = call.get("id") if isinstance(call.get("id"), str) and call["id"] else tool_use_id()
            block = {"type": "tool_use", "id": call_id, "name": function.get("name") or "", "input": {}}
            events.append(self._open_block(block, "tool_use"))
            self._tool_blocks[index] = self._block
            self._called_tools = True
        arguments = function.get("arguments")
        # Anthropic's blocks follow one another; the engines send a call's pieces before the next
        # call starts. A piece for a call whose block was closed has nowhere to go.
        if isinstance(arguments, str) and arguments and self._tool_blocks[index] == self._block:
            events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return events

    def _open_block(self, block: dict[str, Any], kind: str) -> bytes:
        closing = self._close_block()
        self._block += 1
        self._open = kind
        return closing + sse_event("content_block_start", {"type": "content_block_start", "index": self._block, "content_block": block})

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": self._block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self._block, "delta": delta})

    def finish(self) -> bytes:
        reason = stop_reason(self._finish_reason, self._called_tools)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": None},
            "usage": to_anthropic_usage(self.usage),
        }
        return self._close_block() + sse_event("message_delta", delta) + sse_event("message_stop", {"type": "message_stop"})
