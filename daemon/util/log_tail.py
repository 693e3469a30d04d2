"""The end of a log file, read from the end backwards: as many lines as asked for, however long
the log, without reading the rest of it."""

from __future__ import annotations

import os
from pathlib import Path

_BLOCK = 64 * 1024
# A bound on what one tail may hold in memory, whatever the lines' length.
MAX_TAIL_BYTES = 32 * 1024 * 1024


def read_tail(path: Path, lines: int) -> tuple[bytes, int]:
    """The last `lines` lines of `path`, as in the file (the last one may lack its newline),
    and the file's size at that read: where following it goes on. Raises FileNotFoundError."""
    with path.open("rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        if lines <= 0:
            return b"", size
        chunks: list[bytes] = []
        held = breaks = 0
        position = size
        while position > 0 and held < MAX_TAIL_BYTES:
            step = min(_BLOCK, position)
            position -= step
            fh.seek(position)
            chunk = fh.read(step)
            chunks.append(chunk)
            held += len(chunk)
            breaks += chunk.count(b"\n")
            # More breaks than lines (one is the last line's own) means the first line is whole.
            if breaks - (1 if chunks[0].endswith(b"\n") else 0) >= lines:
                break
    data = b"".join(reversed(chunks))
    # Lines end at "\n" only, as for `tail -n`: a "\r" of a progress bar stays inside its line.
    ended = data.endswith(b"\n")
    kept = b"\n".join((data[:-1] if ended else data).split(b"\n")[-lines:])
    return (kept + b"\n" if ended else kept), size
