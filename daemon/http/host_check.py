"""Refusing requests for foreign host names on listeners bound to loopback (DNS rebinding).

A page of another site cannot read from 127.0.0.1 itself, but it can have its own name resolve
to 127.0.0.1 (DNS rebinding): its scripts then talk to llmd as to their own origin, sending
`Host: evil.example`. A listener bound to loopback is only ever meant to be reached by a name of
this host, so a request whose `Host` is neither localhost nor a loopback address, nor a name
the config admits (`[server] allowed_hosts`), is refused. The management socket is reached by
forwarding it (`ssh -L`) to loopback, so it is held to the same rule, also admitting the name
llmctl sends over it (`SOCKET_HOST`).

A request without a Host header is let through: every browser sends one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

# The Host that llmctl (and llmd's own tools) send over the management socket.
SOCKET_HOST = "llmd"
ANY_HOST = "*"
SETTING = "[server] allowed_hosts"
# Judgements kept, keyed by the raw header: clients send the same Host again and again. A client
# sending ever-new ones only finds the cache full, and each is judged afresh (a microsecond).
_CACHE_SIZE = 256


def is_loopback_name(name: str) -> bool:
    """Whether a host name or address (no port, no brackets) can only mean this host."""
    name = name.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: never resolved elsewhere
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def host_name(header: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), or None if it is
    not one."""
    header = header.strip()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        return name
    name, colon, port = header.rpartition(":")
    if not colon:
        return header or None
    if ":" in name:  # an IPv6 address without brackets: no port
        return header
    return name if name and port.isdigit() else None


class HostCheck:
    """Which Host headers a listener admits: loopback names and addresses, and `names`."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = frozenset(name.lower().strip("[]").rstrip(".") for name in names)
        self._any = ANY_HOST in self.names
        self._judged: dict[bytes, bool] = {}

    def admits(self, header: bytes) -> bool:
        known = self._judged.get(header)
        if known is None:
            known = self._judge(header.decode("latin-1"))
            if len(self._judged) < _CACHE_SIZE:
                self._judged[header] = known
        return known

    def _judge(self, header: str) -> bool:
        if self._any:
            return True
        name = host_name(header)
        if name is None:
            return False
        name = name.lower().rstrip(".")
        return name in self.names or is_loopback_name(name)


def refusal_message(host: bytes) -> str:
    shown = host.decode("latin-1")
    return (
        f"refused a request for Host {shown!r}: llmd listens on loopback here, and answers only "
        f"requests for localhost or a loopback address (a page of another site may reach it by "
        f"having its name resolve to 127.0.0.1); if {shown!r} is a name of this host, add it to "
        f"{SETTING} in llmd.toml"
    )


class RefuseForeignHost:
    """ASGI middleware: a request whose Host `check` does not admit is answered by `reject`
    (its message names the Host and the setting) and never reaches `app`."""

    def __init__(self, app: ASGIApp, check: HostCheck, reject: Callable[[str], Response]) -> None:
        self.app = app
        self.check = check
        self._reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"host":
                    if not self.check.admits(value):
                        await self._reject(refusal_message(value))(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


def guard_listener(
    app: ASGIApp, bound_to: str | None, allowed_hosts: Iterable[str], reject: Callable[[str], Response]
) -> ASGIApp:
    """`app` behind the Host check that suits its listener: one bound to the address `bound_to`,
    or the management socket (None). A listener bound to another address is reachable by names
    llmd cannot know, and is served unchecked."""
    if bound_to is None:
        return RefuseForeignHost(app, HostCheck([*allowed_hosts, SOCKET_HOST]), reject)
    if is_loopback_name(bound_to.strip("[]")):
        return RefuseForeignHost(app, HostCheck(allowed_hosts), reject)
    return app
