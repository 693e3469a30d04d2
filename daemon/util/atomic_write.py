"""Writing a small file in one step: a reader sees the old content or the new, never half of it.

The data goes to a scratch file in the target's own directory (a rename is atomic only within
one file system), is flushed to disk, and then takes the target's name; the directory is then
flushed too, so that the new name itself survives a power cut. A crash at any point leaves the
old file whole; at worst a hidden scratch file stays behind.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str, *, overwrite: bool = True) -> Path:
    """Put `data` (str is written as UTF-8) at `path`, creating its directory if needed.

    With `overwrite=False` an existing `path` is left alone and FileExistsError is raised,
    even when another writer creates it at the same moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, scratch = _scratch_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(scratch, path)
        else:
            os.link(scratch, path)  # fails if the name exists, unlike a rename
    finally:
        if os.path.lexists(scratch):
            os.unlink(scratch)
    fsync_directory(path.parent)
    return path


def fsync_directory(directory: Path) -> None:
    """Flush `directory`'s entries to disk: a rename is durable only once its directory is.

    A file system that cannot sync a directory (some network ones refuse) keeps the rename
    all the same; only its durability across a power cut is then up to the file system."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any, **dumps: Any) -> Path:
    """`value` as JSON at `path`, atomically; `dumps` are json.dumps options (indent, sort_keys)."""
    return write_atomic(path, json.dumps(value, **dumps))


def _scratch_file(path: Path) -> tuple[int, str]:
    """A new, uniquely named hidden file beside `path`, open for writing.

    Not tempfile.mkstemp: that creates the file with mode 0600, which the renamed file keeps.
    Here the umask decides, as for a file written with open(): the daemon's user must be able
    to read a profile that `llmctl profile new` wrote, and other users of a shared Hugging
    Face cache its refs.
    """
    while True:
        scratch = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial")
        try:
            return os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), str(scratch)
        except FileExistsError:
            continue
