"""pyproject.toml against the code: bounds that match the generated modules, the controller's extra as the
entry points check it. (.ci/check-wheel installs the wheel without extras and runs the programs.)"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import controller

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
    checked = {m.replace("_", "-") for m in controller.DAEMON_NEEDS + controller.CLI_NEEDS}
    assert controller_extra - {"tzdata"} == checked  # tzdata is data for zoneinfo, not a module
    core = set(requirements(PROJECT["dependencies"]))
    assert not core & (controller_extra | {"asyncpg", "pywinrm"}), "an agent host would install them"
    assert "asyncpg" in requirements(extras["postgres"]) and "pywinrm" in requirements(extras["hyperv"])
    dev = requirements(extras["dev"])["vmrepl"]
    assert dev.extras == {"controller", "postgres", "hyperv"}


def test_a_missing_extra_is_named_in_one_line() -> None:
    controller.require_extra("vmrepl", ("pytest",))  # present: nothing happens
    with pytest.raises(SystemExit) as stop:
        controller.require_extra("vmrepl-controller", ("pytest", "no_such_module_for_vmrepl"))
    assert str(stop.value) == (
        "vmrepl-controller needs the controller extra: pip install 'vmrepl[controller]' "
        "(missing: no_such_module_for_vmrepl)"
    )
