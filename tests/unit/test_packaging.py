"""pyproject.toml against the code: bounds that match the generated modules, the controller's extra as the
entry points check it. (.ci/check-wheel installs the wheel without extras and runs the programs.)"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from controller import extras as controller_extras

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
GENERATED = ROOT / "vmrepl" / "v1"
GRPC_MARK = r"GRPC_GENERATED_VERSION = '(.+)'"
PROTO_MARK = r"# Protobuf Python Version: (.+)"


def requirements(group: list[str]) -> dict[str, Requirement]:
    return {r.name.lower(): r for r in map(Requirement, group)}


def lower_bound(req: Requirement) -> Version:
    [bound] = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return bound


def test_grpc_and_protobuf_bounds_admit_no_version_older_than_the_generated_code_needs() -> None:
    core = requirements(PROJECT["dependencies"])
    grpc_made = {v for f in GENERATED.glob("*_pb2_grpc.py") for v in re.findall(GRPC_MARK, f.read_text())}
    proto_made = {v for f in GENERATED.glob("*_pb2.py") for v in re.findall(PROTO_MARK, f.read_text())}
    assert len(grpc_made) == 1 and len(proto_made) == 1, (grpc_made, proto_made)
    [grpc_version], [proto_version] = grpc_made, proto_made
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-status"):
        assert lower_bound(core[name]) >= Version(grpc_version), name
    assert lower_bound(core["protobuf"]) >= Version(proto_version)
    tools = requirements(PROJECT["optional-dependencies"]["dev"])["grpcio-tools"]
    assert str(tools.specifier) == f"=={grpc_version}"  # `make proto` reproduces the committed code


def test_the_controller_extra_is_what_the_entry_points_check_for() -> None:
    extras = PROJECT["optional-dependencies"]
    controller_extra = set(requirements(extras["controller"]))
    # Distribution names as the modules they install (pywinrm installs `winrm`).
    module = {"pywinrm": "winrm"}
    checked = {m.replace("_", "-") for m in controller_extras.DAEMON_NEEDS + controller_extras.CLI_NEEDS}
    assert {module.get(r, r) for r in controller_extra - {"tzdata"}} == checked  # tzdata is data, not a module
    core = set(requirements(PROJECT["dependencies"]))
    assert not core & (controller_extra | {"asyncpg", "pywinrm"}), "an agent host would install them"
    assert "asyncpg" in requirements(extras["postgres"]) and "pywinrm" in requirements(extras["hyperv"])
    dev = requirements(extras["dev"])["vmrepl"]
    assert dev.extras == {"controller", "postgres", "hyperv"}


def test_a_missing_extra_is_named_in_one_line() -> None:
    controller_extras.require_extra("vmrepl", ("pytest",))  # present: nothing happens
    with pytest.raises(SystemExit) as stop:
        controller_extras.require_extra("vmrepl-controller", ("pytest", "no_such_module_for_vmrepl"))
    assert str(stop.value) == (
        "vmrepl-controller needs the controller extra: pip install 'vmrepl[controller]' "
        "(missing: no_such_module_for_vmrepl)"
    )


# Runs a module as `python -m` does, on a host where the controller extra's modules are not installed.
_WITHOUT_EXTRA = """
import importlib.abc, runpy, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return None if name.split(".")[0] not in BLOCKED else self.missing(name)
    def missing(self, name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
BLOCKED = {"sqlalchemy", "alembic", "aiosqlite", "croniter", "httpx", "typer", "rich"}
for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
    del sys.modules[name]
import importlib.util
real_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in BLOCKED else real_find_spec(name, *a)
sys.meta_path.insert(0, NotInstalled())
sys.argv = [sys.argv[1], "--help"]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize(("module", "program"), [("controller", "vmrepl-controller"), ("controller.cli", "vmrepl")])
def test_python_m_without_the_controller_extra_names_it_in_one_line(module: str, program: str) -> None:
    """Found on an agent-only install: `python -m controller` (as the lab starts the daemon) and `python -m
    controller.cli` imported SQLAlchemy or typer first and printed a ModuleNotFoundError traceback."""
    ran = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTRA, module], check=False, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode != 0
    assert "Traceback" not in ran.stderr, ran.stderr
    assert f"{program} needs the controller extra: pip install 'vmrepl[controller]'" in ran.stderr, ran.stderr
