"""A small OpenAI-compatible server: standard library only, deterministic replies.

    python -m llmd_fake_openai.server --model PATH --host H --port P --served-name NAME [...]

It behaves like the real engines in the ways llmd relies on: it answers 503 on `/health` while
it "loads" (`--load-seconds`), 404 for a `model` it does not serve, streams server-sent events
one token per chunk, and forks a worker process (as vLLM does) that outlives a SIGKILL of the
server unless its whole process group is stopped. The reply echoes the last user message, so a
test can tell which engine answered.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOADING_MARKER = "FAKE_OPENAI_LOADING "


class _State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.model_path: str = args.model
        self.served: list[str] = args.served_name
        self.ctx: int = args.ctx
        self.ready = threading.Event()


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if not state.ready.is_set():
                self._error(503, "loading")
            elif self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "owned_by": "fake-openai", "max_model_len": state.ctx}
                    for name in state.served
                ]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            if not state.ready.is_set():
                self._error(503, "loading")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._error(400, "body is not JSON")
                return
            model = body.get("model")
            if model not in state.served:
                self._error(404, f"The model `{model}` does not exist.")
                return
            if self.path == "/v1/chat/completions":
                messages = body.get("messages") or [{}]
                prompt = str(messages[-1].get("content", ""))
                self._complete(body, model, prompt, chat=True)
            elif self.path == "/v1/completions":
                self._complete(body, model, str(body.get("prompt", "")), chat=False)
            else:
                self._error(404, f"no route {self.path}")

        def _complete(self, body: dict[str, Any], model: str, prompt: str, *, chat: bool) -> None:
            words = f"fake-openai {model} heard: {prompt}".split()
            tokens = words[: max(1, int(body.get("max_tokens") or 16))]
            finish = "length" if len(tokens) < len(words) else "stop"
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(tokens),
                     "total_tokens": len(prompt.split()) + len(tokens)}
            ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
            kind = "chat.completion" if chat else "text_completion"
            if not body.get("stream"):
                text = " ".join(tokens)
                choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                self._json(200, {"id": ident, "object": kind, "created": int(time.time()), "model": model,
                                 "choices": [choice], "usage": usage})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for i, token in enumerate(tokens):
                piece = token if i == 0 else " " + token
                last = i == len(tokens) - 1
                choice = {"index": 0, "finish_reason": finish if last else None}
                if chat:
                    choice["delta"] = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                else:
                    choice["text"] = piece
                chunk = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": int(time.time()),
                         "model": model, "choices": [choice]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.005)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


def _load(state: _State, seconds: float) -> None:
    """Pretend to load the model for `seconds`, reporting progress as llmd's driver expects."""
    steps = 10
    for step in range(steps + 1):
        print(f"{LOADING_MARKER}{100 * step // steps}", file=sys.stderr, flush=True)
        if step < steps:
            time.sleep(seconds / steps)
    state.ready.set()
    print("fake-openai: ready", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmd_fake_openai.server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model path (checked to exist, never read)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-name", action="append", required=True, help="a model id to serve (repeatable)")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--load-seconds", type=float, default=0.2)
    parser.add_argument("--no-worker", action="store_true", help="do not fork the long-lived worker process")
    args = parser.parse_args(argv)
    if not os.path.exists(args.model):
        print(f"fake-openai: model {args.model} does not exist", file=sys.stderr)
        sys.exit(2)

    if not args.no_worker:
        # Inherits the process group and never exits by itself, like vLLM's EngineCore.
        subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(60)"],
                         stdin=subprocess.DEVNULL)

    state = _State(args)
    server = ThreadingHTTPServer((args.host, args.port), _handler(state))
    server.daemon_threads = True
    threading.Thread(target=_load, args=(state, args.load_seconds), daemon=True).start()
    print(f"fake-openai: serving {args.served_name} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
