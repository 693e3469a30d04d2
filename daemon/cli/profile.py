"""`llmctl profile`: write new profile files and list the ones on disk, with or without the daemon."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from llmd.daemon.cli.client import (
    EXIT_USAGE,
    Daemon,
    DaemonUnreachable,
    cli_config,
    error_text,
    fail,
    socket_path,
)
from llmd.daemon.cli.complete import complete_engines
from llmd.daemon.cli.output import Progress, dash, echo_json, echo_plan, table
from llmd.daemon.config import DaemonConfig
from llmd.daemon.errors import LlmdError
from llmd.daemon.models.profile_writer import (
    Options,
    ProfileUsageError,
    check_clashes,
    draft_from_hub,
    draft_local,
    installed_engines,
    plan_locally,
    refuse_existing,
    render,
    target_path,
    validate,
    write,
)
from llmd.daemon.models.profiles import load_profiles

# Re-reading profiles is quick; this only bounds a daemon that hangs.
RELOAD_TIMEOUT = 30.0
# Planning a model not downloaded yet reads its header from the Hub: progress shows after this long.
SLOW_PLAN_SECONDS = 1.0


@click.group()
def profile() -> None:
    """Write and list profile files (reads the files directly; the daemon may be stopped)."""


def _number_or_word(value: str | None) -> int | str | None:
    """--tp 2 / --tp auto, --offload 10 / --offload auto: the profile validation checks the value."""
    return int(value) if value is not None and value.isdigit() else value


@profile.command("new")
@click.argument("name")
@click.option("--engine", shell_complete=complete_engines, help="llama-cpp, vllm, fastllm, ... (default: from the model)")
@click.option("--model", metavar="PATH_OR_REPO", help="a .gguf file or model directory, or a Hugging Face repo owner/name")
@click.option("--from-hf", "repo", metavar="REPO", help="a Hugging Face repo: list its files and choose engine and file")
@click.option("--file", "hf_file", metavar="GGUF_FILE", help="the file in the repo (default with --from-hf: Q4_K_M or closest)")
@click.option("--revision", metavar="R", help="the repo's branch, tag or commit (default: main)")
@click.option("--ctx", "context_len", type=int, help="context length in tokens (default: 4096)")
@click.option("--parallel", type=int, help="concurrent sequences")
@click.option("--tp", "tensor_parallel", metavar="N|auto", help="GPUs to split the model over")
@click.option("--offload", metavar="none|auto|moe-experts|N", help="what may move to the CPU when GPUs are full")
@click.option("--cache-type", help="KV cache type (f16, q8_0, q4_0)")
@click.option("--extra-arg", "extra_args", multiple=True, metavar="ARG", help="an engine flag (repeat for more)")
@click.option("--ttl", help='idle time before the engine stops, like "30m" or "never" (default: 30m)')
@click.option("--alias", "aliases", multiple=True, metavar="ALIAS", help="another name for the model (repeat for more)")
@click.option("--description", help="a line for `llmctl ls`")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False),
              help="write here instead of the first [server] profile_dirs entry")
@click.option("--force", is_flag=True, help="replace an existing profile of that name")
@click.option("--json", "as_json", is_flag=True, help="print JSON: the path, the profile and its plan")
@click.pass_context
def new(ctx: click.Context, name: str, engine: str | None, model: str | None, repo: str | None, hf_file: str | None,
        revision: str | None, **rest: Any) -> None:
    """Write NAME.toml for a model, check it, and show its plan.

    \b
    llmctl profile new tiny --model /models/tiny.gguf --ctx 2048
    llmctl profile new qwen3 --from-hf Qwen/Qwen3-0.6B-GGUF
    """
    if (model is None) == (repo is None):
        raise click.UsageError("give --model PATH_OR_REPO or --from-hf REPO (one of them)")
    options = Options(
        ctx=rest["context_len"], parallel=rest["parallel"], tensor_parallel=_number_or_word(rest["tensor_parallel"]),
        offload=_number_or_word(rest["offload"]), cache_type=rest["cache_type"], extra_args=rest["extra_args"],
        ttl=rest["ttl"], aliases=rest["aliases"], description=rest["description"],
    )
    try:
        config = cli_config(ctx)
        engines = installed_engines()
        target = target_path(name, rest["directory"], config)
        refuse_existing(target, rest["force"])
        if repo is not None:
            draft = draft_from_hub(name, repo, engine, engines, options, hf_file, revision)
        else:
            assert model is not None
            draft = draft_local(name, model, engine, engines, options, hf_file, revision)
        text = render(draft, engines)
        written = validate(draft, text, target, config, engines)
        check_clashes(written, target, config, engines)
        write(text, target, rest["force"])
    except ProfileUsageError as exc:
        fail(str(exc), EXIT_USAGE)
    except LlmdError as exc:
        fail(str(exc))
    result: dict[str, Any] = {"path": str(target), "profile": draft.data, **_plan(ctx, name, target, config)}
    if rest["as_json"]:
        echo_json(result)
        return
    click.echo(f"wrote {target} ({draft.data['engine']}, {_source(draft.data['model'])})")
    for note in result["notes"]:
        click.echo(note)
    if result["plan"] is not None:
        echo_plan(result["plan"])
    else:
        click.echo(f"no plan yet: {result['plan_error']}")


def _source(model: dict[str, Any]) -> str:
    if "path" in model:
        return model["path"]
    return model["hf_repo"] + (f"/{model['hf_file']}" if "hf_file" in model else "")


def _plan(ctx: click.Context, name: str, target: Path, config: DaemonConfig) -> dict[str, Any]:
    """Ask the running daemon to re-read its profiles and plan NAME; without a daemon, plan here."""
    notes: list[str] = []
    try:
        daemon = Daemon(socket_path(ctx), timeout=RELOAD_TIMEOUT)
        reloaded = daemon.query("POST", "/v1/reload")
        if reloaded.status_code >= 400:
            raise LlmdError(f"the daemon did not re-read its profiles: {error_text(reloaded)}")
        found = reloaded.json()
        if name in found["profiles"]:
            notes.append(f"the running daemon now serves {name}")
            try:
                planned = _daemon_plan(daemon, name)
            except LlmdError as exc:
                # The daemon's own words: it reads the Hub through its own HF_ENDPOINT and token.
                return {"planned_by": "daemon", "plan": None, "plan_error": str(exc), "notes": notes}
            return {"planned_by": "daemon", "plan": planned, "plan_error": None, "notes": notes}
        if name in found["invalid"]:
            notes.append(f"the running daemon rejects the profile: {found['invalid'][name]}")
        else:
            notes.append(f"the running daemon does not read {target.parent}; add it to [server] profile_dirs to serve {name}")
    except DaemonUnreachable:
        notes.append("llmd is not running: planned here, from the files on disk")
    except LlmdError as exc:
        notes.append(str(exc))
    progress = Progress()
    try:
        planned = plan_locally(name, config, target.parent, _shown_if_slow(progress))
        return {"planned_by": "local", "plan": planned, "plan_error": None, "notes": notes}
    except LlmdError as exc:
        return {"planned_by": "local", "plan": None, "plan_error": str(exc), "notes": notes}
    finally:
        progress.clear()


def _daemon_plan(daemon: Daemon, name: str) -> dict[str, Any]:
    """The running daemon's plan for NAME, showing its progress while it reads the model's header
    from the Hub; LlmdError with the daemon's message when it has no plan."""
    progress = Progress()
    try:
        for event in daemon.events("GET", f"/v1/models/{name}/plan", params={"progress": "1"}):
            if event["event"] == "progress" and event["message"]:
                progress(event["message"])
            elif event["event"] == "error":
                raise LlmdError(event["message"])
            elif event["event"] == "plan":
                plan: dict[str, Any] = event["plan"]
                return plan
    finally:
        progress.clear()
    raise LlmdError(f"llmd's answer ended before the plan for {name}; its log may say why")


