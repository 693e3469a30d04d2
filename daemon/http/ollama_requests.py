"""Ollama requests as the OpenAI-compatible requests that every engine answers.

Pure functions, no I/O: each takes the parsed body of an Ollama request and returns the body
for the engine's own route (`EngineCall`), or raises `OllamaRequestError` saying what is wrong.

- `/api/chat` goes to `/v1/chat/completions`: messages keep their roles, `images` become
  `image_url` parts with data URLs, tool calls get the ids OpenAI's format wants.
- `/api/generate` goes to `/v1/chat/completions` as one user message (Ollama applies the
  model's chat template to a prompt, and so does the engine's chat route), or with
  `"raw": true` to `/v1/completions`, where the prompt reaches the model untouched.
- `/api/embed` and `/api/embeddings` go to `/v1/embeddings`.
- `options` become the engine's sampling fields (`OPTION_FIELDS`); load-time options (num_gpu,
  num_thread, ...) are the profile's business and are ignored. `num_ctx` is checked against
  the profile's context: llmd never restarts a model for it, so a larger one is reported back
  as a warning for the log.
- `format` becomes `response_format`: "json" a JSON object, an object a JSON schema.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from typing import Any

from llmd.daemon.util.durations import parse_duration

CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

# Ollama's sampling options that engines read under the same name: OpenAI's own fields, and
# llama-server's (which vLLM shares in part). An engine ignores the ones it does not know.
_NUMBER_OPTIONS = (
    "temperature", "top_p", "min_p", "typical_p", "presence_penalty", "frequency_penalty", "repeat_penalty",
    "mirostat_tau", "mirostat_eta",
)
_INTEGER_OPTIONS = ("top_k", "seed", "repeat_last_n", "mirostat")
# Every option the engine sees, with the field it goes to: for the docs and the tests.
OPTION_FIELDS = {
    "num_predict": "max_tokens",
    "stop": "stop",
    **{name: name for name in (*_NUMBER_OPTIONS, *_INTEGER_OPTIONS)},
}
# Image types told apart by their first bytes, for the data URL's media type.
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class OllamaRequestError(Exception):
    """What is wrong with a request, as its reply says it (`status`, 400 unless said)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class EngineCall:
    """What to send the engine for one Ollama request."""

    path: str
    body: dict[str, Any]
    stream: bool
    # Seconds to keep the model loaded once idle (0: stop it; math.inf: never), or None: the profile's TTL.
    keep_alive: float | None = None
    # Things the client asked for that llmd does not do, for the daemon's log.
    warnings: list[str] = field(default_factory=list)


# ----- the body and its common fields -----


def check_declared_json(content_type: str | None, origin: str | None) -> None:
    """A browser's request must declare its body JSON. Ollama's own clients may send JSON
    undeclared (`curl -d` calls it a form), but so may a page of another site, through the
    visitor's browser and without asking first; a browser always names the page (`Origin`)."""
    if origin is not None and (content_type is None or "json" not in content_type.split(";")[0].lower()):
        raise OllamaRequestError(
            f"a request from a web page ({origin}) must send its body with 'Content-Type: application/json'", 415
        )


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object. Ollama's clients may send it without a JSON Content-Type
    (`curl -d`), so the type is not checked."""
    try:
        payload = json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise OllamaRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise OllamaRequestError('request body must be a JSON object like {"model": "NAME", ...}')
    return payload


def model_of(payload: dict[str, Any]) -> str:
    """The model the request names (`model`, or the older `name`)."""
    model = payload.get("model") or payload.get("name")
    if model is None:
        raise OllamaRequestError("model is required; GET /api/tags lists the models")
    if not isinstance(model, str) or not model.strip():
        raise OllamaRequestError("model must be a non-empty string; GET /api/tags lists the models")
    return model.strip()


def names_to_try(model: str) -> list[str]:
    """The profile names an Ollama model name may mean, in order: the name as it is (a profile
    may be named `demo:q4`), then without its tag (`demo:latest` and `demo:q4` are `demo`)."""
    base, colon, tag = model.rpartition(":")
    if colon and base and tag and "/" not in tag:
        return [model, base]
    return [model]


def tagged(name: str) -> str:
    """A profile's name as Ollama lists models: with a tag, `:latest` unless it has one."""
    return name if ":" in name else f"{name}:latest"


def wants_stream(payload: dict[str, Any]) -> bool:
    """Ollama streams unless told `"stream": false`."""
    stream = payload.get("stream")
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise OllamaRequestError("stream must be true or false")
    return stream


