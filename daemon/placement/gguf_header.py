"""A GGUF file's header (its metadata and tensor infos) read from any binary stream.

`gguf.GGUFReader` memory-maps a whole file on disk; this reader only reads forward from the
start of a stream, so it also works on a file that is not here: `models.range_reader` feeds
it a Hugging Face file through HTTP range requests, a few MB of a multi-GB model, so that
`llmctl plan` can answer "will it fit?" before the download.

Values come out as `GGUFReader`'s `ReaderField.contents()` gives them (Python scalars,
strings, flat lists), so an estimate from a header read here equals one from the file itself.
An array longer than `LONG_ARRAY` (the tokenizer's tokens, scores and merges) is skipped and
given only by its length, as the estimator only ever needs that.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = [
    "ArrayLength",
    "FileHeader",
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

# GGUF value types (gguf.GGUFValueType), with their struct codes for the scalars.
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

_SPLIT = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


class GgufHeaderError(ValueError):
    """The bytes are not the header of a GGUF file this reader understands."""


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


def parse_header(stream: BinaryIO) -> FileHeader:
    """Read the header at the start of `stream`, which is read forward only, never past the
    tensor infos. Raises GgufHeaderError when it is not a GGUF header (or ends inside one)."""
    cursor = _Cursor(stream)
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
    # The pseudo-keys GGUFReader lists among its fields, so that both readers give the same dict.
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = cursor.string()
        if key in metadata:
            raise GgufHeaderError(f"metadata key {key!r} appears twice")
        (value_type,) = cursor.unpack("I")
        metadata[key] = _value(cursor, value_type)
    tensors = tuple(_tensor_info(cursor) for _ in range(n_tensors))
    return FileHeader(metadata=metadata, tensors=tensors, length=cursor.position)


class _Cursor:
    """Reads exact byte counts from a stream, counting them."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.position = 0
        self.order = "<"

    def take(self, n: int) -> bytes:
        if self.position + n > MAX_HEADER_BYTES:
            raise GgufHeaderError(f"the header would be larger than {MAX_HEADER_BYTES // 2**20} MiB")
        data = self.stream.read(n) if n else b""
        if len(data) != n:
            raise GgufHeaderError(f"the file ends inside its header (at byte {self.position + len(data)})")
        self.position += n
        return data

    def unpack(self, codes: str) -> tuple[Any, ...]:
        layout = self.order + codes
        return struct.unpack(layout, self.take(struct.calcsize(layout)))

    def string(self) -> str:
        (length,) = self.unpack("Q")
        return self.take(length).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        (length,) = self.unpack("Q")
        self.take(length)


def _value(cursor: _Cursor, value_type: int) -> Any:
    if value_type == _STRING:
        return cursor.string()
    if value_type == _ARRAY:
        items, count = _array(cursor)
        return items if items is not None else ArrayLength(count)
    code = _SCALARS.get(value_type)
    if code is None:
        raise GgufHeaderError(f"unknown GGUF value type {value_type}")
    return cursor.unpack(code)[0]


def _array(cursor: _Cursor) -> tuple[list[Any] | None, int]:
    """(the items, flattened as GGUFReader does, or None when there are more than LONG_ARRAY;
    their number)."""
    item_type, count = cursor.unpack("IQ")
    if item_type == _ARRAY:
        flat: list[Any] = []
        total = 0
        for _ in range(count):
            items, n = _array(cursor)
            total += n
            if items is not None:
                flat.extend(items)
        return (flat if total <= LONG_ARRAY else None), total
    keep = count <= LONG_ARRAY
    if item_type == _STRING:
        if keep:
            return [cursor.string() for _ in range(count)], count
        for _ in range(count):
            cursor.skip_string()
        return None, count
    code = _SCALARS.get(item_type)
    if code is None:
        raise GgufHeaderError(f"unknown GGUF array item type {item_type}")
    if not keep:
        cursor.take(struct.calcsize(code) * count)
        return None, count
    return list(cursor.unpack(f"{count}{code}")), count


def _tensor_info(cursor: _Cursor) -> tuple[str, int]:
    """(name, bytes) of one tensor, sized as GGUFReader sizes it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = cursor.string()
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
