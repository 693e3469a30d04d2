"""What Ollama's model routes say of llmd's profiles: `/api/tags`, `/api/ps` and `/api/show`.

A profile's model is described from its files: the size on disk, the time they were written,
and for a GGUF model its header (architecture, parameter count, quantization, chat template),
read once per file version and kept. A Hugging Face checkpoint directory is described from its
`config.json`. A model that is not downloaded yet is listed with size 0 and what the profile says.

Ollama's `digest` names a model's content; llmd does not hash multi-GiB files to list them, so
it is a SHA-256 of the model's path, size and modification time: it changes when the file does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from llmd.daemon.errors import LlmdError
from llmd.daemon.http.ollama_requests import tagged
from llmd.daemon.manager.core import Manager
from llmd.daemon.manager.loading import Loader
from llmd.daemon.manager.state import Instance, State
from llmd.daemon.models.profiles import Profile
from llmd.daemon.placement.estimate import GgufHeader, read_gguf_header

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Where a model that is never unloaded expires, as a time (Ollama writes a far future too).
_NEVER = datetime(9999, 12, 31, tzinfo=UTC)
# Metadata that describes the file rather than the model, or is shown elsewhere (`template`).
_NOT_MODEL_INFO = ("GGUF.", "tokenizer.chat_template")


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def human_parameters(count: int) -> str:
    """A parameter count as Ollama writes it: 8.0B, 494.03M, 116K."""
    for scale, suffix, decimals in ((1e9, "B", 1), (1e6, "M", 2)):
        if count >= scale:
            number = count / scale
            return f"{number:.0f}{suffix}" if number.is_integer() else f"{number:.{decimals}f}{suffix}"
    return f"{count / 1e3:.0f}K" if count >= 1e3 else str(count)


def quantization_name(file_type: object) -> str:
    """GGUF's `general.file_type` as Ollama names it: Q4_K_M, Q8_0, F16."""
    if not isinstance(file_type, int):
        return ""
    import gguf

    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return ""
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


@dataclass
class ModelFiles:
    """What the files of one profile's model say of it."""

    path: Path | None = None
    size: int = 0
    modified: datetime | None = None
    digest: str = ""
    format: str = ""
    header: GgufHeader | None = None
    config: dict[str, Any] = field(default_factory=dict)  # a checkpoint's config.json

    def details(self) -> dict[str, Any]:
        """Ollama's `details` object."""
        family, parameters, quantization = "", "", ""
        if self.header is not None:
            meta = self.header.metadata
            family = str(meta.get("general.architecture") or "")
            parameters = human_parameters(self.header.parameters) if self.header.parameters else ""
            quantization = quantization_name(meta.get("general.file_type"))
        elif self.config:
            family = str(self.config.get("model_type") or "")
            dtype = self.config.get("torch_dtype") or self.config.get("dtype")
            quantization = str(dtype).upper().replace("BFLOAT16", "BF16").replace("FLOAT16", "F16") if dtype else ""
        return {
            "parent_model": "",
            "format": self.format,
            "family": family,
            "families": [family] if family else None,
            "parameter_size": parameters,
            "quantization_level": quantization,
        }

    def metadata(self) -> dict[str, Any]:
        return self.header.metadata if self.header is not None else {}


def _size_of(path: Path) -> int:
    """Bytes of the model at `path`: a file with its split parts, or a directory's files."""
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    parts = sorted(path.parent.glob(path.name.replace("00001-of-", "*-of-"))) if "-00001-of-" in path.name else [path]
    return sum(part.stat().st_size for part in parts if part.exists())


class ModelCatalog:
    """Descriptions of the profiles' models, from their files; GGUF headers are kept per file
    version. `describe` reads files: call it from a worker thread (`anyio.to_thread`)."""

    def __init__(self) -> None:
        self._headers: dict[tuple[str, int, int], GgufHeader | None] = {}

    def describe(self, profile: Profile) -> ModelFiles:
        try:
            path = Loader.local_model_path(profile)
        except LlmdError:  # not downloaded yet, or the file is gone: the profile says the rest
            return ModelFiles(format="gguf" if str(profile.model.hf_file or profile.model.path or "").endswith(".gguf") else "")
        try:
            stat = path.stat()
            size = _size_of(path)
        except OSError:
            return ModelFiles(path=path)
        modified = datetime.fromtimestamp(stat.st_mtime, UTC)
        digest = hashlib.sha256(f"{path}\0{size}\0{stat.st_mtime_ns}".encode()).hexdigest()
        files = ModelFiles(path=path, size=size, modified=modified, digest=digest)
        if path.is_dir():
            files.format = "safetensors"
            files.config = _read_config(path)
        elif path.suffix == ".gguf":
            files.format = "gguf"
            files.header = self._header(path, stat.st_size, stat.st_mtime_ns)
        return files

    def _header(self, path: Path, size: int, mtime_ns: int) -> GgufHeader | None:
        key = (str(path), size, mtime_ns)
        if key not in self._headers:
            try:
                self._headers[key] = read_gguf_header(path)
            except LlmdError as exc:
                log.warning("cannot describe %s: %s", path, exc)
                self._headers[key] = None
        return self._headers[key]


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


