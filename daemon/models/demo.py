"""`llmd init --demo`: a tiny model and a profile for it, so a first request works with no download."""

from __future__ import annotations

from pathlib import Path

from llmd.daemon.config import DaemonConfig
from llmd.daemon.models.tinymodel import write_tiny_gguf

DEMO_PROFILE = "demo"


def write_demo(config: DaemonConfig) -> tuple[Path, Path]:
    """Write `<state_dir>/models/demo-tiny.gguf` and `<first profile dir>/demo.toml`; keep an existing profile."""
    model = write_tiny_gguf(config.server.state_dir / "models" / "demo-tiny.gguf")
    profile_dir = config.server.profile_dirs[0]
    profile_dir.mkdir(parents=True, exist_ok=True)
    profile = profile_dir / f"{DEMO_PROFILE}.toml"
    if not profile.exists():
        profile.write_text(
            "# A tiny generated model with random weights: it answers with random text, instantly.\n"
            "# It shows that llmd works end to end; replace it with a real model's profile.\n"
            'engine = "llama-cpp"\n'
            "[model]\n"
            f'path = "{model}"\n'
            "[launch]\n"
            "ctx = 1024\n"
            "[policy]\n"
            'ttl = "10m"\n'
        )
    return model, profile
