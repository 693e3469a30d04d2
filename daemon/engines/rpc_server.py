"""`llmd rpc-server`: serve one device of this machine to another machine's llmd, over
llama.cpp's RPC.

It runs `ggml-rpc-server`, which `llmctl engines install llama-cpp` builds beside llama-server,
for a single device (llmd places models on one device per endpoint): the one named, else this
machine's first GPU, else its CPU. The other machine lists the endpoint in its llmd.toml:

    [[gpus.rpc]]
    endpoint = "192.168.1.20:50052"

RPC has no authentication and no encryption: anyone who reaches the port can run code on the
device and read what it holds. The server listens on loopback unless told otherwise with
`--allow-remote`, and then belongs on a private network only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from pathlib import Path

from llmd.daemon.engines.installed import MANIFEST
from llmd.daemon.engines.provision import find_installed
from llmd.daemon.engines.versions import LLAMA_CPP
from llmd.daemon.errors import LlmdError

__all__ = ["DEFAULT_PORT", "find_rpc_server", "first_device", "rpc_server_argv"]

# llama.cpp's default RPC port.
DEFAULT_PORT = 50052

_DEVICE_LINE = re.compile(r"^\s+(\S+): ")


def find_rpc_server(engines_dir: Path) -> Path:
    """The `ggml-rpc-server` of the llama.cpp install llmd runs; LlmdError saying how to get one."""
    installed = find_installed(engines_dir, LLAMA_CPP)
    if installed is None:
        raise LlmdError(f"llama.cpp is not installed in {engines_dir}; run `llmctl engines install llama-cpp`")
    root = installed.path.parent.parent
    try:
        relative = json.loads((root / MANIFEST).read_text()).get("rpc_server")
    except (OSError, ValueError, AttributeError):
        relative = None
    binary = root / relative if isinstance(relative, str) else None
    if binary is None or not os.access(binary, os.X_OK):
        raise LlmdError(
            f"the llama.cpp install in {root} has no RPC server (it was built before llmd built one); "
            "run `llmctl engines install llama-cpp` to build it again"
        )
    return binary


def first_device(llama_server: Path) -> str:
    """The first device llama.cpp sees on this machine (`CUDA0`, ...), else `CPU`."""
    try:
        listing = subprocess.run(
            [str(llama_server), "--list-devices"], capture_output=True, text=True, timeout=60, check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlmdError(f"cannot list this machine's devices with {llama_server}: {exc}") from None
    for line in listing.splitlines():
        match = _DEVICE_LINE.match(line)
        if match and match.group(1) != "(none)":
            return match.group(1).rstrip(":")
    return "CPU"


def check_host(host: str, allow_remote: bool) -> None:
    """Loopback, unless the caller said the network is private (`--allow-remote`)."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise LlmdError(
            f"--host {host} is not a loopback address. llama.cpp's RPC has no authentication: whoever "
            "reaches the port can use the device and read what it holds. On a private network only, "
            "add --allow-remote"
        )


def rpc_server_argv(binary: Path, host: str, port: int, device: str, threads: int | None, cache: bool) -> list[str]:
    """The server's command line."""
    argv = [str(binary), "--host", host, "--port", str(port), "--device", device]
    if threads:
        argv += ["--threads", str(threads)]
    if cache:
        argv.append("--cache")
    return argv
