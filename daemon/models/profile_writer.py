"""Writing a new profile (`llmctl profile new`): from a local model or a Hugging Face repo.

The file is built with tomli-w, table by table and key by key, with a comment above each key
saying what it does (tomli-w itself writes no comments). Before anything is written the text
is parsed back and validated by `profiles.load_profile`, the code the daemon loads profiles
with, so a profile written here is one the daemon accepts.
"""

from __future__ import annotations

import re
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from llmd.daemon.util.atomic_write import write_atomic
from llmd.daemon.config import DaemonConfig
from llmd.daemon.errors import ConfigError, LlmdError
from llmd.daemon.models.profiles import Profile, ProfileSet, check_model_name, load_profile, load_profiles
from llmd.daemon.util.units import format_mib

# A GGUF repo usually offers one file per quantisation. Q4_K_M is the common choice: about a
# quarter of the f16 size with little loss; the rest are ordered by how close they come to it.
QUANT_PREFERENCE = (
    "Q4_K_M", "Q4_K_S", "Q5_K_M", "IQ4_XS", "Q4_0", "IQ4_NL", "Q5_K_S", "Q6_K", "Q5_0",
    "Q3_K_L", "Q3_K_M", "Q8_0", "IQ3_M", "Q3_K_S", "Q2_K", "BF16", "F16", "F32",
)
DEFAULT_CTX = 4096
DEFAULT_TTL = "30m"

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_QUANT = re.compile(r"(?:^|[-_.])((?:I?Q[1-8](?:_[0-9A-Z]{1,4}){0,2})|BF16|F16|F32)(?=[-_.]|$)")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")

# What each key does, written above it in the file.
KEY_NOTES: dict[str, str] = {
    "engine": "which engine runs the model; installed drivers: {engines}",
    "aliases": "other names clients may use for this model",
    "description": "shown by `llmctl ls`",
    "model.path": "the model on this machine: a .gguf file (llama.cpp) or a model directory (vLLM, fastllm)",
    "model.hf_repo": "a Hugging Face repo; `llmctl pull NAME` (or the first request) downloads it into the HF cache",
    "model.hf_file": "the file to use from the repo; without hf_file the whole repo snapshot is used",
    "model.revision": "the branch, tag or commit of the repo to use (default: main)",
    "launch.ctx": "context length in tokens for each sequence",
    "launch.parallel": "concurrent sequences (llama.cpp slots); the KV cache is sized for all of them",
    "launch.tensor_parallel": 'how many GPUs to split the model over: 1, N, or "auto" when one card is too small',
    "launch.offload": 'what may move to the CPU when the GPUs are too small: "none", "auto" (layers), '
    '"moe-experts", or a number of layers',
    "launch.cache_type": "KV cache element type: f16, q8_0 or q4_0 (smaller, slightly less exact)",
    "launch.extra_args": "engine flags, appended verbatim as argv items (never through a shell)",
    "policy.ttl": 'stop the engine after this long idle, like "30m" or "2h"; "never" keeps it loaded',
    "policy.pinned": "never evict this model to make room for another",
    "policy.priority": "when room is short, models with a higher priority are kept over lower ones",
}


class ProfileUsageError(LlmdError):
    """What was asked for cannot make a profile (bad engine, model, or option value): exit 2."""


class ProfileExistsError(LlmdError):
    """A profile of that name exists already and --force was not given."""


@dataclass
class HubFile:
    path: str
    size: int


@dataclass
class Draft:
    """A profile about to be written: its tables, and the comments that explain them."""

    name: str
    data: dict[str, Any]
    header: list[str] = field(default_factory=list)
    # Extra comment lines under a key's note, by dotted key ("model.hf_file").
    notes: dict[str, list[str]] = field(default_factory=dict)
    # Keys shown commented out as suggestions, by table ("" for the top level): (key, value, why).
    hints: dict[str, list[tuple[str, Any, str]]] = field(default_factory=dict)


