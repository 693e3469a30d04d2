"""The hash-locked requirement files that fastllm and vLLM are installed from.

Each pinned engine version and flavour that has one ships it in `locks/`, named
`<engine>-<version>-<flavour>[-<part>].txt`: every package of the engine's venv, pinned to one
version with the sha256 of each of its files, as written by `scripts/lock-engines`. pip installs
them with `--require-hashes --no-deps`, so a file that differs from the one the lock was made
from (a compromised index or mirror, a replaced release) is refused, and nothing outside the
list is installed. vLLM's CPU torch has a part of its own (`-torch`): it comes from PyTorch's
index, the rest from PyPI.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

LOCKS = Path(__file__).parent / "locks"
# The lock part holding vLLM's `+cpu` torch, installed from PyTorch's CPU index.
TORCH_PART = "torch"


def lock_path(engine: str, version: str, flavour: str, part: str | None = None) -> Path:
    """Where the lock for `engine` `version` `flavour` (and `part`, if any) is, or would be."""
    suffix = f"-{part}" if part else ""
    return LOCKS / f"{engine}-{version}-{flavour}{suffix}.txt"


def find_lock(engine: str, version: str, flavour: str, part: str | None = None) -> Path | None:
    """The shipped lock file, or None where this llmd has none (an unpinned version, CUDA)."""
    path = lock_path(engine, version, flavour, part)
    return path if path.is_file() else None


def locked_install_args(lock: Path) -> list[str]:
    """pip install's arguments for `lock`: exactly its packages, each file checked against its hashes."""
    return ["--require-hashes", "--no-deps", "-r", str(lock)]


def lock_digests(*locks: Path) -> dict[str, str]:
    """file name -> sha256 of each lock, for an install's manifest (which lock it came from)."""
    return {lock.name: hashlib.sha256(lock.read_bytes()).hexdigest() for lock in locks}


def locked_requirements(lock: Path) -> list[str]:
    """Each requirement of `lock` as one logical line (continuations joined, comments dropped)."""
    text = lock.read_text().replace("\\\n", " ")
    lines = (line.split(" #", 1)[0].strip() for line in text.splitlines())
    return [" ".join(line.split()) for line in lines if line and not line.startswith("#")]
