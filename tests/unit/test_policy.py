"""The access policy is declared once per service: every method of every service in vmrepl.v1 has roles."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Mapping

import grpc
import pytest
from google.protobuf.descriptor import ServiceDescriptor

import vmrepl.v1
from controller.api import service as controller_service
from proxy_agent import servicer as proxy_servicer
from target_agent import servicer as target_servicer
from vmrepl import rpc
from vmrepl.security import certs

# Each service's one roles table, by the service's full name. A new service gets its table here.
POLICIES: dict[str, Mapping[str, tuple[str, ...]]] = {
    "vmrepl.v1.ControllerService": controller_service.ROLES,
    "vmrepl.v1.ProxyAgent": proxy_servicer.ROLES,
    "vmrepl.v1.TargetAgent": target_servicer.ROLES,
}


def generated_services() -> Iterator[ServiceDescriptor]:
    """Every service of every generated module of the v1 contract."""
    for module in pkgutil.iter_modules(vmrepl.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"vmrepl.v1.{module.name}").DESCRIPTOR
            yield from descriptor.services_by_name.values()


def test_every_method_of_every_service_has_roles() -> None:
    services = {s.full_name: s for s in generated_services()}
    assert set(services) == set(POLICIES), "a service without a roles table (or a table without a service)"
    for name, svc in services.items():
        table = POLICIES[name]
        assert set(table) == {m.name for m in svc.methods}, name
        for method, roles in table.items():
            assert roles, f"{name}.{method} admits nobody"
            assert set(roles) <= set(certs.ROLES), f"{name}.{method}: {roles} are not certificate roles"


def test_a_reader_may_only_read_the_controller() -> None:
    for method, roles in controller_service.ROLES.items():
        reads = method.startswith(("Get", "List", "Watch"))
        assert ("reader" in roles) == reads, method
        assert "operator" in roles, method


def test_only_the_controller_drives_the_agents() -> None:
    for method in ("StartDiskTransfer", "CancelTransfer"):
        assert proxy_servicer.ROLES[method] == ("controller",)
    assert all(
        roles == ("controller",) for m, roles in target_servicer.ROLES.items() if m not in ("Transfer", "ReadDigests")
    )
    assert target_servicer.ROLES["Transfer"] == ("proxy",)


@pytest.mark.parametrize("change", ["missing", "extra", "empty"])
async def test_a_server_refuses_a_roles_table_that_does_not_cover_its_methods(change: str) -> None:
    table = dict(proxy_servicer.ROLES)
    if change == "missing":
        del table["GetAgentInfo"]
    elif change == "extra":
        table["Unknown"] = ("controller",)
    else:
        table["GetAgentInfo"] = ()
    descriptor = next(s for s in generated_services() if s.name == "ProxyAgent")
    with pytest.raises(ValueError, match="roles table must name exactly"):
        rpc._add_service(grpc.aio.server(), rpc.Service(descriptor, object(), roles=table), None)