@dataclass
class Options:
    """What `llmctl profile new` was told beyond the model; None means "use the default"."""

    ctx: int | None = None
    parallel: int | None = None
    tensor_parallel: int | str | None = None
    offload: int | str | None = None
    cache_type: str | None = None
    extra_args: Sequence[str] = ()
    ttl: str | None = None
    aliases: Sequence[str] = ()
    description: str | None = None


# ----- engines -----


def installed_engines() -> list[str]:
    """Engine names the daemon would accept (built-in and plugin drivers)."""
    from llmd.drivers.registry import load_drivers

    return sorted(load_drivers())


def check_engine(engine: str, known: Sequence[str]) -> str:
    if engine not in known:
        raise ProfileUsageError(f"--engine {engine!r} is not a known engine; use one of: {', '.join(sorted(known))}")
    return engine


# ----- drafts -----


def draft_local(name: str, model: str, engine: str | None, known: Sequence[str], options: Options,
                file: str | None = None, revision: str | None = None) -> Draft:
    """A profile for `model`: a path on this machine, or a Hugging Face repo id (owner/name)."""
    check_name(name)
    path = Path(model).expanduser()
    if path.exists():
        if file is not None or revision is not None:
            raise ProfileUsageError(
                f"--file and --revision are for a Hugging Face repo, but --model {model!r} is a local path; "
                "give the file itself as --model"
            )
        path = path.resolve()
        source: dict[str, Any] = {"path": str(path)}
        guessed = "llama-cpp" if path.is_file() and path.suffix.lower() == ".gguf" else (
            "vllm" if path.is_dir() and (path / "config.json").is_file() else None)
    elif _REPO_ID.match(model) and not model.lower().endswith(".gguf"):
        source = {"hf_repo": model}
        if file is not None:
            source["hf_file"] = file
        if revision is not None:
            source["revision"] = revision
        guessed = "llama-cpp" if file is not None and file.lower().endswith(".gguf") else None
    else:
        raise ProfileUsageError(
            f"--model {model!r}: no such file or directory, and not a Hugging Face repo id (owner/name); give the "
            "path of a .gguf file or model directory, or a repo as owner/name (or use --from-hf REPO to pick its file)"
        )
    engine = _engine_or_guess(engine, guessed, model, known)
    if engine == "llama-cpp" and (("path" in source and path.is_dir()) or ("hf_repo" in source and file is None)):
        raise ProfileUsageError(
            f"llama-cpp runs one GGUF file, but --model {model!r} names a "
            + ("directory; give the .gguf file inside it" if "path" in source else "whole repo; add --file NAME.gguf")
        )
    return _draft(name, engine, known, source, options, [f"{name}: a model served by llmd; the file name is its model id."])


