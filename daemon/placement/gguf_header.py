"""A GGUF file's header (its metadata and tensor infos) read from any binary stream.

`gguf.GGUFReader` memory-maps a whole file on disk; this reader only reads forward from the
start of a stream, so it also works on a file that is not here: `models.range_reader` feeds
it a Hugging Face file through HTTP range requests, a few MB of a multi-GB model, so that
`llmctl plan` can answer "will it fit?" before the download.

Values come out as `GGUFReader`'s `ReaderField.contents()` gives them (Python scalars,
strings, flat lists), so an estimate from a header read here equals one from the file itself.
An array longer than `LONG_ARRAY` (the tokenizer's tokens, scores and merges) is skipped and
given only by its length, as the estimator only ever needs that.

A model file is untrusted input: every count and length in it (key-value pairs, tensors,
strings, arrays, dimensions) is checked against the bytes the file (or the largest header) has
left before anything is read or allocated for it, so a header that claims absurd sizes is
refused at once, with the field named, instead of being read on or looped over.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = [
    "ArrayLength",
    "FileHeader",
    "GgufClaimError",
    "GgufHeaderError",
    "HeaderOnlyGguf",
    "LONG_ARRAY",
    "MAX_HEADER_BYTES",
    "parse_header",
    "split_part_names",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# Arrays with more items are given by length only (`ArrayLength`).
LONG_ARRAY = 4096
# No real header comes near this (a large tokenizer makes ~10-20 MB); a file that claims more
# is not a GGUF, and reading on would fetch its weights.
MAX_HEADER_BYTES = 256 * 1024 * 1024
# Arrays of arrays deeper than this are not metadata any model has.
MAX_ARRAY_DEPTH = 8
# The fewest bytes each entry can take: a key-value pair (key length, an empty key, the type, a
# one-byte value), a tensor info (name length, an empty name, no dimensions, the type, the
# offset), a string (its length), an array (item type and count).
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
_MIN_STRING_BYTES = 8
_MIN_ARRAY_BYTES = 4 + 8

# GGUF value types (gguf.GGUFValueType), with their struct codes for the scalars.
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


class GgufHeaderError(ValueError):
    """The bytes are not the header of a GGUF file this reader understands."""


class GgufClaimError(GgufHeaderError):
    """A GGUF header claims more than its file can hold (a count, a length, a nesting depth):
    damaged, or made to exhaust the memory of whoever trusts it."""


@dataclass(frozen=True)
class ArrayLength:
    """Stands in for an array too long to decode (the token list)."""

    n: int


@dataclass(frozen=True)
class FileHeader:
    """One file's header: its metadata, each tensor's name and size in bytes, and how many
    bytes from the start of the file the header takes (up to the end of the tensor infos)."""

    metadata: dict[str, Any]
    tensors: tuple[tuple[str, int], ...]
    length: int


@dataclass(frozen=True)
class HeaderOnlyGguf:
    """A GGUF model known from its headers alone, one per file of a split model: all the
    estimator needs, without the weights.

    `source` says where they were read (for messages and `Estimate.source`); `identity`
    changes whenever the files do, so cached estimates can be keyed on it."""

    source: str
    identity: str
    parts: tuple[FileHeader, ...]


def split_part_names(name: str) -> list[str]:
    """`model-00001-of-00003.gguf` names the first of three files: all three names (in the
    same folder); any other name is a model in one file."""
    folder, _, base = name.rpartition("/")
    match = _SPLIT.match(base)
    if not match:
        return [name]
    stem, count = match.group(1), int(match.group(3))
    prefix = f"{folder}/" if folder else ""
    return [f"{prefix}{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def parse_header(stream: BinaryIO, size: int | None = None) -> FileHeader:
    """Read the header at the start of `stream`, which is read forward only, never past the
    tensor infos. `size` is the whole file's, when known (a seekable stream tells it itself).
    Raises GgufHeaderError when it is not a GGUF header (or ends inside one, or claims more
    than the file can hold)."""
    cursor = _Cursor(stream, size if size is not None else _stream_size(stream))
    if cursor.take(4) != GGUF_MAGIC:
        raise GgufHeaderError("no GGUF magic at the start of the file")
    raw_version = cursor.take(4)
    (version,) = struct.unpack("<I", raw_version)
    if version & 0xFFFF == 0:
        # Written on a big-endian machine: every number in the file is byte-swapped.
        cursor.order = ">"
        (version,) = struct.unpack(">I", raw_version)
    if version not in SUPPORTED_VERSIONS:
        raise GgufHeaderError(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    n_tensors, n_kv = cursor.unpack("QQ")
    cursor.room_for(n_kv, _MIN_KV_BYTES, "GGUF.kv_count", "key-value pairs")
    cursor.room_for(n_tensors, _MIN_TENSOR_INFO_BYTES, "GGUF.tensor_count", "tensor infos",
                    before=n_kv * _MIN_KV_BYTES)
    # The pseudo-keys GGUFReader lists among its fields, so that both readers give the same dict.
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for number in range(n_kv):
        key = cursor.string(f"the name of metadata key #{number}")
        if key in metadata:
            raise GgufHeaderError(f"metadata key {key!r} appears twice")
        (value_type,) = cursor.unpack("I")
        metadata[key] = _value(cursor, value_type, f"metadata key {key!r}")
    tensors = tuple(_tensor_info(cursor, number) for number in range(n_tensors))
    return FileHeader(metadata=metadata, tensors=tensors, length=cursor.position)


def _stream_size(stream: BinaryIO) -> int | None:
    """The size of a seekable stream (a file, bytes in memory), else None."""
    try:
        if not stream.seekable():
            return None
        here = stream.tell()
        end = stream.seek(0, 2)
        stream.seek(here)
        return end - here
    except (OSError, ValueError, AttributeError):
        return None


class _Cursor:
    """Reads exact byte counts from a stream, counting them, never past what the file (of
    `size` bytes, when known) or the largest header allows."""

    def __init__(self, stream: BinaryIO, size: int | None = None) -> None:
        self.stream = stream
        self.position = 0
        self.order = "<"
        self.size = size
        self.limit = MAX_HEADER_BYTES if size is None else min(size, MAX_HEADER_BYTES)

    def left(self) -> int:
        return self.limit - self.position

    def _beyond(self, n: int, what: str) -> GgufClaimError:
        if self.size is not None and self.limit == self.size:
            return GgufClaimError(f"{what} needs {n} bytes, larger than the {self.left()} bytes left in the "
                                  f"{self.size}-byte file")
        return GgufClaimError(f"{what} needs {n} bytes: the header would be larger than {MAX_HEADER_BYTES // 2**20} MiB")

    def room_for(self, count: int, each: int, field: str, items: str, before: int = 0) -> None:
        """GgufHeaderError naming `field` unless `count` entries of at least `each` bytes fit."""
        if before + count * each > self.left():
            raise self._beyond(count * each, f"{field} = {count} ({items} of at least {each} bytes each)")

    def take(self, n: int, what: str = "the header") -> bytes:
        if n > self.left():
            raise self._beyond(n, what)
        data = self.stream.read(n) if n else b""
        if len(data) != n:
            raise GgufHeaderError(f"the file ends inside its header (at byte {self.position + len(data)})")
        self.position += n
        return data

    def unpack(self, codes: str) -> tuple[Any, ...]:
        layout = self.order + codes
        return struct.unpack(layout, self.take(struct.calcsize(layout)))

    def string(self, what: str) -> str:
        (length,) = self.unpack("Q")
        return self.take(length, f"{what} (a string)").decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        (length,) = self.unpack("Q")
        self.take(length, f"{what} (a string)")


def _value(cursor: _Cursor, value_type: int, what: str) -> Any:
    if value_type == _STRING:
        return cursor.string(what)
    if value_type == _ARRAY:
        items, count = _array(cursor, what)
        return items if items is not None else ArrayLength(count)
    code = _SCALARS.get(value_type)
    if code is None:
        raise GgufHeaderError(f"unknown GGUF value type {value_type}")
    return cursor.unpack(code)[0]


def _array(cursor: _Cursor, what: str, depth: int = 1) -> tuple[list[Any] | None, int]:
    """(the items, flattened as GGUFReader does, or None when there are more than LONG_ARRAY;
    their number)."""
    if depth > MAX_ARRAY_DEPTH:
        raise GgufClaimError(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
    item_type, count = cursor.unpack("IQ")
    code = _SCALARS.get(item_type)
    each = {_ARRAY: _MIN_ARRAY_BYTES, _STRING: _MIN_STRING_BYTES}.get(item_type) or (struct.calcsize(code) if code else 0)
    if not each:
        raise GgufHeaderError(f"{what}: unknown GGUF array item type {item_type}")
    cursor.room_for(count, each, f"{what}: array length", "items")
    if item_type == _ARRAY:
        flat: list[Any] = []
        total = 0
        for _ in range(count):
            items, n = _array(cursor, what, depth + 1)
            total += n
            if items is not None:
                flat.extend(items)
        return (flat if total <= LONG_ARRAY else None), total
    keep = count <= LONG_ARRAY
    if item_type == _STRING:
        if keep:
            return [cursor.string(what) for _ in range(count)], count
        for _ in range(count):
            cursor.skip_string(what)
        return None, count
    assert code is not None
    if not keep:
        cursor.take(struct.calcsize(code) * count, f"{what} (an array)")
        return None, count
    return list(cursor.unpack(f"{count}{code}")), count


def _tensor_info(cursor: _Cursor, number: int) -> tuple[str, int]:
    """(name, bytes) of one tensor, sized as GGUFReader sizes it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = cursor.string(f"the name of tensor #{number}")
    (n_dims,) = cursor.unpack("I")
    if n_dims > 8:
        raise GgufHeaderError(f"tensor {name!r} claims {n_dims} dimensions")
    dims = cursor.unpack(f"{n_dims}Q")
    (raw_type,) = cursor.unpack("I")
    cursor.unpack("Q")  # the data's offset: the estimate needs only sizes
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        raise GgufHeaderError(f"tensor {name!r} has the unknown type {raw_type}") from None
    elements = 1
    for dim in dims:
        elements *= dim
    return name, elements * size // block
