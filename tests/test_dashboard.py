"""The dashboard: its login and cross-site rules over HTTP, `[dashboard] enabled = false`, and the
page itself driven in real headless Chromium against a real daemon and llama-server."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers

from conftest import REQUIRE_ENGINES, engine_processes, wait_until
from llmd.daemon.diagnostics import bench_store
from llmd.daemon.diagnostics.bench_store import HeadlineCache, bench_path, write_bench
from llmd.daemon.web.dashboard import gpu_views
from llmd.daemon.web.dashboard_auth import COOKIE, SECURE_COOKIE, cookie_session, cross_site_problem, login_cookie, logout_cookie
from llmd.daemon.engines.supervisor import free_port
from llmd.daemon.util.units import format_mib
from support import daemon_with_server_settings

TOKEN = "t-0123456789abcdef0123"
WRONG_TOKEN = "t-wrong-wrong-wrong-wrong"
HEADLINE = "46.1 tok/s gen, 512 tok/s prompt (1 stream)"
EVIL = "http://evil.example"
CHROMIUM = Path(os.environ.get("LLMD_CHROMIUM", "/usr/bin/chromium"))
CARD_MIB = 2000


# ----- pure parts -----


def test_the_cookie_is_host_prefixed_and_secure_behind_tls_only() -> None:
    plain = login_cookie("SESSION", secure=False, max_age=60)
    assert plain == f"{COOKIE}=SESSION; Path=/; Max-Age=60; HttpOnly; SameSite=Strict"
    # Behind TLS: `__Host-` (browsers keep it only when Secure, with Path=/ and no Domain).
    tls = login_cookie("SESSION", secure=True, max_age=60)
    assert tls == f"{SECURE_COOKIE}=SESSION; Path=/; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
    assert SECURE_COOKIE == "__Host-" + COOKIE and "Domain" not in tls
    # Each scheme reads its own cookie only.
    both = Headers({"cookie": f"other=1; {COOKIE}=plain; {SECURE_COOKIE}=tls; more=2"})
    assert cookie_session(both) == "plain" and cookie_session(both, secure=True) == "tls"
    assert cookie_session(Headers({"cookie": f"{SECURE_COOKIE}=tls"})) is None
    assert cookie_session(Headers({"cookie": "other=1"})) is None
    # Logging out removes the same cookie: same name, path and attributes, no value.
    assert logout_cookie(True) == f"{SECURE_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict; Secure"
    assert logout_cookie(False).startswith(f"{COOKIE}=; Path=/; Max-Age=0;")


@pytest.mark.parametrize(
    ("headers", "required", "refused"),
    [
        ({"host": "h:1"}, False, False),  # llmctl, curl: no Origin
        ({"host": "h:1"}, True, True),  # ... but the cookie is only sent by browsers, which send one
        ({"host": "h:1", "origin": "http://h:1"}, True, False),
        ({"host": "h:1", "origin": "https://H:1"}, True, False),
        ({"host": "h:1", "origin": "http://h:2"}, False, True),
        ({"host": "h:1", "origin": "null"}, False, True),
        ({"host": "h:1", "origin": EVIL}, False, True),
        ({"host": "h:1", "origin": "http://h:1", "sec-fetch-site": "cross-site"}, False, True),
    ],
)
def test_cross_site_requests_are_recognised(headers: dict[str, str], required: bool, refused: bool) -> None:
    problem = cross_site_problem(Headers(headers), origin_required=required)
    assert (problem is not None) == refused, problem


def test_gpu_bars_never_overflow_their_card() -> None:
    report = {"gpus": [{
        "index": 0, "total_mib": 1000, "used_mib": 1300, "free_mib": 0, "foreign_mib": 300,
        "models": [{"model": "a", "vram_mib": 600, "state": "ready"}, {"model": "b", "vram_mib": 600, "state": "starting"}],
    }]}
    (card,) = gpu_views(report)
    assert [(s["model"], s["x"], s["width"]) for s in card["segments"]] == [("a", 0, 60.0), ("b", 60.0, 40.0), (None, 100.0, 0)]


def test_bench_headlines_are_read_again_only_when_their_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    read_bench = bench_store.read_bench
    monkeypatch.setattr(bench_store, "read_bench", lambda state_dir, name: reads.append(name) or read_bench(state_dir, name))
    headlines = HeadlineCache()

    assert headlines.headline(tmp_path, "tiny") is None and reads == []  # never benched: nothing to read
    write_bench(tmp_path, "tiny", {"headline": HEADLINE, "rows": []})
    for _ in range(3):  # the dashboard polling
        assert headlines.headline(tmp_path, "tiny") == HEADLINE
    assert reads == ["tiny"]

    # A new result is read, even one of the same size written right after the last.
    newer = HEADLINE.replace("46.1", "47.2")
    write_bench(tmp_path, "tiny", {"headline": newer, "rows": []})
    assert headlines.headline(tmp_path, "tiny") == newer and reads == ["tiny", "tiny"]

    bench_path(tmp_path, "tiny").unlink()
    assert headlines.headline(tmp_path, "tiny") is None


# ----- a real daemon, over HTTP -----


def _managed_daemon(make_daemon, profiles: dict[str, str], extra_config: str = ""):  # type: ignore[no-untyped-def]
    """A daemon serving management on TCP behind TOKEN; returns it and that listener's URL."""
    port = free_port()
    build = functools.partial(make_daemon, extra_config=extra_config)
    settings = f'management_listen = "127.0.0.1:{port}"\nmanagement_token = "{TOKEN}"\n'
    daemon = daemon_with_server_settings(build, settings, profiles, start=False)
    return daemon, f"http://127.0.0.1:{port}"


