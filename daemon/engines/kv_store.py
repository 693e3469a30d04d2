"""Saved prompt caches on disk: where they live, what makes one valid, and the disk cap.

A profile with `[policy] persist_kv` has its engine's slots saved before every planned stop
and restored at its next start (`llmd.daemon.manager.kv_persist`). This module owns the files:

    state_dir/kv/MODEL/KEY/manifest.json
    state_dir/kv/MODEL/KEY/slot0-18c2f3a4b5d.bin

KEY is a digest of everything that makes a saved cache valid for a launch (`launch_key`): the
model file (size and modification time), the engine's executable, the context size, the slot
count, the KV cache type and the extra engine flags. A launch with another key never sees the
files, and preparing it deletes the model's other keys: a profile change or an engine upgrade
invalidates what was saved before.

The manifest records each slot's file with its size and SHA-256. A file is handed to the engine
only when both match (`verify`): llama-server aborts on a truncated file and would silently load
a corrupted one. Every save goes to a new file name, and the manifest, rewritten atomically,
switches to it only once it is complete; so a crash at any point leaves the previous save
whole, and files the manifest does not name are leftovers, removed before the next launch.

The manifests are read and written on the event loop only (they are small); only hashing, the
slow part, runs in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmd.daemon.util.atomic_write import write_json_atomic
from llmd.daemon.util.state_file import BadState, expect, expect_number, read_state

MANIFEST = "manifest.json"
# The manifest's format; a manifest of another version is ignored (and its files dropped).
MANIFEST_VERSION = 1
SAVE_SUFFIX = ".bin"


@dataclass(frozen=True)
class SavedSlot:
    """One slot's saved cache: its file in the launch's directory, and what it holds."""

    slot: int
    file: str
    bytes: int
    sha256: str
    tokens: int
    # Wall-clock times (the disk cap's LRU order survives restarts).
    saved_at: float
    used_at: float


@dataclass(frozen=True)
class Dropped:
    """A save the disk cap deleted."""

    model: str
    slot: int
    bytes: int


def launch_key(
    *,
    engine: str,
    command: list[str],
    model_path: Path,
    ctx: int,
    slots: int,
    cache_type: str,
    extra_args: list[str],
) -> dict[str, Any]:
    """What makes a saved cache valid for a launch; any change gives another key.

    The engine's version is its executable's identity (path, size, modification time), so an
    upgrade, a rebuild or another configured command all count as another engine."""
    model = model_path.stat()
    return {
        "engine": engine,
        "command": list(command),
        "executable": _file_identity(Path(command[0])) if command else None,
        "model": str(model_path),
        "model_bytes": model.st_size,
        "model_mtime_ns": model.st_mtime_ns,
        "ctx": ctx,
        "slots": slots,
        "cache_type": cache_type,
        "extra_args": list(extra_args),
    }


def key_id(key: dict[str, Any]) -> str:
    """A short, stable name for `key`: the directory its saves live in."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _file_identity(path: Path) -> dict[str, Any] | None:
    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError:
        return None
    return {"path": str(resolved), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in chunks: slow for large caches, so call it off the event loop."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class KvStore:
    """The saved prompt caches under `root` (state_dir/kv), for every model."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # ----- a launch's directory -----

    def prepare(self, model: str, key: dict[str, Any]) -> tuple[Path, int]:
        """The directory for a launch of `model` with `key`, ready for the engine: created if
        new, cleared of files its manifest does not name (a save cut short). The model's
        directories for other keys are deleted. Returns (directory, bytes deleted with them)."""
        model_dir = self.root / model
        directory = model_dir / key_id(key)
        invalidated = 0
        if model_dir.is_dir():
            for other in model_dir.iterdir():
                if other != directory and other.is_dir():
                    invalidated += sum(saved.bytes for saved in self._manifest_slots(other).values())
                    shutil.rmtree(other, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = self._read(directory)
        if manifest.get("key") != key:
            manifest = {"version": MANIFEST_VERSION, "key": key, "slots": {}}
            self._write(directory, manifest)
        named = {entry["file"] for entry in manifest["slots"].values()} | {MANIFEST}
        for path in directory.iterdir():
            if path.name not in named and path.is_file():
                path.unlink(missing_ok=True)
        return directory, invalidated

    def remove_model(self, model: str) -> int:
        """Delete every save of `model` (its profile no longer keeps them); returns the bytes freed."""
        model_dir = self.root / model
        if not model_dir.is_dir():
            return 0
        freed = sum(saved.bytes for name, _, saved in self._everything() if name == model)
        shutil.rmtree(model_dir, ignore_errors=True)
        return freed

    @staticmethod
    def new_file_name(slot: int) -> str:
        """A file name no earlier save of `slot` used, for the engine to write the next save to."""
        return f"slot{slot}-{time.time_ns():x}{SAVE_SUFFIX}"

    # ----- what is saved -----

    def saved(self, directory: Path) -> tuple[list[SavedSlot], list[tuple[SavedSlot, str]]]:
        """(the saves in `directory` whose files are there with their recorded size, the others
        with what is wrong with them). The others are dropped from the manifest."""
        good: list[SavedSlot] = []
        bad: list[tuple[SavedSlot, str]] = []
        for saved in self._manifest_slots(directory).values():
            try:
                size = (directory / saved.file).stat().st_size
            except OSError:
                bad.append((saved, "its file is missing"))
                continue
            if size != saved.bytes:
                bad.append((saved, f"its file holds {size} bytes, not the {saved.bytes} saved (truncated?)"))
                continue
            good.append(saved)
        for saved, _ in bad:
            self.drop(directory, saved.slot)
        return sorted(good, key=lambda saved: saved.slot), bad

    @staticmethod
    def verify(directory: Path, saved: SavedSlot) -> str | None:
        """What is wrong with a save's file, or None when its size and SHA-256 are as recorded.
        Reads the whole file: call it off the event loop."""
        path = directory / saved.file
        try:
            if path.stat().st_size != saved.bytes:
                return f"its file holds {path.stat().st_size} bytes, not the {saved.bytes} saved (truncated?)"
            if file_sha256(path) != saved.sha256:
                return "its file's SHA-256 differs from the one recorded when it was saved (corrupted?)"
        except OSError as exc:
            return f"its file cannot be read: {exc}"
        return None

    def record(self, directory: Path, saved: SavedSlot) -> None:
        """Make `saved` (its file complete and hashed) the slot's save; the previous one's file
        is deleted only after the manifest names the new one."""
        manifest = self._read(directory)
        slots = manifest.setdefault("slots", {})
        previous = slots.get(str(saved.slot))
        slots[str(saved.slot)] = asdict(saved)
        self._write(directory, manifest)
        if previous is not None and previous.get("file") != saved.file:
            (directory / previous["file"]).unlink(missing_ok=True)

    def touch(self, directory: Path, slot: int) -> None:
        """Mark a slot's save as just used (restored), for the disk cap's LRU order."""
        manifest = self._read(directory)
        entry = manifest.get("slots", {}).get(str(slot))
        if entry is not None:
            entry["used_at"] = time.time()
            self._write(directory, manifest)

    def drop(self, directory: Path, slot: int) -> None:
        """Delete a slot's save: its manifest entry first, then its file."""
        manifest = self._read(directory)
        entry = manifest.get("slots", {}).pop(str(slot), None)
        if entry is None:
            return
        self._write(directory, manifest)
        (directory / entry["file"]).unlink(missing_ok=True)

    def totals(self) -> dict[str, tuple[int, int]]:
        """(tokens, bytes) saved per model, over all its launches' directories."""
        totals: dict[str, tuple[int, int]] = {}
        for model, _, saved in self._everything():
            tokens, size = totals.get(model, (0, 0))
            totals[model] = (tokens + saved.tokens, size + saved.bytes)
        return totals

    def enforce_cap(self, max_bytes: int) -> list[Dropped]:
        """Delete the least recently used saves, of any model, until all of them together take
        at most `max_bytes`. Returns what was deleted."""
        everything = sorted(self._everything(), key=lambda found: found[2].used_at)
        total = sum(saved.bytes for _, _, saved in everything)
        dropped: list[Dropped] = []
        for model, directory, saved in everything:
            if total <= max_bytes:
                break
            self.drop(directory, saved.slot)
            total -= saved.bytes
            dropped.append(Dropped(model, saved.slot, saved.bytes))
        return dropped

    # ----- manifests -----

    def _everything(self) -> list[tuple[str, Path, SavedSlot]]:
        found = []
        if not self.root.is_dir():
            return found
        for model_dir in sorted(self.root.iterdir()):
            if not model_dir.is_dir():
                continue
            for directory in sorted(model_dir.iterdir()):
                if directory.is_dir():
                    found += [(model_dir.name, directory, saved) for saved in self._manifest_slots(directory).values()]
        return found

    def _manifest_slots(self, directory: Path) -> dict[int, SavedSlot]:
        slots = {}
        for entry in self._read(directory).get("slots", {}).values():
            try:
                saved = SavedSlot(**entry)
            except TypeError:
                continue  # written by another version of llmd: not trusted
            slots[saved.slot] = saved
        return slots

    @staticmethod
    def _read(directory: Path) -> dict[str, Any]:
        # A damaged manifest is moved aside: its files are then leftovers, removed at the next launch.
        return read_state(directory / MANIFEST, _parse_manifest) or {}

    @staticmethod
    def _write(directory: Path, manifest: dict[str, Any]) -> None:
        manifest["version"] = MANIFEST_VERSION
        write_json_atomic(directory / MANIFEST, manifest, indent=1, sort_keys=True)



def _parse_manifest(manifest: Any) -> dict[str, Any]:
    """A manifest of this version with every slot checked, or {} for one of another version.

    A slot's file must be a plain name in the launch's directory: the manifest decides which
    files are handed to the engine and which are deleted."""
    expect(manifest, dict, "the manifest")
    if expect(manifest["version"], int, "version") != MANIFEST_VERSION:
        return {}
    expect(manifest["key"], dict, "key")
    for number, entry in expect(manifest["slots"], dict, "slots").items():
        expect(entry, dict, f"slot {number}")
        saved = SavedSlot(**entry)
        if str(expect_number(saved.slot, f"slot {number}.slot", integer=True)) != number:
            raise BadState(f"slot {number} records slot {saved.slot}")
        name = expect(saved.file, str, f"slot {number}.file")
        if Path(name).name != name or not name.endswith(SAVE_SUFFIX):
            raise BadState(f"slot {number}.file {name!r} is not a save's file name")
        expect_number(saved.bytes, f"slot {number}.bytes", integer=True)
        expect_number(saved.tokens, f"slot {number}.tokens", integer=True)
        expect(saved.sha256, str, f"slot {number}.sha256")
        expect_number(saved.saved_at, f"slot {number}.saved_at")
        expect_number(saved.used_at, f"slot {number}.used_at")
    return manifest