def draft_from_hub(name: str, repo: str, engine: str | None, known: Sequence[str], options: Options,
                   file: str | None = None, revision: str | None = None) -> Draft:
    """A profile for a Hugging Face repo, choosing the engine and file from the repo's listing.

    GGUF files mean llama-cpp, with the Q4_K_M file (or the closest quantisation) unless `file`
    names another; a config.json with safetensors weights means vLLM on the whole snapshot."""
    check_name(name)
    _check_hub_repo(repo)
    commit, files = list_hub_files(repo, revision)
    ggufs = [f for f in files if f.path.lower().endswith(".gguf") and "mmproj" not in f.path.rsplit("/", 1)[-1].lower()]
    paths = {f.path for f in files}
    snapshot_ok = "config.json" in paths and any(f.path.endswith(_WEIGHT_SUFFIXES) for f in files)
    guessed = "llama-cpp" if ggufs else ("vllm" if snapshot_ok else None)
    where = f"{repo}@{revision}" if revision else repo
    if engine is None and guessed is None:
        raise ProfileUsageError(
            f"{where} has neither GGUF files nor a config.json with safetensors weights, so no engine can be "
            f"chosen for it (files: {_listing(files)}); pass --engine and --model instead"
        )
    engine = check_engine(engine, known) if engine is not None else guessed
    assert engine is not None
    source: dict[str, Any] = {"hf_repo": repo}
    header = [f"{name}: {repo} from Hugging Face (commit {commit[:12]} when this was written)."]
    notes: dict[str, list[str]] = {}
    if engine == "llama-cpp":
        if not ggufs:
            raise ProfileUsageError(f"{where} has no GGUF file for llama-cpp; use --engine vllm (or fastllm) for it")
        chosen, lines = choose_gguf(ggufs, file, where)
        source["hf_file"] = chosen
        notes["model.hf_file"] = lines
    else:
        if file is not None:
            raise ProfileUsageError(f"--file is for llama-cpp's single GGUF file; {engine} uses the whole snapshot of {repo}")
        if not snapshot_ok:
            raise ProfileUsageError(
                f"{where} has no config.json with safetensors weights for {engine}"
                + ("; its GGUF files need --engine llama-cpp" if ggufs else "")
            )
        total = sum(f.size for f in files)
        notes["model.hf_repo"] = [f"the whole snapshot: {len(files)} files, {format_mib(total / 2**20)}"]
    if revision is not None:
        source["revision"] = revision
    draft = _draft(name, engine, known, source, options, header)
    draft.notes.update(notes)
    if revision is None:
        draft.hints.setdefault("model", []).append(
            ("revision", commit, "pin the commit listed when this was written (default: follow main)"))
    return draft


