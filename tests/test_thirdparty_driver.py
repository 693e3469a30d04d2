"""A driver from another package, registered only through the `llmd.drivers` entry point group.

`tests/thirdparty_driver` is such a package: its driver runs a small OpenAI-compatible server
shipped in the same package. The daemon must find it and serve chats through it like a
built-in engine. `scripts/test` installs it with `pip install --target build/test-driver`,
outside the venv, and conftest puts that directory on sys.path for the test run only: entry
points are found from any sys.path entry that holds the package's .dist-info.
"""

from __future__ import annotations

import sysconfig
from importlib.metadata import distribution, entry_points
from pathlib import Path

import openai
import pytest

from conftest import REQUIRE_ENGINES, TEST_DRIVER_DIR, engine_processes, tiny_profile, wait_until
from llmd.drivers.base import load_progress
from llmd.drivers.registry import load_drivers

ENGINE = "fake-openai"


@pytest.fixture(scope="module")
def thirdparty_installed() -> None:
    if not any(entry.name == ENGINE for entry in entry_points(group="llmd.drivers")):
        message = (f"the test driver package is not installed: run `.venv/bin/pip install --no-deps "
                   f"--target {TEST_DRIVER_DIR} tests/thirdparty_driver` (scripts/test does)")
        if REQUIRE_ENGINES:
            pytest.fail(message)
        pytest.skip(message)


def test_the_driver_stays_out_of_the_users_environment(thirdparty_installed: None) -> None:
    """Found through the test run's sys.path entry, not installed in the venv llmd runs from."""
    found = Path(str(distribution("llmd-fake-openai-driver").locate_file(""))).resolve()
    assert found == TEST_DRIVER_DIR.resolve()
    site_packages = Path(sysconfig.get_paths()["purelib"])
    assert not list(site_packages.glob("llmd_fake_openai_driver-*.dist-info"))


def test_load_drivers_finds_the_entry_point(thirdparty_installed: None) -> None:
    drivers = load_drivers()
    driver = drivers[ENGINE]
    assert type(driver).__module__ == "llmd_fake_openai.driver"
    # Built-ins are still there, and still the built-in ones.
    assert type(drivers["llama-cpp"]).__module__ == "llmd.drivers.llama_cpp"
    assert load_progress(driver, "FAKE_OPENAI_LOADING 40") == "loading 40%"


def test_daemon_serves_a_chat_through_it(thirdparty_installed: None, make_daemon, tiny_gguf: Path) -> None:  # type: ignore[no-untyped-def]
    profile = tiny_profile(tiny_gguf, engine=ENGINE, aliases=["fake-alias"], extra_args=["--load-seconds", "0.5"])
    daemon = make_daemon({"fake": profile})
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)

    reply = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "ping pong"}])
    assert reply.choices[0].message.content == "fake-openai fake heard: ping pong"
    assert reply.model == "fake"

    chunks = list(client.chat.completions.create(
        model="fake-alias", messages=[{"role": "user", "content": "one two three"}], stream=True
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The proxy sends the engine the profile's name, whichever name the client used.
    assert text == "fake-openai fake heard: one two three"

    (row,) = daemon.ps()
    assert row["engine"] == ENGINE and row["state"] == "ready"
    assert row["argv"][1:3] == ["-m", "llmd_fake_openai.server"]

    daemon.llmctl("unload", "fake")
    wait_until(lambda: not engine_processes(daemon.state_dir), what="the server and its worker to exit")
