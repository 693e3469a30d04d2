"""llmd's version and the engines installed beside it: `llmd --version`, `llmctl --version` and
`llmctl status`. Only the standard library, so that `--version` stays as quick as `--help`."""

from __future__ import annotations

from pathlib import Path

# The distribution llmd is installed as (pyproject.toml's project name).
DISTRIBUTION = "llmd-home"


def llmd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def configured_engines_dir(config_path: Path | None) -> Path:
    """The engines directory the config names (read without validating the rest), else the default."""
    from llmd.daemon.config_paths import config_path_from_env, default_engines_dir

    path = config_path_from_env(config_path)
    if path is not None:
        from llmd.daemon.config_peek import peek_paths

        named = peek_paths(path).engines_dir
        if named is not None:
            return named
    return default_engines_dir()


def version_text(engines_dir: Path) -> str:
    """`llmd VERSION`, then each engine install under `engines_dir` (from its manifest)."""
    from llmd.daemon.engines.installed import list_installed

    lines = [f"llmd {llmd_version()}"]
    installed = list_installed(engines_dir)
    if not installed:
        lines.append(f"no engines installed in {engines_dir} (`llmctl engines install llama-cpp`)")
    else:
        lines.append(f"engines in {engines_dir}:")
        lines += [f"  {e.engine} {e.version} ({e.flavour})" for e in installed]
    return "\n".join(lines)