def _check_hub_repo(repo: str) -> str:
    """`repo` if the Hub would accept it as a repo id, else ProfileUsageError naming --from-hf.

    Checked before the Hub is asked: its own refusal reads as advice for a profile file."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    why = "it must be owner/name, each part of letters, digits, '-', '_' and '.'"
    if _REPO_ID.match(repo):
        try:
            validate_repo_id(repo)
            return repo
        except HFValidationError as exc:
            why = str(exc).split(":", 1)[0].rstrip(".")  # the rule it breaks, without the value again
    raise ProfileUsageError(
        f"--from-hf {repo!r} is not a Hugging Face repo id: {why}. Give it as owner/name, as in the repo's "
        "address on the Hub, e.g. --from-hf Qwen/Qwen3-0.6B-GGUF"
    )


def _engine_or_guess(engine: str | None, guessed: str | None, model: str, known: Sequence[str]) -> str:
    if engine is not None:
        return check_engine(engine, known)
    if guessed is None:
        raise ProfileUsageError(f"cannot tell which engine runs {model!r}; pass --engine (one of: {', '.join(known)})")
    return guessed


def _draft(name: str, engine: str, known: Sequence[str], source: dict[str, Any], options: Options,
           header: list[str]) -> Draft:
    data: dict[str, Any] = {"engine": engine}
    if options.aliases:
        data["aliases"] = list(options.aliases)
    if options.description:
        data["description"] = options.description
    data["model"] = source
    launch: dict[str, Any] = {"ctx": options.ctx if options.ctx is not None else DEFAULT_CTX}
    for key in ("parallel", "tensor_parallel", "offload", "cache_type"):
        value = getattr(options, key)
        if value is not None:
            launch[key] = value
    if options.extra_args:
        launch["extra_args"] = list(options.extra_args)
    data["launch"] = launch
    data["policy"] = {"ttl": options.ttl if options.ttl is not None else DEFAULT_TTL}
    hints: dict[str, list[tuple[str, Any, str]]] = {}
    if "tensor_parallel" not in launch:
        hints.setdefault("launch", []).append(("tensor_parallel", "auto", "split over several GPUs when one is too small"))
    if engine == "llama-cpp" and "offload" not in launch:
        hints.setdefault("launch", []).append(("offload", "auto", "move layers to the CPU when the GPUs are full"))
    hints.setdefault("policy", []).append(("pinned", True, "never evict this model to make room for another"))
    header = [*header, "Written by `llmctl profile new`; edit freely, then `llmctl plan NAME` checks it.",
              f"Engines: {', '.join(known)}."]
    return Draft(name=name, data=data, header=header, hints=hints)


# ----- GGUF choice -----


def quant_of(path: str) -> str | None:
    """The quantisation named in a GGUF file name ("Q4_K_M"), or None."""
    stem = _SHARD.sub(".gguf", path.rsplit("/", 1)[-1])[: -len(".gguf")].upper()
    found = _QUANT.findall(stem)
    return found[-1] if found else None


def choose_gguf(files: Sequence[HubFile], wanted: str | None, where: str) -> tuple[str, list[str]]:
    """The GGUF file to use and comment lines listing the alternatives.

    A model split into shards (`-00001-of-00003.gguf`) counts once, by its first shard, which
    is the file llama.cpp is given (it opens the other shards itself)."""
    variants: dict[str, list[HubFile]] = {}
    for f in sorted(files, key=lambda f: f.path):
        variants.setdefault(_SHARD.sub(".gguf", f.path), []).append(f)
    firsts = {group[0].path: group for group in variants.values()}
    if wanted is not None:
        if wanted not in firsts:
            raise ProfileUsageError(
                f"--file {wanted!r} is not a GGUF file in {where} (or not the first shard of one); "
                f"choose one of: {', '.join(firsts)}"
            )
        chosen = wanted
    else:
        def rank(first: str) -> tuple[int, int]:
            quant = quant_of(first)
            order = QUANT_PREFERENCE.index(quant) if quant in QUANT_PREFERENCE else len(QUANT_PREFERENCE)
            return order, sum(f.size for f in firsts[first])

        chosen = min(firsts, key=rank)
    lines = []
    others = [first for first in firsts if first != chosen]
    if others:
        lines.append("other files in the repo (set hf_file to one of them):")
        for first in others:
            size = format_mib(sum(f.size for f in firsts[first]) / 2**20)
            lines.append(f"  {first}  ({quant_of(first) or 'unknown quantisation'}, {size})")
    return chosen, lines


# ----- the Hub -----


def list_hub_files(repo: str, revision: str | None) -> tuple[str, list[HubFile]]:
    """(commit, files) of `repo` at `revision` through huggingface_hub, which honours HF_ENDPOINT
    and HF_TOKEN. Errors are the DownloadErrors `llmctl pull` reports, saying what to fix."""
    from llmd.daemon.models.downloads import list_repo_files

    commit, files = list_repo_files(repo, revision)
    return commit, [HubFile(path, size) for path, size in files]


def _listing(files: Sequence[HubFile], limit: int = 8) -> str:
    names = [f.path for f in files[:limit]]
    more = f", and {len(files) - limit} more" if len(files) > limit else ""
    return (", ".join(names) + more) if names else "none"


# ----- rendering and validating -----


def render(draft: Draft, engines: Sequence[str] = ()) -> str:
    """The profile as TOML text: each key written by tomli-w, with its note above it."""
    lines = [f"# {line}" for line in draft.header]
    tables = {key: value for key, value in draft.data.items() if isinstance(value, dict)}
    top = {key: value for key, value in draft.data.items() if not isinstance(value, dict)}
    lines += _keys("", top, draft, engines)
    for table, values in tables.items():
        lines += ["", tomli_w.dumps({table: {}}).rstrip()]
        lines += _keys(table, values, draft, engines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _keys(table: str, values: dict[str, Any], draft: Draft, engines: Sequence[str]) -> list[str]:
    lines: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            raise TypeError(f"{table}.{key}: nested tables are not written by profile new")
        dotted = f"{table}.{key}" if table else key
        note = KEY_NOTES.get(dotted)
        if note:
            lines.append("# " + note.format(engines=", ".join(engines) or "see `llmctl engines`"))
        lines += [f"# {extra}" for extra in draft.notes.get(dotted, [])]
        lines += tomli_w.dumps({key: value}).rstrip().splitlines()
    for key, value, why in draft.hints.get(table, []):
        lines.append(f"# {why}:")
        lines += ["# " + line for line in tomli_w.dumps({key: value}).rstrip().splitlines()]
    return lines


def validate(draft: Draft, text: str, target: Path, config: DaemonConfig, engines: Sequence[str]) -> Profile:
    """Parse `text` back and validate it as the daemon would load it from `target`.

    Raises ProfileUsageError naming the field that is wrong (the values came from the options)."""
    parsed = tomllib.loads(text)
    if parsed != draft.data:  # the comments must not have changed what the tables say
        raise LlmdError(f"the profile text for {draft.name} does not parse back to what was meant: {parsed!r}")
    with tempfile.TemporaryDirectory(prefix="llmd-profile-") as scratch:
        probe = Path(scratch) / target.name
        probe.write_text(text)
        try:
            return load_profile(probe, set(engines), config.server.model_dirs)
        except ConfigError as exc:
            raise ProfileUsageError(str(exc).replace(str(probe), str(target))) from None


def check_name(name: str) -> str:
    try:
        return check_model_name(name)
    except ValueError as exc:
        raise ProfileUsageError(f"NAME: {exc}") from None


def target_path(name: str, directory: Path | None, config: DaemonConfig) -> Path:
    """Where NAME's profile goes: `directory`, else the first of `[server] profile_dirs`."""
    return (directory if directory is not None else config.server.profile_dirs[0]) / f"{check_name(name)}.toml"