def parse_keep_alive(value: object) -> float | None:
    """Ollama's `keep_alive` as seconds: a number of seconds or a duration ("5m", "1h30m");
    0 stops the model once the reply is sent; a negative value keeps it loaded (math.inf).
    None when the request has none."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise OllamaRequestError("keep_alive must be a duration such as \"5m\" or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _duration_seconds(value)
    else:
        raise OllamaRequestError("keep_alive must be a duration such as \"5m\" or a number of seconds")
    if math.isnan(seconds):
        raise OllamaRequestError("keep_alive must be a number of seconds, not NaN")
    return math.inf if seconds < 0 else seconds


def _duration_seconds(text: str) -> float:
    cleaned = text.strip().lower()
    if cleaned.startswith("-"):
        return -1.0
    try:
        return float(cleaned)  # "300": seconds, as Ollama's clients send numbers too
    except ValueError:
        pass
    try:
        seconds = parse_duration(cleaned)
    except ValueError:
        raise OllamaRequestError(
            f"keep_alive {text!r} is not a duration; write it like \"30s\", \"5m\" or \"1h\", 0 to unload, -1 to keep"
        ) from None
    if seconds is None:  # "never" or "off": a profile's TTL word, not one of Ollama's
        raise OllamaRequestError(f"keep_alive {text!r} is not a duration; write -1 to keep the model loaded")
    return seconds


# ----- options -----


def sampling_fields(options: object, ctx: int) -> tuple[dict[str, Any], list[str]]:
    """The engine's sampling fields for Ollama's `options`, and warnings for the log.

    `ctx` is the context the model runs with: a larger `num_ctx` cannot be had without
    restarting the model with another profile, so it is served with `ctx` and a warning."""
    if options is None:
        return {}, []
    if not isinstance(options, dict):
        raise OllamaRequestError("options must be an object such as {\"temperature\": 0.2}")
    fields: dict[str, Any] = {}
    warnings: list[str] = []
    for name in _NUMBER_OPTIONS:
        if options.get(name) is not None:
            fields[name] = _number(options, name)
    for name in _INTEGER_OPTIONS:
        if options.get(name) is not None:
            fields[name] = _integer(options, name)
    if options.get("num_predict") is not None:
        limit = _integer(options, "num_predict")
        if limit >= 0:  # -1: no limit; -2: until the context is full; both are the engine's default
            fields["max_tokens"] = limit
    if options.get("stop") is not None:
        fields["stop"] = _stop(options["stop"])
    if options.get("num_ctx") is not None:
        wanted = _integer(options, "num_ctx")
        if wanted > ctx:
            warnings.append(
                f"options.num_ctx {wanted} is more than the {ctx} tokens of context the profile gives the model; "
                "served with the profile's; raise [launch] ctx in the profile for more"
            )
    return fields, warnings


def _number(options: dict[str, Any], name: str) -> float:
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OllamaRequestError(f"options.{name} must be a number")
    return value


def _integer(options: dict[str, Any], name: str) -> int:
    value = options[name]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise OllamaRequestError(f"options.{name} must be a whole number")
    return value


def _stop(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise OllamaRequestError("options.stop must be a string or a list of strings")


def response_format(value: object) -> dict[str, Any] | None:
    """OpenAI's `response_format` for Ollama's `format`: "json", or a JSON schema."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value, "strict": True}}
    raise OllamaRequestError('format must be "json" or a JSON schema object')


# ----- messages -----


def image_url(data: object) -> dict[str, Any]:
    """An OpenAI `image_url` part for one of Ollama's base64 `images`."""
    if not isinstance(data, str) or not data:
        raise OllamaRequestError("images must be a list of base64-encoded images")
    try:
        head = base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4), validate=False)
    except (binascii.Error, ValueError):
        raise OllamaRequestError("images must be base64-encoded") from None
    media = "image/jpeg"
    for magic, kind in _IMAGE_MAGIC:
        if head.startswith(magic):
            media = kind
            break
    else:
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            media = "image/webp"
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}


def _content(text: str, images: object) -> str | list[dict[str, Any]]:
    if images is None or images == []:
        return text
    if not isinstance(images, list):
        raise OllamaRequestError("images must be a list of base64-encoded images")
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    return parts + [image_url(image) for image in images]


