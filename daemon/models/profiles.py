"""Profiles: one TOML file per model, `NAME.toml`, whose stem is the served model id.

A bad file never takes the others down: loading returns the valid profiles and one
clear error per invalid file.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llmd.daemon.util.durations import parse_duration
from llmd.daemon.errors import ConfigError
from llmd.daemon.models.names import NAME_PATTERN, check_model_name  # noqa: F401 (re-exported)
from llmd.daemon.util.validation import read_toml, validate_file_data
from llmd.drivers.base import Driver, persists_kv, serves_embeddings
from llmd.drivers.settings import LaunchSettings

_Strict = ConfigDict(extra="forbid")

# The `[launch]` table is defined by the driver API, which turns it into argv.
Launch = LaunchSettings


MAX_REPO_PATH_CHARS = 1024


def _repo_path_problem(value: str) -> str | None:
    """Why `value` cannot be a file path or revision inside a repo, or None when it can."""
    if not value:
        return "is empty"
    if len(value) > MAX_REPO_PATH_CHARS:
        return f"is longer than {MAX_REPO_PATH_CHARS} characters"
    # Control characters and line breaks (Unicode's too) could forge lines in logs and replies.
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 or (char.isspace() and char != " ") for char in value):
        return "holds a control character"
    if value.startswith("/"):
        return "is an absolute path"
    if "\\" in value:
        return "holds a backslash"
    if any(part in ("", ".", "..") for part in value.split("/")):
        return "has an empty, '.' or '..' path component"
    return None


class ModelSource(BaseModel):
    """Where the weights come from: a local path, or a Hugging Face repo (file or snapshot)."""

    model_config = _Strict

    path: Path | None = None
    hf_repo: str | None = None
    hf_file: str | None = None
    revision: str | None = None

    @field_validator("hf_file", "revision")
    @classmethod
    def _check_repo_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Both become parts of paths in the Hugging Face cache: they must stay inside it.
        if value is not None:
            problem = _repo_path_problem(value)
            if problem is not None:
                fix = ('write a path inside the repo, like "model-Q4_K_M.gguf" or "sub/dir/model.gguf"'
                       if info.field_name == "hf_file" else 'write a branch, tag or commit hash, like "main"')
                raise ValueError(f"{value!r} {problem}; {fix}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if (self.path is None) == (self.hf_repo is None):
            raise ValueError('set exactly one of path = "/models/x.gguf" or hf_repo = "owner/name"')
        if self.hf_file is not None and self.hf_repo is None:
            raise ValueError("hf_file needs hf_repo")
        return self


class PlacementRules(BaseModel):
    """Overrides for where the scheduler may put the model."""

    model_config = _Strict

    # Skip the estimate and reserve this much VRAM (MiB, total over all cards).
    vram_mib: Annotated[int, Field(gt=0, le=16_777_216)] | None = None
    # Only use these GPU indices (as NVML orders them).
    gpus: list[Annotated[int, Field(ge=0, le=1023)]] | None = None


class Policy(BaseModel):
    """Lifecycle rules."""

    model_config = _Strict

    ttl: str = "30m"
    pinned: bool = False
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    autostart: bool = False
    # Requests the engine gets at once; unset, the engine's own slots (`[launch] parallel`).
    max_concurrency: Annotated[int, Field(ge=1, le=100_000)] | None = None
    # Requests that may wait for a slot; past it a request is refused with 429. Unset, no cap
    # (each still waits at most `[server] queue_timeout`).
    max_queue: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    # Save the engine's prompt cache before every planned stop and restore it at the next start,
    # so a long conversation survives an unload, an eviction or a restart (engines whose driver
    # supports it: llama.cpp).
    persist_kv: bool = False
    # The longest a stop waits for those saves; a save that would take longer is skipped.
    kv_save_timeout: str = "5s"

    @field_validator("ttl")
    @classmethod
    def _check_ttl(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("kv_save_timeout")
    @classmethod
    def _check_kv_save_timeout(cls, value: str) -> str:
        seconds = parse_duration(value)
        if seconds is None or seconds <= 0:
            raise ValueError(f'{value!r} is not a time limit; write it like "5s" or "500ms"')
        return value

    @property
    def ttl_seconds(self) -> float | None:
        return parse_duration(self.ttl)

    @property
    def kv_save_timeout_seconds(self) -> float:
        return parse_duration(self.kv_save_timeout) or 0.0


class Profile(BaseModel):
    """A validated profile file. `name` comes from the file's stem, never from its content."""

    model_config = _Strict

    name: str = Field(default="", exclude=True)
    engine: str
    aliases: list[str] = Field(default_factory=list)
    description: str = ""
    model: ModelSource
    launch: Launch = Field(default_factory=Launch)
    placement: PlacementRules = Field(default_factory=PlacementRules)
    policy: Policy = Field(default_factory=Policy)

    @field_validator("aliases")
    @classmethod
    def _check_aliases(cls, value: list[str]) -> list[str]:
        for alias in value:
            check_model_name(alias)
        return value