def _shown_if_slow(progress: Progress) -> Callable[[str], None]:
    """`progress`, silent for the first SLOW_PLAN_SECONDS: a quick plan shows nothing."""
    started = time.monotonic()

    def show(line: str) -> None:
        if time.monotonic() - started >= SLOW_PLAN_SECONDS:
            progress(line)

    return show


@profile.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def list_files(ctx: click.Context, as_json: bool) -> None:
    """The profile files in [server] profile_dirs, valid or not, as the daemon would read them."""
    try:
        config = cli_config(ctx)
        found = load_profiles(config.server.profile_dirs, set(installed_engines()), config.server.model_dirs)
    except LlmdError as exc:
        fail(str(exc))
    rows: list[dict[str, Any]] = [
        {"name": name, "engine": p.engine, "valid": True, "aliases": p.aliases,
         "model": str(p.model.path or p.model.hf_repo), "source": str(found.sources[name]), "error": None}
        for name, p in found.profiles.items()
    ] + [
        {"name": name, "engine": None, "valid": False, "aliases": [], "model": None,
         "source": str(found.sources[name]), "error": error}
        for name, error in found.errors.items()
    ]
    rows.sort(key=lambda row: row["name"])
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no profiles in {', '.join(map(str, config.server.profile_dirs))}; write one with `llmctl profile new`")
        return
    click.echo(table(
        [[r["name"], dash(r["engine"]), "ok" if r["valid"] else "INVALID", ",".join(r["aliases"]) or "-", r["source"]]
         for r in rows],
        ["name", "engine", "profile", "aliases", "file"],
    ))
    for r in rows:
        if not r["valid"]:
            click.echo(f"\n{r['error']}", err=True)
