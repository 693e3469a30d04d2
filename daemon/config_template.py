"""The commented `llmd.toml` that `llmd init` writes for a user: every key with its default,
commented out, under a line that says what it does.

The keys and defaults come from the config's own model, so a new setting shows up here by
itself; the comments are kept in `COMMENTS` (a key without one is listed bare).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from llmd.daemon.config import DaemonConfig

# Marks a line whose value is an example: the key is unset by default.
UNSET_MARK = "# unset by default"

HEADER = """\
# llmd's settings, written by `llmd init` (docs: README.md, "The daemon's config").
# Every key is commented out and shows its default: uncomment a line to change it.
# Paths default to this user's XDG directories, so llmd needs no root.
# llmd reads this file when it starts; SIGHUP (`systemctl --user reload llmd`) re-reads it,
# but the listeners' settings (listen, socket, api_keys, ...) only change at a restart.
"""

COMMENTS: dict[str, str] = {
    "server": "The daemon itself.",
    "server.listen": "The OpenAI-compatible address (HOST:PORT) clients use. Anything but 127.0.0.1 "
                     "lets other hosts in: then set api_keys.",
    "server.socket": "The management socket `llmctl` talks to; by default $XDG_RUNTIME_DIR/llmd/llmd.sock, "
                     "or /tmp/llmd-UID/llmd.sock where $XDG_RUNTIME_DIR is not set (llmctl looks in both).",
    "server.state_dir": "Engine logs, generated models and llmd's own state.",
    "server.profile_dirs": "Where the profiles are: one NAME.toml per model (`llmctl profile new`).",
    "server.engines_dir": "Where `llmctl engines install` puts the engines it builds.",
    "server.ready_timeout": "Seconds an engine may take to load its model before the load fails.",
    "server.stop_grace": "Seconds between SIGTERM and SIGKILL when an engine is stopped.",
    "server.shutdown_grace": "Seconds in-flight requests may run on after llmd is asked to stop.",
    "server.queue_timeout": "Seconds a request waits for room on the GPUs (or a free slot) before a 503.",
    "server.body_timeout": "Seconds a client may take to send a request body before a 408.",
    "server.head_timeout": "Seconds a client may take to send a request's head (request line and headers) "
                           "before the connection is closed.",
    "server.max_connections": "Connections each listener keeps open at once; one more gets a 503.",
    "server.allowed_hosts": "Host names, besides localhost and loopback addresses, that listeners bound to "
                            "loopback answer for (the rest are refused, against DNS rebinding); \"*\" for any.",
    "server.api_keys": "Keys the proxy accepts as `Authorization: Bearer KEY` (at least 8 printable "
                       "characters each, e.g. from `openssl rand -hex 24`); empty: no key is needed.",
    "server.model_dirs": "Profiles may only name model files inside these directories; empty allows any path.",
    "server.management_listen": "A TCP listener for the management API and the dashboard, next to the socket; "
                                "it needs management_token.",
    "server.management_token": "The token the TCP management listener requires (at least 16 characters).",
    "server.request_log": "How many of the last requests `llmctl requests` and the dashboard keep; 0 keeps none.",
    "server.log_bodies": "Whether the request log also keeps each request's and reply's body.",
    "server.kv_max_gib": "Disk that saved prompt caches may take in all (GiB).",
    "engines": "Per engine (llama-cpp, fastllm, vllm): a command to run instead of the installed build, "
               "and environment variables for it.",
    "gpus": "The GPUs llmd places models on.",
    "gpus.simulate": "A JSON snapshot of GPUs to plan with instead of the real ones (dry runs).",
    "gpus.margin_mib": "MiB kept free on every card.",
    "gpus.release_timeout": "Seconds to wait for a stopped engine's GPU memory to be released.",
    "dashboard": "The web page at /dashboard on the management listeners.",
    "dashboard.enabled": "Whether it is served.",
    "metrics": "Prometheus metrics at /metrics.",
    "metrics.enabled": "Whether they are served (and requests counted).",
}

# What the keys that are unset by default could hold.
EXAMPLES: dict[str, Any] = {
    "server.management_listen": "127.0.0.1:8809",
    "server.management_token": "A-RANDOM-SECRET-OF-16-OR-MORE",
    "gpus.simulate": "/path/to/gpus.json",
}

# No engine has settings by default; an example, indented.
_ENGINE_EXAMPLE = """\
# For example:
#   [engines.llama-cpp]
#   command = ["/path/to/llama-server"]
#   env = { CUDA_VISIBLE_DEVICES = "0" }
"""


def _comment(text: str) -> str:
    return "".join(f"# {line}\n" for line in textwrap.wrap(text, width=92))


def _inline(value: Any) -> str:
    """A default as an inline TOML value, on one line (so that one `#` comments it out)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # JSON's escapes are TOML's
    if isinstance(value, SecretStr):
        return json.dumps(value.get_secret_value())
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(key)} = {_inline(item)}" for key, item in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def _key_line(key: str, value: Any) -> str:
    return f"# {key} = {_inline(value)}\n"


def _section(name: str, section: BaseModel) -> str:
    text = f"\n{_comment(COMMENTS[name]) if name in COMMENTS else ''}[{name}]\n"
    for key in type(section).model_fields:
        dotted = f"{name}.{key}"
        value = getattr(section, key)
        text += "\n" + (_comment(COMMENTS[dotted]) if dotted in COMMENTS else "")
        if value is None:
            example = EXAMPLES.get(dotted, "")
            text += _key_line(key, example).rstrip("\n") + f"  {UNSET_MARK}\n"
        else:
            text += _key_line(key, value)
    return text


def user_config_text(defaults: DaemonConfig | None = None) -> str:
    """The whole file: every section of `defaults` (the defaults for this user when None)."""
    config = defaults if defaults is not None else DaemonConfig()
    text = HEADER
    for name in type(config).model_fields:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            text += _section(name, value)
        elif name == "engines":
            text += f"\n{_comment(COMMENTS['engines'])}{_ENGINE_EXAMPLE}"
    return text
