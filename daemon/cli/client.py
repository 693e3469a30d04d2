"""How `llmctl` reaches the daemon, and the exit codes it reports.

Exit codes scripts can rely on (docs/cli.md lists them per command):
  0  done
  1  the daemon refused or failed the action, or a local step failed (the message says why)
  2  bad usage: unknown command, bad option or argument value
  3  the daemon is not reachable on its socket
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from llmd.daemon.cli.sockets import SocketChoice, first_answering
from llmd.daemon.config_paths import SOCKET_ENV, config_path_from_env, default_socket, well_known_sockets
from llmd.daemon.errors import LlmdError

if TYPE_CHECKING:
    from llmd.daemon.cli.unix_http import Response
    from llmd.daemon.config import DaemonConfig

# Everything beyond these imports waits until a command needs it: `llmctl --help`, completion
# and `llmctl ps` start in well under a quarter second (docs/cli.md, "Startup time").

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"llmctl: {message}", err=True)
    sys.exit(code)


class DaemonUnreachable(Exception):
    """The management socket does not answer; the message says what to check."""


class Daemon:
    """A small client for the management API. `timeout` bounds connecting (and, if set, reading).

    `on_unreachable` runs before an unreachable daemon ends llmctl with exit code 3: llmctl
    found the socket without validating all of llmd.toml, and a broken config is the likelier
    story then (it may be why the daemon is not running), so it gets to say so first.
    """

    def __init__(self, socket_path: Path, timeout: float | None = None,
                 on_unreachable: Callable[[], None] | None = None, also_tried: Sequence[Path] = ()) -> None:
        from llmd.daemon.cli.unix_http import UnixClient

        self.socket_path = socket_path
        self.on_unreachable = on_unreachable
        # Where else llmctl looked for the daemon before settling on `socket_path`.
        self.also_tried = tuple(also_tried)
        # Loads and log follows stream for as long as they take: no read timeout by default.
        self.client = UnixClient(str(socket_path), connect_timeout=30.0 if timeout is None else timeout,
                                 read_timeout=timeout)

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        from llmd.daemon.cli.unix_http import ConnectFailed, ConnectionLost

        try:
            yield
        except ConnectFailed as exc:
            # The cause is the socket's OSError; it tells "not allowed" from "not running".
            if isinstance(_root_cause(exc), PermissionError):
                raise DaemonUnreachable(
                    f"permission denied on {self.socket_path}: join the socket's group (e.g. `llmd`)"
                ) from None
            looked = f"also looked at {', '.join(map(str, self.also_tried))}; " if self.also_tried else ""
            raise DaemonUnreachable(
                f"cannot reach llmd on {self.socket_path}: is `llmd serve` running? "
                f"({looked}set --socket or LLMD_SOCKET if it listens elsewhere)"
            ) from None
        except ConnectionLost as exc:
            # The daemon went away mid-answer (stopped, crashed) or did not answer in time.
            raise DaemonUnreachable(f"lost the connection to llmd on {self.socket_path} ({exc})") from None

    @contextlib.contextmanager
    def _exit_if_unreachable(self) -> Iterator[None]:
        try:
            yield
        except DaemonUnreachable as exc:
            if self.on_unreachable is not None:
                self.on_unreachable()
            fail(str(exc), EXIT_UNREACHABLE)

    def query(self, method: str, path: str, **kwargs: Any) -> Response:
        """The answer whatever its status; raises DaemonUnreachable."""
        with self._errors():
            return self.client.request(method, path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer; raises DaemonUnreachable, or exits 1 with the daemon's error."""
        response = self.query(method, path, **kwargs)
        if response.status_code >= 400:
            fail(error_text(response))
        try:
            return response.json()
        except ValueError:
            fail(f"llmd on {self.socket_path} answered {method} {path} with something that is not JSON: "
                 f"{response.text[:200]!r}; is another program listening on that socket?")

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Like `request`, but an unreachable daemon ends llmctl with exit code 3."""
        with self._exit_if_unreachable():
            return self.request(method, path, **kwargs)

    def stream_lines(self, method: str, path: str, **kwargs: Any) -> Iterator[str]:
        with self._exit_if_unreachable(), self._errors(), self.client.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                fail(error_text(response))
            yield from response.iter_lines()

    def events(self, method: str, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """An NDJSON answer's events as they arrive. Unlike `stream_lines` it never ends llmctl:
        raises DaemonUnreachable, or LlmdError with the daemon's message when it refuses."""
        import json

        with self._errors(), self.client.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                raise LlmdError(error_text(response))
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def stream_bytes(self, path: str, on_response: Callable[[Response], None] | None = None,
                     **kwargs: Any) -> Iterator[bytes]:
        """The body of a GET as it arrives; `on_response` sees the answer (its headers) first."""
        with self._exit_if_unreachable(), self._errors(), self.client.stream("GET", path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                fail(error_text(response))
            if on_response is not None:
                on_response(response)
            yield from response.iter_raw()


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def error_text(response: Response) -> str:
    from llmd.daemon.http.openai_errors import error_message

    return error_message(response.status_code, response.content)


# Where the --socket and --config given after a subcommand's name are kept (ctx.meta is shared
# by all the contexts of one command line); see `global_options`.
GIVEN_OPTIONS = "llmctl.given_options"
# Set once the warning about an unreadable llmd.toml has been shown.
_WARNED = "llmctl.config_warning_shown"


def root_options(ctx: click.Context) -> dict[str, Any]:
    """--socket and --config as given to `llmctl`, before or after the subcommand's name, also
    while completing (when no callback has run)."""
    root = ctx.find_root()
    given = ctx.meta.get(GIVEN_OPTIONS, {})
    return {
        "socket": given.get("socket_path", root.params.get("socket_path")),
        "config": given.get("config_path", root.params.get("config_path")),
    }


def cli_config(ctx: click.Context) -> DaemonConfig:
    """llmd.toml as llmctl finds it (--config, $LLMD_CONFIG, the user's config); raises LlmdError."""
    from llmd.daemon.config import load_config

    return load_config(config_path_from_env(root_options(ctx)["config"]))


def locate_socket(ctx: click.Context, *, warn: bool = True) -> SocketChoice:
    """The socket to talk to: --socket / $LLMD_SOCKET, else the one llmd.toml names, else the
    first of the well-known places that answers (`config_paths.well_known_sockets`).

    llmd.toml is read for that one key, without validating the rest. A file that cannot be
    read so (missing, not TOML, an odd value) gives a one-line warning (with `warn`), and the
    well-known places are tried: a daemon that answers there is used all the same."""
    options = root_options(ctx)
    explicit = options["socket"] if options["socket"] is not None else os.environ.get(SOCKET_ENV)
    if explicit:
        return SocketChoice(Path(explicit))
    path = config_path_from_env(options["config"])
    if path is not None:
        from llmd.daemon.config_peek import peek_paths

        peeked = peek_paths(path)
        if peeked.problem is not None:
            if warn and not ctx.meta.get(_WARNED):
                ctx.meta[_WARNED] = True
                click.echo(f"llmctl: warning: {path}: {peeked.problem}; looking for llmd in the usual places", err=True)
        elif peeked.socket is not None:
            return SocketChoice(peeked.socket)
    return first_answering([default_socket(), *well_known_sockets()])


def socket_path(ctx: click.Context) -> Path:
    """The socket `locate_socket` settles on."""
    return locate_socket(ctx).path


def daemon_for(ctx: click.Context, timeout: float | None = None) -> Daemon:
    choice = locate_socket(ctx)
    return Daemon(choice.path, timeout, on_unreachable=lambda: _fail_if_config_invalid(ctx), also_tried=choice.also_tried)


def _fail_if_config_invalid(ctx: click.Context) -> None:
    """Exit 1 with llmd.toml's problems, as when llmctl validated it before trying the socket."""
    if root_options(ctx)["socket"] is not None:
        return  # --socket / $LLMD_SOCKET: the config plays no part
    try:
        cli_config(ctx)
    except LlmdError as exc:
        fail(str(exc))