def _tiny(model: Path, vram_mib: int | None = None) -> str:
    lines = ['engine = "llama-cpp"', "[model]", f'path = "{model}"', "[launch]", "ctx = 512"]
    if vram_mib is not None:
        lines += ["[placement]", f"vram_mib = {vram_mib}"]
    return "\n".join(lines) + "\n"


def _unix_client(daemon) -> httpx.Client:  # type: ignore[no-untyped-def]
    return httpx.Client(base_url="http://llmd", transport=httpx.HTTPTransport(uds=str(daemon.socket)))


@pytest.mark.engine
def test_login_cookie_and_cross_site_rules(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon, url = _managed_daemon(make_daemon, {"tiny": _tiny(tiny_gguf)})
    daemon.start()
    page = {"accept": "text/html,application/xhtml+xml"}
    same_site = {"origin": url}
    with httpx.Client(base_url=url) as client:
        # Without credentials: a browser is sent to the login page; everything else gets the usual 401.
        to_login = client.get("/dashboard", headers=page)
        assert to_login.status_code == 303 and to_login.headers["location"] == "/dashboard/login"
        for path in ("/dashboard/status", "/v1/ps"):
            refused = client.get(path)
            assert refused.status_code == 401 and "[server] management_token" in refused.json()["error"]
        login = client.get("/dashboard/login")
        assert login.status_code == 200 and "management_token" in login.text
        assert client.get("/dashboard/static/dashboard.css").headers["content-type"].startswith("text/css")

        wrong = client.post("/dashboard/login", data={"token": WRONG_TOKEN}, headers=same_site)
        assert wrong.status_code == 401 and "That token was not accepted" in wrong.text
        empty = client.post("/dashboard/login", data={"token": " "}, headers=same_site)
        assert empty.status_code == 400 and "Paste the management token" in empty.text
        forged = client.post("/dashboard/login", data={"token": TOKEN}, headers={"origin": EVIL})
        assert forged.status_code == 403 and "cross-site" in forged.json()["error"]
        assert "set-cookie" not in wrong.headers and "set-cookie" not in forged.headers and not client.cookies

        signed_in = client.post("/dashboard/login", data={"token": TOKEN}, headers=same_site)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
        attributes = {part.strip().split("=")[0] for part in signed_in.headers["set-cookie"].split(";")}
        assert {COOKIE, "HttpOnly", "SameSite", "Path"} <= attributes and "SameSite=Strict" in signed_in.headers["set-cookie"]
        # Over plain HTTP: no `__Host-` prefix and no Secure, which browsers refuse without TLS.
        assert signed_in.headers["set-cookie"].startswith(f"{COOKIE}=") and "Secure" not in signed_in.headers["set-cookie"]
        # The browser keeps a random session id, not the token, and that id is no Bearer token.
        session = client.cookies[COOKIE]
        assert TOKEN not in signed_in.headers["set-cookie"] and len(session) >= 43
        assert httpx.get(url + "/v1/ps", headers={"authorization": f"Bearer {session}"}).status_code == 401

        # The cookie opens the page and the management API...
        dashboard = client.get("/dashboard", headers=page)
        assert dashboard.status_code == 200 and 'data-model="tiny"' in dashboard.text
        assert "frame-ancestors 'none'" in dashboard.headers["content-security-policy"]
        assert client.get("/v1/ps").status_code == 200
        # ... but a state-changing request made with it must come from the dashboard's own origin.
        for headers in ({"origin": EVIL}, {}):
            refused = client.post("/v1/models/tiny/load", headers=headers)
            assert refused.status_code == 403, refused.text
        assert daemon.state("tiny") is None
        unloaded = client.post("/v1/models/tiny/unload", headers=same_site)
        assert unloaded.status_code == 200 and unloaded.json() == {"model": "tiny", "unloaded": False}

        # A cookie that no longer matches sends the browser back to log in.
        client.cookies.clear()
        client.cookies.set(COOKIE, "stale-token-value")
        stale = client.get("/dashboard", headers=page)
        assert stale.status_code == 303 and stale.headers["location"] == "/dashboard/login?expired=1"
        assert "log in again" in client.get("/v1/ps").json()["error"]
        client.cookies.clear()
        assert client.post("/dashboard/login", data={"token": TOKEN}, headers=same_site).status_code == 303
        second = client.cookies[COOKIE]
        assert second != session  # every login gets a session of its own
        logout = client.post("/dashboard/logout", headers=same_site)
        assert logout.status_code == 303 and "Max-Age=0" in logout.headers["set-cookie"]
        assert client.get("/v1/ps").status_code == 401
        # Logging out ends the session in the daemon: the cookie, replayed, is refused...
        replayed = httpx.get(url + "/v1/ps", cookies={COOKIE: second})
        assert replayed.status_code == 401 and "log in again" in replayed.json()["error"]
        # ... while the first login, never logged out, goes on.
        assert httpx.get(url + "/v1/ps", cookies={COOKIE: session}).status_code == 200

    # Clients with the Bearer header send no Origin and need none; forged ones are still refused.
    bearer = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.post(url + "/v1/models/tiny/unload", headers=bearer).status_code == 200
    assert httpx.post(url + "/v1/models/tiny/unload", headers={**bearer, "origin": EVIL}).status_code == 403
    assert httpx.get(url + "/dashboard", headers=bearer).status_code == 200

    # On the unix socket, whose permissions are the access control, there is nothing to log in to.
    with _unix_client(daemon) as local:
        assert local.get("/dashboard").status_code == 200
        assert local.get("/dashboard/login").headers["location"] == "/dashboard"
        assert local.post("/v1/models/tiny/unload", headers={"origin": EVIL}).status_code == 403
    assert daemon.state("tiny") in (None, "stopped")  # llmctl sends no Origin and still works
    assert TOKEN not in daemon.log() and WRONG_TOKEN not in daemon.log()


@pytest.mark.engine
def test_the_cookie_behind_tls_and_the_login_throttle(make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon, url = _managed_daemon(make_daemon, {})
    daemon.start()
    same_site = {"origin": url}
    # A TLS proxy on loopback says the browser came over HTTPS (uvicorn trusts that from loopback).
    tls = {"x-forwarded-proto": "https", "origin": url.replace("http://", "https://")}

    # Behind TLS the cookie is `__Host-` prefixed and Secure, for this host (no Domain) and Path=/.
    signed_in = httpx.post(url + "/dashboard/login", data={"token": TOKEN}, headers=tls)
    assert signed_in.status_code == 303, signed_in.text
    set_cookie = signed_in.headers["set-cookie"]
    name, _, rest = set_cookie.partition("=")
    session = rest.split(";")[0]
    attributes = [part.strip() for part in set_cookie.split(";")[1:]]
    assert name == SECURE_COOKIE == "__Host-llmd_session"
    assert attributes == ["Path=/", f"Max-Age={7 * 86400}", "HttpOnly", "SameSite=Strict", "Secure"]
    cookie = {"cookie": f"{SECURE_COOKIE}={session}"}
    assert httpx.get(url + "/v1/ps", headers={"x-forwarded-proto": "https", **cookie}).status_code == 200
    # Over plain HTTP, where browsers never send a Secure cookie, it is not looked at.
    assert httpx.get(url + "/v1/ps", headers=cookie).status_code == 401
    logout = httpx.post(url + "/dashboard/logout", headers={**tls, **cookie})
    assert logout.headers["set-cookie"] == f"{SECURE_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict; Secure"
    assert httpx.get(url + "/v1/ps", headers={"x-forwarded-proto": "https", **cookie}).status_code == 401

    # Five wrong tokens from one address (its browser's, as a proxy on loopback forwards it)...
    guesser, other = {**same_site, "x-forwarded-for": "203.0.113.7"}, {**same_site, "x-forwarded-for": "203.0.113.8"}
    for _ in range(5):
        assert httpx.post(url + "/dashboard/login", data={"token": WRONG_TOKEN}, headers=guesser).status_code == 401
    # ... and it gets 429 with Retry-After, even for the right token, which is not even compared.
    for token in (WRONG_TOKEN, TOKEN):
        refused = httpx.post(url + "/dashboard/login", data={"token": token}, headers=guesser)
        assert refused.status_code == 429 and "Too many wrong tokens" in refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60 and "set-cookie" not in refused.headers
    # Other addresses log in as before, and so does the Bearer header.
    assert httpx.post(url + "/dashboard/login", data={"token": TOKEN}, headers=other).status_code == 303
    assert httpx.get(url + "/v1/ps", headers={"authorization": f"Bearer {TOKEN}", "x-forwarded-for": "203.0.113.7"}).status_code == 200
    assert TOKEN not in daemon.log() and session not in daemon.log()


@pytest.mark.engine
def test_a_login_ends_at_its_lifetime_however_used(make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon, url = _managed_daemon(make_daemon, {}, extra_config="[dashboard]\nsession_lifetime = 5\n")
    daemon.start()
    with httpx.Client(base_url=url) as client:
        signed_in = client.post("/dashboard/login", data={"token": TOKEN}, headers={"origin": url})
        assert signed_in.status_code == 303 and "Max-Age=5;" in signed_in.headers["set-cookie"]
        # Sent as a header, not from the client's jar, which drops it by itself after Max-Age: the
        # daemon must refuse it even from a client that keeps it longer.
        cookie = {"cookie": f"{COOKIE}={client.cookies[COOKIE]}"}
        client.cookies.clear()
        assert client.get("/v1/ps", headers=cookie).status_code == 200
        # Every poll uses the login, which keeps it from idling out but not past its lifetime.
        wait_until(lambda: client.get("/v1/ps", headers=cookie).status_code == 401, timeout=30, what="the login to expire")
        ended = client.get("/dashboard", headers={"accept": "text/html", **cookie})
        assert ended.status_code == 303 and ended.headers["location"] == "/dashboard/login?expired=1"
        assert "log in again" in client.get("/v1/ps", headers=cookie).json()["error"]
        again = client.get("/dashboard/login?expired=1")
        assert "Your login has ended" in again.text


@pytest.mark.engine
def test_a_disabled_dashboard_is_not_served(make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    daemon, url = _managed_daemon(make_daemon, {"tiny": _tiny(tiny_gguf)}, extra_config="[dashboard]\nenabled = false\n")
    daemon.start()
    bearer = {"authorization": f"Bearer {TOKEN}"}
    for path in ("/dashboard", "/dashboard/login", "/dashboard/status", "/dashboard/static/dashboard.js"):
        assert httpx.get(url + path, headers=bearer).status_code == 404, path
    # No login page, and no cookie is accepted in place of the token.
    assert httpx.get(url + "/dashboard", headers={"accept": "text/html"}).status_code == 401
    login = httpx.post(url + "/dashboard/login", data={"token": TOKEN}, headers={"origin": url})
    assert login.status_code == 401 and "set-cookie" not in login.headers
    assert httpx.get(url + "/v1/ps", cookies={COOKIE: TOKEN}).status_code == 401
    assert httpx.get(url + "/v1/ps", headers=bearer).status_code == 200
    with _unix_client(daemon) as local:
        assert local.get("/dashboard").status_code == 404


def test_a_bad_dashboard_setting_is_named(tmp_path: Path) -> None:
    from llmd.daemon.config import load_config
    from llmd.daemon.errors import ConfigError

    path = tmp_path / "llmd.toml"
    path.write_text('[dashboard]\nenabled = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"dashboard.enabled"):
        load_config(path)
    path.write_text("[dashboard]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"dashboard.port"):
        load_config(path)


# ----- the page in headless Chromium -----


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem: str | None = "the playwright package is missing: pip install -e '.[test]'"
    else:
        problem = None if CHROMIUM.exists() else f"Chromium is not installed at {CHROMIUM}: apt-get install chromium (or set LLMD_CHROMIUM)"
    if problem is not None:
        if REQUIRE_ENGINES:
            pytest.fail(problem)
        pytest.skip(problem)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


def _chat(daemon) -> None:  # type: ignore[no-untyped-def]
    """A request through the proxy: something for the engine to write to its log."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert httpx.post(daemon.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200


@pytest.mark.engine
def test_the_dashboard_in_chromium(make_daemon, tiny_gguf: Path, tmp_path: Path, browser) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    sim = tmp_path / "gpus.json"
    sim.write_text(json.dumps({"gpus": [{"name": "SimCard", "total_mib": CARD_MIB, "free_mib": CARD_MIB}] * 2}))
    daemon, url = _managed_daemon(
        make_daemon, {"tiny": _tiny(tiny_gguf, vram_mib=1200), "spare": _tiny(tiny_gguf, vram_mib=600)},
        extra_config=f'[gpus]\nsimulate = "{sim}"\nmargin_mib = 0\n',
    )
    write_bench(daemon.state_dir, "tiny", {"headline": HEADLINE, "rows": []})
    daemon.start()

    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []  # script errors, and anything the page's Content-Security-Policy blocked
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None)

    page.goto(url + "/dashboard")
    expect(page).to_have_url(url + "/dashboard/login")
    page.fill("#token", WRONG_TOKEN)
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_contain_text("That token was not accepted")
    expect(page.locator("#login-error")).to_contain_text("[server] management_token")
    assert not context.cookies()

    page.fill("#token", TOKEN)
    page.click("#login-submit")
    expect(page).to_have_url(url + "/dashboard")
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN
    expect(page.locator(".gpu")).to_have_count(2)
    expect(page.locator(".gpu").first).to_contain_text("SimCard")
    expect(page.locator(".segment")).to_have_count(0)
    tiny = page.locator('tr.profile[data-model="tiny"]')
    expect(page.locator("tr.profile")).to_have_count(2)
    expect(tiny.locator(".badge")).to_have_text("stopped")
    expect(tiny.locator(".bench")).to_have_text(HEADLINE)
    expect(page.locator('tr.profile[data-model="spare"] .bench')).to_have_text("-")

    tiny.locator('button[data-action="load"]').click()
    expect(tiny.locator(".badge")).to_have_text("ready", timeout=90_000)
    expect(page.locator("#notice")).to_have_text("tiny is ready.")
    bearer = {"authorization": f"Bearer {TOKEN}"}
    (row,) = [r for r in httpx.get(url + "/v1/ps", headers=bearer).json()["models"] if r["model"] == "tiny"]
    assert row["state"] == "ready" and row["pid"] is not None
    (card,) = row["gpus"]
    segment = page.locator(f'.gpu[data-gpu="{card}"] .segment[data-model="tiny"]')
    expect(segment).to_have_count(1)
    expect(segment.locator("text")).to_have_text("tiny · 1.2 GiB")
    expect(page.locator(f'.gpu[data-gpu="{card}"]')).to_contain_text(f"{format_mib(CARD_MIB - 1200)} free")
    expect(page.locator(f'.gpu[data-gpu="{1 - card}"] .segment')).to_have_count(0)

    # The log: what the engine wrote so far, then what it writes while the panel is open.
    tiny.locator('button[data-action="logs"]').click()
    expect(page.locator("#log-model")).to_have_text("tiny")
    expect(page.locator("#log-text")).to_contain_text(f"listening on http://127.0.0.1:{row['port']}")
    expect(page.locator("#log-text")).not_to_contain_text("launch_slot_")
    _chat(daemon)
    expect(page.locator("#log-text")).to_contain_text("launch_slot_", timeout=10_000)

    tiny.locator('button[data-action="unload"]').click()
    expect(tiny.locator(".badge")).to_have_text("stopped", timeout=30_000)
    expect(page.locator("#notice")).to_have_text("tiny is unloaded.")
    expect(page.locator(".segment")).to_have_count(0)
    (row,) = [r for r in httpx.get(url + "/v1/ps", headers=bearer).json()["models"] if r["model"] == "tiny"]
    assert row["state"] == "stopped" and row["pid"] is None
    wait_until(lambda: not engine_processes(daemon.state_dir), what="the engine to exit")

    page.click("#logout")
    expect(page).to_have_url(url + "/dashboard/login")
    page.goto(url + "/dashboard")
    expect(page).to_have_url(url + "/dashboard/login")
    assert problems == []
    context.close()
    assert TOKEN not in daemon.log()


def _slow_tiny(model: Path) -> str:
    """A profile whose engine takes 2 s to start (the `slow_llama` wrapper): long enough to watch it load."""
    return _tiny(model) + '[launch.env]\nSLOW_START = "2"\n'


@pytest.mark.engine
def test_the_playground_and_the_requests_page_in_chromium(  # type: ignore[no-untyped-def]
    make_daemon, tiny_gguf: Path, slow_llama: Path, browser
) -> None:
    from playwright.sync_api import expect

    key = "playground-api-key-0123"
    daemon, url = _managed_daemon(make_daemon, {"spare": _tiny(tiny_gguf), "tiny": _slow_tiny(tiny_gguf)})
    config = daemon.root / "llmd.toml"
    text = config.read_text().replace("[server]\n", f'[server]\napi_keys = ["{key}"]\n', 1)
    config.write_text(re.sub(r'command = \["[^"]*"\]', f'command = ["{slow_llama}"]', text))
    daemon.start()
    bearer = {"authorization": f"Bearer {TOKEN}"}

    context = browser.new_context()
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None)
    page.goto(url + "/dashboard/login")
    page.fill("#token", TOKEN)
    page.click("#login-submit")
    expect(page).to_have_url(url + "/dashboard")
    page.click("#nav-playground")
    expect(page).to_have_url(url + "/dashboard/playground")
    expect(page.locator("#chat-model option")).to_have_text(["spare (stopped)", "tiny (stopped)"])

    # The first message loads the model, showing its progress, then streams the reply in.
    page.select_option("#chat-model", "tiny")
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "hi")
    page.click("#chat-send")
    expect(page.locator("#chat-status")).to_contain_text("Loading tiny", timeout=10_000)
    expect(page.locator("#chat-send")).to_be_enabled(timeout=90_000)
    expect(page.locator("#chat-status")).to_have_text("")
    expect(page.locator(".message.user .text")).to_have_text(["hi"])
    reply = page.locator(".message.assistant .text")
    expect(reply).to_have_count(1)
    assert reply.inner_text().strip() and reply.inner_text() != "(no text)"
    expect(page.locator("#chat-ttft")).to_have_text(re.compile(r"^\d+(\.\d+)? m?s$"))
    expect(page.locator("#chat-tokens")).to_have_text(re.compile(r"^[1-8]$"))
    expect(page.locator("#chat-speed")).to_have_text(re.compile(r"^\d+\.\d$"))
    expect(page.locator('#chat-model option[value="tiny"]')).to_have_text("tiny (ready)")

    # The conversation goes on, the model already loaded.
    page.fill("#chat-input", "more")
    page.keyboard.press("Enter")
    expect(page.locator(".message.assistant")).to_have_count(2)
    expect(page.locator("#chat-send")).to_be_enabled(timeout=60_000)
    expect(page.locator("#chat-status")).to_have_text("")

    # Both went through the proxy, streamed, and are in its request log; the page never had a key.
    records = httpx.get(url + "/v1/requests", headers=bearer).json()["requests"]
    assert [(r["model"], r["status"], r["stream"], r["path"]) for r in records] == [("tiny", 200, True, "/v1/chat/completions")] * 2
    assert all(r["ttft_s"] > 0 and r["completion_tokens"] > 0 and r["client"] == "127.0.0.1" for r in records)
    assert key not in page.content()

    # Other sites cannot chat with the browser's login.
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    session = {COOKIE: next(c["value"] for c in context.cookies() if c["name"] == COOKIE)}
    for headers in ({"origin": EVIL}, {}):
        forged = httpx.post(url + "/dashboard/playground/chat", json=chat, cookies=session, headers=headers)
        assert forged.status_code == 403, forged.text
    assert len(httpx.get(url + "/v1/requests", headers=bearer).json()["requests"]) == 2

    page.click("#nav-requests")
    expect(page).to_have_url(url + "/dashboard/requests")
    rows = page.locator("tr.request")
    expect(rows).to_have_count(2)
    expect(rows.first.locator(".model")).to_have_text("tiny")
    expect(rows.first.locator(".status")).to_have_text("200")
    expect(rows.first.locator(".client")).to_have_text("127.0.0.1")
    # A new request shows up without reloading the page.
    proxied = httpx.post(daemon.url + "/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {key}"}, timeout=60)
    assert proxied.status_code == 200
    expect(rows).to_have_count(3)
    expect(rows.first.locator(".ttft")).to_have_text("-")  # not streamed
    # The proxy's own door still wants a key.
    assert httpx.post(daemon.url + "/v1/chat/completions", json=chat).status_code == 401
    expect(rows).to_have_count(4)
    expect(rows.first.locator(".status")).to_have_text("401")
    assert problems == []
    context.close()
    assert TOKEN not in daemon.log() and key not in daemon.log()


def test_every_dashboard_file_is_installed_with_the_package() -> None:
    """pyproject.toml's package-data must name every file the dashboard serves, or an installed
    (non-editable) llmd serves a page without its templates, script or stylesheet."""
    import fnmatch
    import tomllib

    import llmd.daemon.web.dashboard as dashboard

    root = Path(__file__).parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llmd.daemon.web"]
    files = [path.relative_to(dashboard.FILES.parent).as_posix() for path in dashboard.FILES.rglob("*") if path.is_file()]
    assert {"dashboard_files/static/dashboard.js", "dashboard_files/templates/status.html"} <= set(files)
    # setuptools' `*` does not cross a `/`, unlike fnmatch's: compare directory by directory.
    missing = [f for f in files if not any(fnmatch.fnmatch(f, p) and f.count("/") == p.count("/") for p in patterns)]
    assert missing == [], f"add these to [tool.setuptools.package-data] in pyproject.toml: {missing}"