def openai_messages(messages: object) -> list[dict[str, Any]]:
    """Ollama's chat messages in OpenAI's format."""
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise OllamaRequestError("messages must be a list of {\"role\": ..., \"content\": ...} objects")
    out: list[dict[str, Any]] = []
    # Ollama's tool calls have no ids; OpenAI's format links each tool result to its call by id.
    pending: list[tuple[str, str]] = []  # (id, function name) of calls not yet answered
    calls = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise OllamaRequestError(f"messages[{index}] must be an object with a role and content")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise OllamaRequestError(f"messages[{index}].role must be a string such as \"user\"")
        text = message.get("content")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise OllamaRequestError(f"messages[{index}].content must be a string")
        converted: dict[str, Any] = {"role": role, "content": _content(text, message.get("images"))}
        if role == "assistant" and message.get("tool_calls"):
            converted["tool_calls"] = []
            for call in _tool_calls(message["tool_calls"], index):
                calls += 1
                call_id = f"call_{calls}"
                pending.append((call_id, call["name"]))
                converted["tool_calls"].append(
                    {"id": call_id, "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
                )
        if role == "tool":
            name = message.get("tool_name") or message.get("name")
            answered = next((item for item in pending if item[1] == name), pending[0] if pending else None)
            if answered is not None:
                pending.remove(answered)
                converted["tool_call_id"] = answered[0]
            if isinstance(name, str) and name:
                converted["name"] = name
        out.append(converted)
    return out


def _tool_calls(value: object, index: int) -> list[dict[str, str]]:
    """Ollama's tool calls of a message, as (name, arguments as JSON text)."""
    if not isinstance(value, list):
        raise OllamaRequestError(f"messages[{index}].tool_calls must be a list")
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise OllamaRequestError(f"messages[{index}].tool_calls: each needs a function with a name")
        arguments = function.get("arguments", {})  # type: ignore[union-attr]
        calls.append({"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)})
    return calls


# ----- whole requests -----


def _generation_fields(payload: dict[str, Any], ctx: int) -> tuple[dict[str, Any], list[str]]:
    """The fields chat and generate share: sampling, format, thinking, streaming."""
    fields, warnings = sampling_fields(payload.get("options"), ctx)
    fmt = response_format(payload.get("format"))
    if fmt is not None:
        fields["response_format"] = fmt
    think = payload.get("think")
    if isinstance(think, bool):
        # llama-server passes this to the chat template (Qwen3, DeepSeek and others read it).
        fields["chat_template_kwargs"] = {"enable_thinking": think}
    elif isinstance(think, str) and think:
        fields["reasoning_effort"] = think  # "low" / "medium" / "high", as gpt-oss reads it
    elif think is not None:
        raise OllamaRequestError('think must be true, false, or "low", "medium" or "high"')
    return fields, warnings


def _streaming(body: dict[str, Any], stream: bool) -> None:
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}  # the token counts for the last line


def chat_call(payload: dict[str, Any], model: str, ctx: int) -> EngineCall:
    """`/api/chat` as a chat completion of the profile `model`, whose context is `ctx`."""
    stream = wants_stream(payload)
    fields, warnings = _generation_fields(payload, ctx)
    body: dict[str, Any] = {"model": model, "messages": openai_messages(payload.get("messages")), **fields}
    tools = payload.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise OllamaRequestError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
        body["tools"] = tools  # Ollama's tools are OpenAI's
    _streaming(body, stream)
    return EngineCall(CHAT_COMPLETIONS, body, stream, parse_keep_alive(payload.get("keep_alive")), warnings)


def generate_call(payload: dict[str, Any], model: str, ctx: int) -> EngineCall:
    """`/api/generate`: a chat completion of one user message (after `system`, if any), or with
    `raw` a plain completion of the prompt."""
    stream = wants_stream(payload)
    prompt = _text(payload, "prompt")
    system = _text(payload, "system")
    for unsupported, why in (
        ("suffix", "fill-in-the-middle is not offered; send the whole prompt"),
        ("template", "the model's chat template comes from the model; send \"raw\": true with a prompt you formatted"),
    ):
        if _text(payload, unsupported):
            raise OllamaRequestError(f"{unsupported} is not supported by llmd: {why}")
    if payload.get("context"):
        raise OllamaRequestError(
            "context is not supported by llmd (its replies carry none); send the conversation to /api/chat instead"
        )
    fields, warnings = _generation_fields(payload, ctx)
    raw = payload.get("raw")
    if raw is not None and not isinstance(raw, bool):
        raise OllamaRequestError("raw must be true or false")
    if raw:
        if payload.get("images"):
            raise OllamaRequestError("images need the model's chat template: send them without \"raw\": true")
        fields.pop("chat_template_kwargs", None)
        # As in Ollama, a raw prompt is sent as it is: `system` belongs to the template it skips.
        body = {"model": model, "prompt": prompt, **fields}
        _streaming(body, stream)
        return EngineCall(COMPLETIONS, body, stream, parse_keep_alive(payload.get("keep_alive")), warnings)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": _content(prompt, payload.get("images"))})
    body = {"model": model, "messages": messages, **fields}
    _streaming(body, stream)
    return EngineCall(CHAT_COMPLETIONS, body, stream, parse_keep_alive(payload.get("keep_alive")), warnings)


def _text(payload: dict[str, Any], name: str) -> str:
    value = payload.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise OllamaRequestError(f"{name} must be a string")
    return value


def is_load_only(payload: dict[str, Any], chat: bool) -> bool:
    """A request with nothing to answer: Ollama's way to load a model (or, with
    `"keep_alive": 0`, to unload it)."""
    if chat:
        return not payload.get("messages")
    return not payload.get("prompt") and not payload.get("images")


def embed_call(payload: dict[str, Any], model: str, *, legacy: bool = False) -> EngineCall:
    """`/api/embed` (`input`: a string or a list of them), or with `legacy` the older
    `/api/embeddings` (`prompt`: one string)."""
    if legacy:
        texts: object = [_text(payload, "prompt")]
    else:
        texts = payload.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
            raise OllamaRequestError("input must be a string or a non-empty list of strings")
    body: dict[str, Any] = {"model": model, "input": texts}
    dimensions = payload.get("dimensions")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions <= 0:
            raise OllamaRequestError("dimensions must be a positive whole number")
        body["dimensions"] = dimensions
    return EngineCall(EMBEDDINGS, body, False, parse_keep_alive(payload.get("keep_alive")))
