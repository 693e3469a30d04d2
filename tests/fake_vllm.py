"""A stand-in for vLLM's HTTP surface with sleep mode, for machines without a GPU.

vLLM refuses `--enable-sleep-mode` on the CPU, so the park/wake path is tested against this
process instead: it takes vLLM's flags, starts after $FAKE_START_SECONDS (a cold start), and
serves /health, /v1/models, /v1/chat/completions, POST /sleep?level=1, POST /wake_up and
GET /is_sleeping the way vLLM does with VLLM_SERVER_DEV_MODE=1. A chat sent while asleep fails,
as it would on vLLM, so a test sees whether llmd woke the engine before forwarding.

$FAKE_SLEEP_FAILS=1 makes /sleep answer 500, $FAKE_WAKE_FAILS=1 /wake_up; $FAKE_WAKE_SECONDS
delays /wake_up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("serve", nargs="?")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", nargs="+", required=True)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    args, _ = parser.parse_known_args()
    sleep_routes = args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
    state = {"sleeping": False, "level": 0}
    lock = threading.Lock()
    print(f"fake vLLM: sleep mode {'on' if sleep_routes else 'off'}; loading", flush=True)
    time.sleep(float(os.environ.get("FAKE_START_SECONDS", "1")))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *log_args: object) -> None:
            print(f"fake vLLM: {self.command} {self.path}", flush=True)

        def do_GET(self) -> None:
            path = urlparse(self.path).path
            if path == "/health":
                self._reply(200, {})
            elif path == "/is_sleeping" and sleep_routes:
                self._reply(200, {"is_sleeping": state["sleeping"]})
            elif path == "/v1/models":
                self._reply(200, {"object": "list", "data": [{"id": name} for name in args.served_model_name]})
            else:
                self._reply(404, {"detail": "Not Found"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            url = urlparse(self.path)
            if url.path == "/sleep" and sleep_routes:
                if os.environ.get("FAKE_SLEEP_FAILS") == "1":
                    self._reply(500, {"error": "cannot sleep"})
                    return
                with lock:
                    state["sleeping"] = True
                    state["level"] = int(parse_qs(url.query).get("level", ["1"])[0])
                self._reply(200, {})
            elif url.path == "/wake_up" and sleep_routes:
                time.sleep(float(os.environ.get("FAKE_WAKE_SECONDS", "0")))
                if os.environ.get("FAKE_WAKE_FAILS") == "1":
                    self._reply(500, {"error": "cannot wake"})
                    return
                with lock:
                    state["sleeping"] = False
                self._reply(200, {})
            elif url.path == "/v1/chat/completions":
                if state["sleeping"]:
                    self._reply(500, {"error": {"message": "the engine is asleep"}})
                    return
                request = json.loads(body)
                self._reply(200, {
                    "object": "chat.completion",
                    "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": f"pid {os.getpid()}"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                })
            else:
                self._reply(404, {"detail": "Not Found"})

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print("fake vLLM: Application startup complete.", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