def refuse_existing(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise ProfileExistsError(f"{target} exists already; pass --force to replace it, or choose another NAME")


def check_clashes(profile: Profile, target: Path, config: DaemonConfig, engines: Sequence[str]) -> ProfileSet:
    """Refuse a name or alias that another profile file already serves (the daemon would skip one)."""
    dirs = list(config.server.profile_dirs)
    if target.parent not in dirs:
        dirs.append(target.parent)
    existing = load_profiles(dirs, set(engines), config.server.model_dirs)
    for wanted in (profile.name, *profile.aliases):
        owner = existing.resolve(wanted)
        source = existing.sources.get(owner.name if owner is not None else wanted)
        taken = owner is not None or wanted in existing.errors
        if taken and source is not None and source.resolve() != target.resolve():
            raise ProfileExistsError(
                f"the name {wanted!r} is already served by {source}; choose another NAME or alias, or remove that file"
            )
    return existing


def write(text: str, target: Path, force: bool) -> Path:
    """Write `text` to `target` in one step: a reader sees the old file or the new one, never half."""
    try:
        # Without --force, never overwrite: not even a file another writer creates meanwhile.
        return write_atomic(target, text, overwrite=force)
    except FileExistsError:
        raise ProfileExistsError(f"{target} exists already; pass --force to replace it") from None


# ----- planning without the daemon -----


def plan_locally(name: str, config: DaemonConfig, extra_dir: Path | None = None,
                 on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """What `GET /v1/models/NAME/plan` would answer, computed here from the files on disk.

    Runs the daemon's own planning (Manager.plan_preview over the configured inventory and the
    state dir's measurements) with nothing running. A Hugging Face GGUF not downloaded yet is
    planned from its header, read from the Hub (`on_progress` hears how that goes). Raises
    LlmdError when no plan can be made, e.g. for a Hugging Face snapshot not downloaded yet."""
    import anyio
    from llmd.drivers.registry import load_drivers

    from llmd.daemon.manager.core import Manager

    drivers = load_drivers()
    dirs = list(config.server.profile_dirs)
    if extra_dir is not None and extra_dir not in dirs:
        dirs.append(extra_dir)  # a profile written with --dir, outside the configured dirs
    profiles = load_profiles(dirs, set(drivers), config.server.model_dirs)

    async def preview() -> dict[str, Any]:
        return await Manager(config, drivers, profiles).plan_preview(name, on_progress)

    return anyio.run(preview)