@dataclass
class ProfileSet:
    """The profiles found on disk: the valid ones by name, and an error per bad file."""

    profiles: dict[str, Profile] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    sources: dict[str, Path] = field(default_factory=dict)
    # Profile directories that do not exist (nothing was read from them).
    missing_dirs: list[Path] = field(default_factory=list)
    # Names served on in their last good version while their file is invalid (see `keep_last_good`).
    kept: set[str] = field(default_factory=set)
    _aliases: dict[str, str] = field(default_factory=dict)

    def resolve(self, model: str) -> Profile | None:
        """The profile serving `model`, by name or alias."""
        profile = self.profiles.get(model)
        if profile is None and model in self._aliases:
            profile = self.profiles[self._aliases[model]]
        return profile

    @property
    def aliases(self) -> dict[str, str]:
        """Each alias with the name of the profile it serves."""
        return dict(self._aliases)

    def keep_last_good(self, profile: Profile, source: Path | None) -> None:
        """Serve `profile`, the last good version of a file that is now invalid, under its name and
        whichever of its aliases no valid profile took meanwhile; its error stays in `errors`."""
        if profile.name in self.profiles or profile.name in self._aliases:
            return
        self.profiles[profile.name] = profile
        self.kept.add(profile.name)
        if source is not None:
            self.sources.setdefault(profile.name, source)
        for alias in profile.aliases:
            if alias not in self.profiles and alias not in self._aliases:
                self._aliases[alias] = profile.name


def load_profile(
    path: Path,
    known_engines: set[str] | None = None,
    model_dirs: Sequence[Path] = (),
    kv_engines: Collection[str] | None = None,
    *,
    embedding_engines: Collection[str] | None = None,
    require_model_file: bool = False,
) -> Profile:
    """Read one profile file; raise ConfigError naming the file, the field and the fix.

    With `model_dirs`, a local model path must lie inside one of them once symlinks and `..`
    are resolved, and the profile then names the resolved file, so the engine opens exactly
    the file that was checked. With `kv_engines` (the engines whose driver can save and restore
    a prompt cache), `[policy] persist_kv` is refused for any other engine; with
    `embedding_engines`, so is `[launch] embeddings`. With `require_model_file` (the daemon's
    profiles), a local model path must exist: a profile whose model is missing is not served.
    """
    try:
        name = check_model_name(path.stem)
    except ValueError as exc:
        raise ConfigError(f"{path}: file name: {exc}; rename the file") from None
    data = read_toml(path)
    profile: Profile = validate_file_data(Profile, path, data)
    profile.name = name
    if known_engines is not None and profile.engine not in known_engines:
        raise ConfigError(
            f"{path}: engine: unknown engine {profile.engine!r}; use one of: {', '.join(sorted(known_engines))}"
        )
    if profile.policy.persist_kv and kv_engines is not None and profile.engine not in kv_engines:
        able = ", ".join(sorted(kv_engines)) or "none of the installed drivers"
        raise ConfigError(
            f"{path}: policy.persist_kv: the {profile.engine} engine cannot save and restore its prompt cache "
            f"(engines that can: {able}); remove persist_kv from this profile"
        )
    if profile.model.path is not None and not profile.model.path.is_absolute():
        profile.model.path = (path.parent / profile.model.path).resolve()
    if profile.model.path is not None and model_dirs:
        profile.model.path = _inside_model_dirs(path, profile.model.path, model_dirs)
    if profile.launch.embeddings and embedding_engines is not None and profile.engine not in embedding_engines:
        able = ", ".join(sorted(embedding_engines)) or "none of the installed drivers"
        raise ConfigError(
            f"{path}: launch.embeddings: the {profile.engine} engine cannot serve /v1/embeddings "
            f"(engines that can: {able}); remove embeddings from this profile, or use one of those engines"
        )
    if require_model_file and profile.model.path is not None and not profile.model.path.exists():
        raise ConfigError(
            f"{path}: model.path: {profile.model.path} does not exist; fix the path, or put the model there "
            "and reload (SIGHUP, `systemctl reload llmd`)"
        )
    return profile


