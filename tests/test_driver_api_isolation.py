"""The driver API (`llmd.drivers`) stands alone: nothing in it imports `llmd.daemon`.

A driver, built-in or third-party, needs only `llmd.drivers`; the daemon builds on the driver
API, never the reverse. Checked twice: statically, so that an import inside a function or under
`if TYPE_CHECKING:` counts too, and by importing the API and every driver in a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

DRIVERS = Path(__file__).resolve().parent.parent / "drivers"
# A complete third-party driver package: it too must need nothing but the driver API.
THIRD_PARTY = Path(__file__).resolve().parent / "thirdparty_driver" / "llmd_fake_openai"
PACKAGE = "llmd.drivers"
FORBIDDEN = "llmd.daemon"
# Calls that import a module named by a string.
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def _is_forbidden(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module an ImportFrom names, relative imports resolved against `package`."""
    if not node.level:
        return node.module or ""
    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{anchor}.{node.module}" if node.module else anchor


def forbidden_imports(path: Path, package: str = PACKAGE) -> list[str]:
    """`file:line: module` for every import of the daemon in `path`, wherever it sits."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            modules = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in DYNAMIC_IMPORTS and node.args and isinstance(node.args[0], ast.Constant):
                modules = [str(node.args[0].value)]
        for module in modules:
            if _is_forbidden(module):
                found.append(f"{path.name}:{node.lineno}: {module}")
                break
    return found


def test_no_driver_module_imports_the_daemon() -> None:
    paths = sorted(DRIVERS.glob("*.py"))
    assert paths, f"no driver modules found in {DRIVERS}"
    offending = [line for path in paths for line in forbidden_imports(path)]
    assert not offending, "llmd.drivers must not import llmd.daemon:\n" + "\n".join(offending)


def test_the_third_party_driver_imports_only_the_driver_api() -> None:
    paths = sorted(THIRD_PARTY.glob("*.py"))
    assert paths, f"no modules found in {THIRD_PARTY}"
    offending = [line for path in paths for line in forbidden_imports(path, THIRD_PARTY.name)]
    assert not offending, "a third-party driver must need only llmd.drivers:\n" + "\n".join(offending)


def test_the_scan_sees_lazy_relative_and_type_checking_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from llmd.daemon.models.profiles import Profile\n"
        "def f():\n"
        "    import llmd.daemon.errors\n"
        "    from ..daemon import config\n"
        "    importlib.import_module('llmd.daemon.main')\n"
        "from .base import LaunchRequest\n"
    )
    assert [line.split(":")[1] for line in forbidden_imports(sample)] == ["3", "5", "6", "7"]


_IMPORT_EVERYTHING = """
import json, pkgutil, sys, importlib
import llmd.drivers
import llmd.drivers.base, llmd.drivers.registry
modules = sorted(info.name for info in pkgutil.iter_modules(llmd.drivers.__path__, "llmd.drivers."))
for name in modules:
    importlib.import_module(name)
drivers = llmd.drivers.registry.load_drivers()
print(json.dumps({
    "modules": modules,
    "drivers": sorted(drivers),
    "daemon": sorted(name for name in sys.modules if name == "llmd.daemon" or name.startswith("llmd.daemon.")),
}))
"""


def test_importing_the_driver_api_and_every_driver_loads_no_daemon_module() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERYTHING], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"llmd.drivers.llama_cpp", "llmd.drivers.fastllm", "llmd.drivers.vllm"} <= set(loaded["modules"])
    assert {"llama-cpp", "fastllm", "vllm"} <= set(loaded["drivers"])
    assert loaded["daemon"] == [], f"importing llmd.drivers loaded daemon modules: {loaded['daemon']}"
