"""`llmd install` and `llmd uninstall` into a scratch root (--root): nothing on this system changes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import BIN

REPO = Path(__file__).resolve().parent.parent
UNIT = Path("etc/systemd/system/llmd.service")
WANTS_LINK = Path("etc/systemd/system/multi-user.target.wants/llmd.service")
CONFIG = Path("etc/llmd/llmd.toml")

needs_systemd_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("systemd-sysusers", "systemd-tmpfiles", "systemctl")),
    reason="needs systemd-sysusers, systemd-tmpfiles and systemctl",
)
# systemd-tmpfiles gives the directories to the llmd user, which only root may do.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must run as root to chown to llmd")
pytestmark = [needs_systemd_tools]


def llmd(*arguments: str) -> str:
    """Run this checkout's `llmd` (so ExecStart is found from a real argv[0]); returns its output."""
    result = subprocess.run([str(BIN / "llmd"), *arguments], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every file, directory and link under `root`: type, mode, owner, times, inode and content."""
    state: dict[str, tuple[object, ...]] = {}
    for directory, subdirectories, filenames in os.walk(root):
        for name in ["", *subdirectories, *filenames]:
            path = Path(directory, name)
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                content: object = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                content = path.read_bytes()
            else:
                content = None
            state[str(path.relative_to(root))] = (
                stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid,
                info.st_mtime_ns, info.st_ctime_ns, info.st_ino, content,
            )
    return state


def names_in(path: Path) -> dict[str, list[str]]:
    return {line.split(":")[0]: line.split(":") for line in path.read_text().splitlines()}


def exec_start(unit_text: str) -> Path:
    line = next(line for line in unit_text.splitlines() if line.startswith("ExecStart="))
    return Path(line.removeprefix("ExecStart=").split()[0])


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    llmd("install", "--root", str(root), "--no-start")
    return root


def test_shipped_files_are_the_repository_systemd_files() -> None:
    # systemd/ is a link to the package's units/: one copy, which an installed llmd reads.
    import llmd.daemon.service
    from llmd.daemon.service.layout import shipped_text

    package_units = Path(llmd.daemon.service.__file__).resolve().parent / "units"
    assert (REPO / "systemd").resolve() == package_units
    for name in ("llmd.service", "llmd.sysusers.conf", "llmd.tmpfiles.conf", "llmd.toml"):
        assert shipped_text(name) == (REPO / "systemd" / name).read_text()


@needs_root
def test_install_sets_up_user_directories_config_and_enabled_unit(installed: Path) -> None:
    unit = (installed / UNIT).read_text()
    llmd_path = exec_start(unit)
    assert llmd_path.is_absolute() and llmd_path.name == "llmd"
    assert llmd_path.is_file() and os.access(llmd_path, os.X_OK)
    assert "serve --config /etc/llmd/llmd.toml" in unit
    documentation = [line for line in unit.splitlines() if line.startswith("Documentation=")]
    for line in documentation:
        assert Path(line.removeprefix("Documentation=file://")).is_file()

    users, groups = names_in(installed / "etc/passwd"), names_in(installed / "etc/group")
    assert users["llmd"][5] == "/var/lib/llmd"
    assert "llmd" in groups and users["llmd"][3] == groups["llmd"][2]

    # Each directory as the tmpfiles.d snippet declares it.
    snippet = (REPO / "systemd" / "llmd.tmpfiles.conf").read_text()
    ids = {"root": 0, "llmd": int(users["llmd"][2])}
    gids = {"root": 0, "llmd": int(groups["llmd"][2])}
    declared = [line.split() for line in snippet.splitlines() if line.startswith("d ")]
    assert declared
    for _, path, mode, user, group, *_ in declared:
        info = (installed / path.lstrip("/")).stat()
        assert stat.S_ISDIR(info.st_mode), path
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (int(mode, 8), ids[user], gids[group]), path

    assert (installed / CONFIG).read_text() == (REPO / "systemd" / "llmd.toml").read_text()
    assert (installed / "usr/lib/sysusers.d/llmd.conf").is_file()
    assert (installed / "usr/lib/tmpfiles.d/llmd.conf").is_file()
    link = installed / WANTS_LINK
    assert link.is_symlink() and os.readlink(link) == "/etc/systemd/system/llmd.service"


@needs_root
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_installed_unit_passes_systemd_analyze_verify(installed: Path) -> None:
    # verify --root looks for the unit's commands and the targets it orders against inside the
    # root, as the booted image would: give the scratch root copies of this machine's.
    unit = (installed / UNIT).read_text()
    commands = [Path(line.split("=", 1)[1].split()[0]) for line in unit.splitlines() if line.startswith("Exec")]
    for command in commands:
        (installed / command.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(command, installed / command.relative_to("/"))
    units_dir = next((d for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if d.is_dir()), None)
    if units_dir is None:
        pytest.skip("this machine has no systemd units to copy")
    (installed / "usr/lib/systemd/system").mkdir(parents=True)
    for target in ("sysinit.target", "basic.target", "shutdown.target", "multi-user.target", "network-online.target"):
        shutil.copy2(units_dir / target, installed / "usr/lib/systemd/system" / target)

    result = subprocess.run(["systemd-analyze", "verify", f"--root={installed}", "llmd.service"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


@needs_root
def test_second_install_changes_nothing(installed: Path) -> None:
    before = snapshot(installed)
    output = llmd("install", "--root", str(installed), "--no-start")
    assert snapshot(installed) == before
    assert "created" not in output and "updated" not in output
    assert "user and group llmd: unchanged" in output
    assert f"{installed / UNIT}: unchanged" in output
    assert f"kept existing {installed / CONFIG}" in output
    assert "already enabled" in output


@needs_root
def test_an_edited_config_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / CONFIG).parent.mkdir(parents=True)
    (root / CONFIG).write_text('[server]\nlisten = "0.0.0.0:9000"\n')
    output = llmd("install", "--root", str(root), "--no-start")
    assert (root / CONFIG).read_text() == '[server]\nlisten = "0.0.0.0:9000"\n'
    assert f"kept existing {root / CONFIG}" in output

    (root / CONFIG).write_text("# edited after the install\n")
    llmd("install", "--root", str(root), "--no-start")
    assert (root / CONFIG).read_text() == "# edited after the install\n"


@needs_root
def test_uninstall_keeps_config_and_state_and_purge_removes_them(installed: Path) -> None:
    (installed / "etc/llmd/profiles/tiny.toml").write_text("# a profile\n")
    output = llmd("uninstall", "--root", str(installed))
    assert not (installed / UNIT).exists()
    assert not os.path.lexists(installed / WANTS_LINK)
    assert not (installed / "usr/lib/sysusers.d/llmd.conf").exists()
    assert not (installed / "usr/lib/tmpfiles.d/llmd.conf").exists()
    assert (installed / CONFIG).is_file() and (installed / "etc/llmd/profiles/tiny.toml").is_file()
    assert (installed / "var/lib/llmd").is_dir()
    assert "llmd" in names_in(installed / "etc/passwd")
    assert f"kept {installed / 'etc/llmd'}" in output

    llmd("uninstall", "--root", str(installed), "--purge")
    assert not (installed / "etc/llmd").exists() and not (installed / "var/lib/llmd").exists()
    assert "llmd" in names_in(installed / "etc/passwd")

    llmd("uninstall", "--root", str(installed), "--purge", "--remove-user")
    assert "llmd" not in names_in(installed / "etc/passwd")
    assert "llmd" not in names_in(installed / "etc/group")


def test_the_running_system_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmd.daemon.main import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for command in ("install", "uninstall"):
        result = CliRunner().invoke(main, [command])
        assert result.exit_code == 1
        assert "run it as root" in result.output and f"sudo {BIN / 'llmd'} {command}" in result.output


def test_engines_are_built_by_the_llmd_user_and_only_on_the_running_system(tmp_path: Path) -> None:
    from llmd.daemon.main import main
    from llmd.daemon.service.install import engine_build_argv

    assert engine_build_argv(Path("/opt/llmd/bin/llmctl"), "llama-cpp", cuda=True) == [
        "runuser", "-u", "llmd", "--", "/opt/llmd/bin/llmctl", "--config", "/etc/llmd/llmd.toml",
        "engines", "install", "llama-cpp", "--cuda",
    ]
    result = CliRunner().invoke(main, ["install", "--root", str(tmp_path / "root"), "--engines", "llama-cpp"])
    assert result.exit_code == 1 and "without --root" in result.output
    result = CliRunner().invoke(main, ["install", "--root", str(tmp_path / "root"), "--engines", "llama-cpp,nope"])
    assert result.exit_code == 1 and "unknown engine nope" in result.output
    assert not (tmp_path / "root").exists()  # refused before any change


def test_on_the_running_system_systemctl_reloads_enables_and_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in systemctl records its calls: this system's own units stay untouched.
    from llmd.daemon.service.install import _Installer
    from llmd.daemon.service.layout import Target

    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$*" >> "$FAKE_LOG"\n'
                    'case "$1" in is-enabled) echo "$FAKE_ENABLED";; is-active) echo "$FAKE_ACTIVE";; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))

    def systemd_step(*, enabled: str, active: str, start: bool, unit_changed: bool) -> tuple[list[str], list[str]]:
        monkeypatch.setenv("FAKE_ENABLED", enabled)
        monkeypatch.setenv("FAKE_ACTIVE", active)
        log.write_text("")
        installer = _Installer(Target(), BIN / "llmd")
        installer.unit_changed = unit_changed
        said = installer.systemd(start)
        return said, log.read_text().splitlines()

    said, calls = systemd_step(enabled="disabled", active="inactive", start=True, unit_changed=True)
    assert calls == ["daemon-reload", "is-enabled llmd.service", "enable llmd.service",
                     "is-active llmd.service", "start llmd.service"]
    assert said[1:] == ["llmd.service: enabled (starts at boot)", "llmd.service: started"]

    said, calls = systemd_step(enabled="enabled", active="active", start=True, unit_changed=False)
    assert "start llmd.service" not in calls and "enable llmd.service" not in calls
    assert said[1:] == ["llmd.service: already enabled", "llmd.service: already running"]

    said, calls = systemd_step(enabled="enabled", active="active", start=True, unit_changed=True)
    assert calls[-1] == "restart llmd.service" and said[-1] == "llmd.service: restarted (its unit changed)"

    said, calls = systemd_step(enabled="disabled", active="inactive", start=False, unit_changed=True)
    assert calls == ["daemon-reload", "is-enabled llmd.service", "enable llmd.service"]
    assert said[-1] == "not started (--no-start)"


def test_an_llmd_under_a_home_directory_is_named_as_hidden_from_the_service() -> None:
    from llmd.daemon.service.executables import hidden_from_service

    assert hidden_from_service(Path("/home/alice/llmd/.venv/bin/llmd")) == Path("/home")
    assert hidden_from_service(Path("/root/.venv/bin/llmd")) == Path("/root")
    assert hidden_from_service(Path("/opt/llmd/bin/llmd")) is None
