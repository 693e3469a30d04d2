"""A read-only file object over a file that is elsewhere, fetched a byte range at a time.

Made for reading a file's header from its start without fetching the rest (a GGUF's header is
a few MB of a multi-GB file): every byte fetched is kept, from the start of the file on, and
each fetch reads ahead a chunk that doubles from one fetch to the next (`FIRST_CHUNK`, then
twice that, up to `MAX_CHUNK`), so a small header costs one request and a large one a few.
Seeded with `prefix` (bytes kept from an earlier read), it needs no fetch at all while reads
stay within them. Wrap it in `io.BufferedReader` for many small reads.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

FIRST_CHUNK = 1024 * 1024
MAX_CHUNK = 16 * 1024 * 1024

# fetch(start, end): the bytes [start, end) of the file, fewer only where the file ends.
RangeFetch = Callable[[int, int], bytes]


class RangeReader(io.RawIOBase):
    """The file of `size` bytes (None: unknown) that `fetch` reads ranges of.

    Without `fetch`, the file is `prefix` alone: reading past it finds the end of the file.
    `on_fetch(total)` is called after each fetch with the bytes fetched so far."""

    def __init__(
        self,
        fetch: RangeFetch | None,
        size: int | None,
        *,
        prefix: bytes = b"",
        first_chunk: int = FIRST_CHUNK,
        max_chunk: int = MAX_CHUNK,
        on_fetch: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self._fetch = fetch
        self._size = size
        self._data = bytearray(prefix)
        self._position = 0
        self._chunk = max(1, first_chunk)
        self._max_chunk = max(self._chunk, max_chunk)
        self._on_fetch = on_fetch
        self._at_end = fetch is None
        self.fetched = 0  # bytes fetched by this reader (the prefix it was given not counted)
        self.requests = 0

    @property
    def size(self) -> int | None:
        return self._size

    def kept(self, length: int | None = None) -> bytes:
        """The first `length` bytes fetched (all of them by default): what a cache keeps."""
        return bytes(self._data if length is None else self._data[:length])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            target = offset
        elif whence == os.SEEK_CUR:
            target = self._position + offset
        elif whence == os.SEEK_END:
            if self._size is None:
                raise io.UnsupportedOperation("the file's size is not known: cannot seek from its end")
            target = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._position = target
        return target

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        wanted = len(buffer)
        self._have(self._position + wanted)
        chunk = self._data[self._position:self._position + wanted]
        buffer[:len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def _have(self, end: int) -> None:
        """Fetch until the first `end` bytes are here, or the file ends."""
        if self._size is not None:
            end = min(end, self._size)
        while len(self._data) < end and not self._at_end:
            assert self._fetch is not None
            start = len(self._data)
            stop = start + max(self._chunk, end - start)
            if self._size is not None:
                stop = min(stop, self._size)
            data = self._fetch(start, stop)
            self.requests += 1
            self.fetched += len(data)
            self._data += data
            if len(data) < stop - start:
                self._at_end = True  # the file ended early (or its size was not known)
            self._chunk = min(self._chunk * 2, self._max_chunk)
            if self._on_fetch is not None:
                self._on_fetch(self.fetched)