def _inside_model_dirs(profile_path: Path, model_path: Path, model_dirs: Sequence[Path]) -> Path:
    """`model_path` with symlinks and `..` resolved, or ConfigError if that lies outside every dir."""
    resolved = model_path.resolve()
    if any(resolved.is_relative_to(directory.resolve()) for directory in model_dirs):
        return resolved
    via = f" (which resolves to {resolved})" if resolved != model_path else ""
    allowed = ", ".join(str(directory) for directory in model_dirs)
    raise ConfigError(
        f"{profile_path}: model.path: {model_path}{via} is outside the allowed model directories ({allowed}); "
        "move the model into one of them, or add its directory to [server] model_dirs in llmd.toml"
    )


def kv_engines_of(drivers: Mapping[str, Driver]) -> set[str]:
    """The engines among `drivers` that can save and restore a prompt cache (`persist_kv`)."""
    return {name for name, driver in drivers.items() if persists_kv(driver)}


def embedding_engines_of(drivers: Mapping[str, Driver]) -> set[str]:
    """The engines among `drivers` that serve /v1/embeddings (`[launch] embeddings`)."""
    return {name for name, driver in drivers.items() if serves_embeddings(driver)}


def load_profiles(
    dirs: list[Path],
    known_engines: set[str] | None = None,
    model_dirs: Sequence[Path] = (),
    kv_engines: Collection[str] | None = None,
    *,
    embedding_engines: Collection[str] | None = None,
    require_model_files: bool = False,
) -> ProfileSet:
    """Every `*.toml` in `dirs`. A name or alias already taken is an error for the later file.

    `model_dirs`, when not empty, confines local model paths; `kv_engines` checks
    `persist_kv`, `embedding_engines` `embeddings`, and `require_model_files` that local model
    files exist (see `load_profile`). A directory that does not exist is listed in `missing_dirs`."""
    result = ProfileSet()
    for directory in dirs:
        if not directory.is_dir():
            result.missing_dirs.append(directory)
            continue
        for path in sorted(directory.glob("*.toml")):
            key = path.stem
            try:
                profile = load_profile(
                    path, known_engines, model_dirs, kv_engines,
                    embedding_engines=embedding_engines, require_model_file=require_model_files,
                )
            except ConfigError as exc:
                result.errors[key] = str(exc)
                result.sources[key] = path
                continue
            clash = _first_clash(result, profile)
            if clash:
                result.errors[key] = f"{path}: {clash}"
                result.sources[key] = path
                continue
            result.profiles[profile.name] = profile
            result.sources[profile.name] = path
            for alias in profile.aliases:
                result._aliases[alias] = profile.name
    return result


def _first_clash(existing: ProfileSet, profile: Profile) -> str | None:
    names = [profile.name, *profile.aliases]
    for name in names:
        if name in existing.profiles or name in existing._aliases:
            owner = existing._aliases.get(name, name)
            return (
                f"name {name!r} is already served by {existing.sources[owner]}; "
                "rename one of the files or remove the alias"
            )
    return None
