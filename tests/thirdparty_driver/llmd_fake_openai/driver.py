"""The llmd driver for `llmd_fake_openai.server`: the whole of a third-party driver.

llmd finds this module through the `llmd.drivers` entry point in this package's pyproject.toml
and calls `llmd_drivers()` once at startup.
"""

from __future__ import annotations

import sys

from llmd.drivers.base import LaunchRequest, LaunchSpec, Readiness
from llmd.drivers.hookspecs import hookimpl

from .server import LOADING_MARKER


class FakeOpenAIDriver:
    name = "fake-openai"
    # An absolute path: llmd runs it as is, without a PATH lookup.
    default_command = [sys.executable, "-m", "llmd_fake_openai.server"]

    def launch(self, request: LaunchRequest) -> LaunchSpec:
        profile = request.profile
        argv = [
            *request.command,
            "--model", str(request.model_path),
            "--host", request.host,
            "--port", str(request.port),
            # The server answers 404 for other names, like fastllm and vLLM do; aliases too.
            "--served-name", profile.name,
            *[arg for alias in profile.aliases for arg in ("--served-name", alias)],
            "--ctx", str(request.placement.ctx),
            *profile.launch.extra_args,
        ]
        env = {**request.env, **profile.launch.env}
        # Like every driver: the engine sees exactly the cards it was placed on.
        env["CUDA_VISIBLE_DEVICES"] = request.placement.cuda_visible_devices()
        return LaunchSpec(argv=argv, env=env, readiness=Readiness(path="/health"))

    def load_progress(self, log_line: str) -> str | None:
        """The server logs `FAKE_OPENAI_LOADING <percent>` while it "loads"."""
        start = log_line.find(LOADING_MARKER)
        if start < 0:
            return None
        value = log_line[start + len(LOADING_MARKER):].strip()
        return f"loading {value}%" if value.isdigit() else None


@hookimpl
def llmd_drivers() -> list[FakeOpenAIDriver]:
    return [FakeOpenAIDriver()]
