"""`llmctl bench NAME`: tokens/s through llmd's proxy at 1..N streams, kept with the profile."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import anyio
import click
from click.core import ParameterSource

from llmd.daemon.cli.client import cli_config, daemon_for, fail
from llmd.daemon.cli.complete import complete_model_names
from llmd.daemon.cli.output import echo_json, table
from llmd.daemon.errors import LlmdError
from llmd.daemon.diagnostics.bench_fit import ModelRoom, engine_room, model_room
from llmd.daemon.diagnostics.llm_bench import (
    MAX_STREAMS,
    BenchError,
    format_rate,
    parse_concurrency,
    run_bench,
)
from llmd.daemon.models.profiles import check_model_name
from llmd.daemon.util.loopback import reachable_url


def _levels(concurrency: str | None, max_concurrency: int | None) -> list[int]:
    if concurrency and max_concurrency:
        raise click.UsageError("give --concurrency or --max-concurrency, not both")
    if max_concurrency:
        return list(range(1, max_concurrency + 1))
    try:
        return parse_concurrency(concurrency or "1,2,4")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--concurrency") from None


def _profile_row(profiles: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The profile serving `name` (by name or alias), or exit 1 saying what exists."""
    row = next((p for p in profiles if p["name"] == name or name in p["aliases"]), None)
    if row is None:
        from llmd.daemon.models.names import unknown_model_message

        fail(unknown_model_message(name, [known for p in profiles if p["valid"] for known in (p["name"], *p["aliases"])]))
    if not row["valid"]:
        fail(f"profile {name!r} is invalid: {row['error']}")
    return row


def _print_table(result: dict[str, Any]) -> None:
    rows = [
        [str(r["streams"]), format_rate(r["prompt_tps_stream"]), format_rate(r["prompt_tps_total"]),
         format_rate(r["gen_tps_stream"]), format_rate(r["gen_tps_total"]), f"{r['ttft_p50_ms']:.0f} ms"]
        for r in result["rows"]
    ]
    click.echo(
        f"{result['model']} ({result['engine']}): {result['prompt_tokens']}-token prompt, "
        f"{result['max_tokens']} tokens generated per stream; tokens/s, counted from the engine's {result['tokens_from']}"
    )
    click.echo(table(rows, ["streams", "prompt/stream", "prompt total", "gen/stream", "gen total", "ttft p50"]))
    for note in result.get("notes", []):
        click.echo(f"note: {note}")
    click.echo(f"\n{result['headline']}")


def _room(daemon_rows: list[dict[str, Any]], profile: dict[str, Any]) -> ModelRoom:
    """The loaded model's context and slots: from its engine where it says, else its profile."""
    status = next((row for row in daemon_rows if row["model"] == profile["name"]), {})
    port = status.get("port")
    engine = anyio.run(engine_room, port) if isinstance(port, int) else None
    return model_room(engine, profile, status)


def _chosen(ctx: click.Context, option: str) -> bool:
    """Whether the user gave `option` (a size the bench must then keep) rather than its default."""
    return ctx.get_parameter_source(option) is not ParameterSource.DEFAULT


@click.command()
@click.argument("name", shell_complete=complete_model_names)
@click.option("--concurrency", metavar="LIST", help="stream counts to measure, e.g. 1,2,4 (default 1,2,4)")
@click.option("--max-concurrency", type=click.IntRange(1, MAX_STREAMS), metavar="N", help="measure 1, 2, ... N streams")
@click.option("--max-tokens", type=click.IntRange(2, 32768), default=128, show_default=True,
              help="tokens generated per stream (by default shrunk to fit the model's context)")
@click.option("--prompt-words", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="length of the fixed prompt, in words (by default shrunk to fit the model's context)")
@click.option("--api-key", envvar="LLMD_API_KEY", metavar="KEY",
              help="the proxy's API key, if it needs one (default: $LLMD_API_KEY, else the first of [server] api_keys)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.pass_context
def bench(ctx: click.Context, name: str, concurrency: str | None, max_concurrency: int | None, max_tokens: int,
          prompt_words: int, api_key: str | None, as_json: bool) -> None:
    """Prompt and generation tokens/s of NAME through the proxy, at 1..N concurrent streams.

    NAME is loaded first (its load time is not counted). A prompt or generation size left at its
    default shrinks to fit the model's context. The result is stored with the profile:
    `llmctl ls` shows its headline.
    """
    try:
        check_model_name(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    levels = _levels(concurrency, max_concurrency)
    try:
        config = cli_config(ctx)
    except LlmdError as exc:
        fail(str(exc))
    daemon = daemon_for(ctx)
    profile = _profile_row(daemon.call("GET", "/v1/profiles")["profiles"], name)
    name = profile["name"]

    # `llmctl load`'s own progress display; its "ready" line goes to stderr, keeping stdout for the result.
    load = ctx.find_root().command.get_command(ctx, "load")  # type: ignore[attr-defined]
    with contextlib.redirect_stdout(sys.stderr):
        ctx.invoke(load, name=name)

    # Whoever can read llmd.toml holds its keys anyway; the first one saves typing it again.
    keys = config.server.api_key_values()
    key = api_key or (keys[0] if keys else None)
    base_url = reachable_url(config.server.listen_host, config.server.listen_port)
    progress = (lambda message: click.echo(message, err=True))
    room = _room(daemon.call("GET", "/v1/ps")["models"], profile)
    try:
        result = anyio.run(lambda: run_bench(
            base_url, name, levels, max_tokens=max_tokens, prompt_words=prompt_words, api_key=key, progress=progress,
            room=room, fit_prompt=not _chosen(ctx, "prompt_words"), fit_generation=not _chosen(ctx, "max_tokens")))
    except BenchError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; nothing was stored", 130)
    result["engine"] = profile["engine"]
    stored = daemon.call("POST", f"/v1/models/{name}/bench", json=result)
    if as_json:
        echo_json(result)
        return
    _print_table(result)
    click.echo(f"stored in {stored['path']}", err=True)