# ----- the routes' bodies -----


def tag_entry(name: str, files: ModelFiles) -> dict[str, Any]:
    """One model of `/api/tags`."""
    return {
        "name": tagged(name),
        "model": tagged(name),
        "modified_at": _rfc3339(files.modified or datetime.now(UTC)),
        "size": files.size,
        "digest": files.digest,
        "details": files.details(),
    }


def context_length(inst: Instance) -> int:
    """The context the model runs with: what it was placed with, else what its profile asks."""
    if inst.placement is not None:
        return inst.placement.ctx
    return inst.ctx_override or inst.profile.launch.ctx


def expires_at(inst: Instance) -> str:
    """When the model will be stopped for idleness, if nothing uses it before then."""
    ttl = inst.idle_ttl()
    if ttl is None or math.isinf(ttl):
        return _rfc3339(_NEVER)
    idle = 0.0 if inst.in_flight else max(0.0, time.monotonic() - inst.last_used)
    return _rfc3339(datetime.now(UTC) + timedelta(seconds=ttl - idle))


def running(manager: Manager) -> list[Instance]:
    """The models `/api/ps` lists: those whose engine is up (serving, or parked asleep)."""
    return [inst for _, inst in sorted(manager.instances.items()) if inst.state in (State.READY, State.SLEEPING)]


def ps_entry(inst: Instance, files: ModelFiles) -> dict[str, Any]:
    """One model of `/api/ps`. `size_vram` is the GPU memory llmd placed it in; `size` is that
    or, for a model held in host memory as well, at least the size of its files."""
    vram = sum(inst.claimed().values()) * MIB if inst.placement is not None else 0
    return {
        "name": tagged(inst.name),
        "model": tagged(inst.name),
        "size": max(vram, files.size),
        "digest": files.digest,
        "details": files.details(),
        "expires_at": expires_at(inst),
        "size_vram": vram,
        "context_length": context_length(inst),
    }


def capabilities(profile: Profile, files: ModelFiles) -> list[str]:
    """What the model can be asked for, as Ollama names it, from its profile and chat template."""
    template = str(files.metadata().get("tokenizer.chat_template") or "")
    args = profile.launch.extra_args
    found = ["completion"]
    if "tools" in template:
        found.append("tools")
    if "enable_thinking" in template or "<think>" in template:
        found.append("thinking")
    if "--mmproj" in args or "-mm" in args:
        found.append("vision")
    if "--embeddings" in args or "--embedding" in args:
        found.append("embedding")
    return found


def show_body(profile: Profile, files: ModelFiles, ctx: int) -> dict[str, Any]:
    """`/api/show`: the model's details, its GGUF metadata as `model_info`, the parameters llmd
    runs it with, and its chat template where the file has one."""
    meta = files.metadata()
    info: dict[str, Any] = {
        key: None if isinstance(value, list) else value
        for key, value in meta.items()
        if not key.startswith(_NOT_MODEL_INFO)
    }
    if files.header is not None:
        info["general.parameter_count"] = files.header.parameters
    parameters = f"num_ctx {ctx}"
    source = files.path or profile.model.path or profile.model.hf_repo
    modelfile = (
        f"# llmd serves this model from the profile {profile.name!r} (engine {profile.engine});\n"
        f"# change it there: models are managed through profiles, not Modelfiles.\n"
        f"FROM {source}\nPARAMETER {parameters}\n"
    )
    return {
        "license": str(meta.get("general.license") or ""),
        "modelfile": modelfile,
        "parameters": parameters,
        "template": str(meta.get("tokenizer.chat_template") or ""),
        "details": files.details(),
        "model_info": info,
        "capabilities": capabilities(profile, files),
        "modified_at": _rfc3339(files.modified or datetime.now(UTC)),
    }
