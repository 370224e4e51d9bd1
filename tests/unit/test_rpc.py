"""The one mapping from exceptions to gRPC statuses, and the roles tables enforced on real sockets.

The servers run in this process (real mTLS sockets, real servicers over a SQLite database); the callers are
ordinary gRPC clients holding the lab's certificates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from google.rpc.error_details_pb2 import BadRequest
from grpc_status import rpc_status
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from controller import lab
from controller.api.service import ROLES as CONTROLLER_ROLES
from controller.api.service import ControllerServicer, controller_service
from controller.db.connect import open_database
from controller.db.secrets import SecretBox, create_key_file
from controller.engine.agents import AgentPool
from controller.engine.journal import Journal
from controller.engine.runtime import EngineParts
from controller.engine.sessions import Engine
from controller.engine.slots import SlotBoard
from proxy_agent.config import ProxySettings
from proxy_agent.servicer import ROLES as PROXY_ROLES
from proxy_agent.servicer import ProxyAgentServicer
from target_agent.config import TargetSettings
from target_agent.receiver import failure_response
from target_agent.servicer import ROLES as TARGET_ROLES
from target_agent.servicer import TargetAgentServicer
from tests.support.certs import tls_settings
from tests.support.controller_db import seeded_sqlite_url
from vmrepl import log_limit, rpc
from vmrepl.config import TlsSettings
from vmrepl.errors import InvalidArgument, NotFound
from vmrepl.rpc import Service, secure_channel, start_server, status_for
from vmrepl.security.ticket import load_signing_key
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import controller_pb2_grpc, proxy_pb2, proxy_pb2_grpc, target_pb2


async def test_internal_errors_name_the_program_that_serves(lab_certs: lab.LabCerts) -> None:
    for program in ("proxy", "target", "controller"):
        tls = tls_settings(lab_certs, program)
        server, _, _ = await start_server(
            listen="127.0.0.1:0", tls=tls, services=[], max_message_bytes=1 << 20, program=program
        )
        try:
            assert status_for(RuntimeError("boom")) == (
                grpc.StatusCode.INTERNAL,
                f"internal error; see the {program}'s log",
            )
            assert status_for(NotFound("no such disk")) == (grpc.StatusCode.NOT_FOUND, "no such disk")
        finally:
            await server.stop(None)


@dataclass
class Served:
    address: str
    certs: lab.LabCerts

    def channel(self, identity: str) -> grpc.aio.Channel:
        return secure_channel(self.address, TlsSettings.model_validate(self.certs.tls(identity)))


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Served]:
    """The ControllerService as the daemon serves it (controller_service: the servicer and its roles)."""
    certs = lab.LabCerts.create(tmp_path / "certs")
    tls = TlsSettings.model_validate(certs.tls("controller"))
    db, sessions = await open_database(await seeded_sqlite_url(tmp_path / "controller.db"))
    create_key_file(tmp_path / "secret.key")
    journal = Journal(sessions)
    pool = AgentPool(tls)
    parts = EngineParts(
        journal=journal, agents=pool, slots=SlotBoard(), signing_key=load_signing_key(certs.signing_key)
    )
    servicer = ControllerServicer(
        journal=journal,
        reads=sessions,
        engine=Engine(parts),
        secrets=SecretBox.from_file(tmp_path / "secret.key"),
        live=parts.live,
        session_logs=tmp_path / "sessions",
    )
    server, port, _ = await start_server(
        listen="127.0.0.1:0", tls=tls, services=[controller_service(servicer)], max_message_bytes=1 << 20, program="c"
    )
    try:
        yield Served(f"127.0.0.1:{port}", certs)
    finally:
        await server.stop(None)
        await pool.close()
        await db.dispose()


async def test_a_reader_certificate_reads_but_is_refused_every_write(controller: Served) -> None:
    create = api.CreateCredentialRequest(
        credential_id="admin", credential=api.Credential(username="root"), secret="s3cret"
    )
    async with controller.channel("reader") as ch:
        reader = controller_pb2_grpc.ControllerServiceStub(ch)
        for call in (
            reader.CreateCredential(create),
            reader.DeleteJob(api.DeleteJobRequest(name="jobs/none")),
            reader.StartJob(api.StartJobRequest(name="jobs/none")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, err.value
            assert "has role 'reader'; this call needs operator" in str(err.value.details())
        assert not (await reader.ListCredentials(api.ListCredentialsRequest())).credentials
    async with controller.channel("operator") as ch:
        operator = controller_pb2_grpc.ControllerServiceStub(ch)
        assert (await operator.CreateCredential(create)).name == "credentials/admin"
    async with controller.channel("reader") as ch:
        listed = await controller_pb2_grpc.ControllerServiceStub(ch).ListCredentials(api.ListCredentialsRequest())
        assert [c.name for c in listed.credentials] == ["credentials/admin"]


async def test_invalid_argument_names_its_field_in_the_status_details(controller: Served) -> None:
    async with controller.channel("operator") as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateHost(api.CreateHostRequest(host_id="Bad Id!", host=api.Host(provider="file")))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)  # the grpc-status-details-bin trailer, as any gRPC client reads it
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == err.value.details()
    [detail] = status.details
    bad = BadRequest()
    assert detail.Unpack(bad)
    [violation] = bad.field_violations
    assert violation.field == "host_id"
    assert "'Bad Id!' is not a valid id" in violation.description
    assert err.value.details() == f"host_id: {violation.description}"


async def test_only_invalid_argument_carries_details(controller: Served) -> None:
    async with controller.channel("operator") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await controller_pb2_grpc.ControllerServiceStub(ch).GetJob(api.GetJobRequest(name="jobs/none"))
    assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert rpc_status.from_call(err.value) is None
    assert InvalidArgument("a.b", "is wrong").description == "is wrong"


async def test_the_proxy_refuses_a_caller_without_the_controller_role(tmp_path: Path) -> None:
    certs = lab.LabCerts.create(tmp_path / "certs")
    settings = ProxySettings.model_validate({"source_roots": [tmp_path], "tls": certs.tls("proxy")})
    servicer = ProxyAgentServicer(settings)
    service = Service(proxy_pb2.DESCRIPTOR.services_by_name["ProxyAgent"], servicer, roles=PROXY_ROLES)
    server, port, _ = await start_server(
        listen="127.0.0.1:0", tls=settings.tls, services=[service], max_message_bytes=1 << 20, program="proxy"
    )
    served = Served(f"127.0.0.1:{port}", certs)
    start = proxy_pb2.StartDiskTransferRequest(session_id="s", disk_id="d", replica_path="jobs/vm1")
    try:
        for identity in ("operator", "reader", "target"):
            async with served.channel(identity) as ch:
                stub = proxy_pb2_grpc.ProxyAgentStub(ch)
                for call in (stub.StartDiskTransfer(start), stub.CancelTransfer(proxy_pb2.CancelTransferRequest())):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED, (identity, err.value)
                    assert "this call needs controller" in str(err.value.details())
        assert not servicer.transfers  # nothing was started
        async with served.channel("operator") as ch:  # people may still look
            info = await proxy_pb2_grpc.ProxyAgentStub(ch).GetAgentInfo(proxy_pb2.GetAgentInfoRequest())
            assert info.role == "proxy"
        async with served.channel("controller") as ch:  # the controller is admitted (and told what is wrong)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await proxy_pb2_grpc.ProxyAgentStub(ch).CancelTransfer(proxy_pb2.CancelTransferRequest(transfer_id="x"))
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        await server.stop(None)


def _raw_call(ch: grpc.aio.Channel, method: Any) -> Any:
    """An empty request to `method` whatever its types: the role check runs before the request is read."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if method.client_streaming:
        return ch.stream_stream(path)(iter([b""]), timeout=10)
    if method.server_streaming:
        return ch.unary_stream(path)(b"", timeout=10)
    return ch.unary_unary(path)(b"", timeout=10)


async def _code(ch: grpc.aio.Channel, method: Any) -> grpc.StatusCode:
    call = _raw_call(ch, method)
    try:
        if method.server_streaming:
            async for _ in call:  # to the end: a refused Transfer answers in band, then with the status
                pass
            return grpc.StatusCode.OK
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_every_controller_method_admits_exactly_the_roles_its_table_names(
    controller: Served, tmp_path: Path
) -> None:
    """Every method with every lab certificate (reader, operator, the agents' and the controller's own):
    refused with PERMISSION_DENIED exactly when the roles table leaves the certificate's role out; a
    certificate of another CA never gets a call through at all."""
    methods = api.DESCRIPTOR.services_by_name["ControllerService"].methods
    for identity in ("reader", "operator", "target", "proxy", "controller"):
        async with controller.channel(identity) as ch:
            for m in methods:
                code = await _code(ch, m)
                denied = code is grpc.StatusCode.PERMISSION_DENIED
                assert denied == (identity not in CONTROLLER_ROLES[m.name]), (identity, m.name, code)
    foreign = lab.LabCerts.create(tmp_path / "foreign")
    async with secure_channel(controller.address, TlsSettings.model_validate(foreign.tls("operator"))) as ch:
        for m in methods:
            assert await _code(ch, m) is grpc.StatusCode.UNAVAILABLE, m.name


async def test_a_flood_of_refused_calls_is_refused_and_the_service_still_answers(controller: Served) -> None:
    create = api.CreateJobRequest(job_id="j", job=api.Job())
    async with controller.channel("reader") as ch:
        stub = controller_pb2_grpc.ControllerServiceStub(ch)
        outcomes = await asyncio.gather(
            *(stub.CreateJob(create, timeout=30) for _ in range(300)), return_exceptions=True
        )
        assert {e.code() for e in outcomes if isinstance(e, grpc.aio.AioRpcError)} == {
            grpc.StatusCode.PERMISSION_DENIED
        }
        assert all(isinstance(e, grpc.aio.AioRpcError) for e in outcomes)
        assert not (await stub.ListJobs(api.ListJobsRequest(), timeout=10)).jobs


async def test_a_flood_of_refused_calls_writes_a_few_lines_and_a_summary_but_counts_every_one(
    controller: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = {"now": 0.0}
    limiter = log_limit.LogLimiter(burst=5, window_seconds=60, clock=lambda: clock["now"])
    monkeypatch.setattr(log_limit, "REFUSALS", limiter)
    # A fresh logger, so it binds to the capturing configuration even if vmrepl.rpc's was cached already.
    monkeypatch.setattr(rpc, "log", structlog.stdlib.get_logger("vmrepl.rpc"))
    labels = {"method": "ControllerService.CreateJob", "code": "PERMISSION_DENIED"}
    before = REGISTRY.get_sample_value("vmrepl_rpc_refused_total", labels) or 0.0
    create = api.CreateJobRequest(job_id="j", job=api.Job())
    with capture_logs() as logs:
        async with controller.channel("reader") as ch:
            stub = controller_pb2_grpc.ControllerServiceStub(ch)
            outcomes = await asyncio.gather(
                *(stub.CreateJob(create, timeout=30) for _ in range(300)), return_exceptions=True
            )
        assert all(isinstance(e, grpc.aio.AioRpcError) for e in outcomes)
        lines = [e for e in logs if e["event"] == "rpc_failed"]
        assert len(lines) == 5
        assert all(e["peer"] == "reader" and e["code"] == "PERMISSION_DENIED" for e in lines)
        clock["now"] += 60
        limiter.flush()
    summaries = [e for e in logs if "suppressed" in e]
    assert [e["suppressed"] for e in summaries] == [295]
    assert summaries[0]["event"] == "rpc_failed" and summaries[0]["method"] == "ControllerService.CreateJob"
    assert REGISTRY.get_sample_value("vmrepl_rpc_refused_total", labels) == before + 300


async def test_every_agent_method_admits_exactly_the_roles_its_table_names(tmp_path: Path) -> None:
    """The target's and the proxy's services as their daemons serve them, with every lab certificate."""
    certs = lab.LabCerts.create(tmp_path / "certs")
    target = TargetSettings.model_validate(
        {
            "name": "target",
            "datastore_root": str(tmp_path / "datastore"),
            "controller_public_keys": [str(certs.signing_pub)],
            "tls": certs.tls("target"),
        }
    )
    proxy = ProxySettings.model_validate({"source_roots": [tmp_path], "tls": certs.tls("proxy")})
    services = [
        Service(
            target_pb2.DESCRIPTOR.services_by_name["TargetAgent"],
            TargetAgentServicer(target),
            raw_requests=frozenset({"Transfer"}),
            roles=TARGET_ROLES,
            in_band_failures={"Transfer": failure_response},
        ),
        Service(proxy_pb2.DESCRIPTOR.services_by_name["ProxyAgent"], ProxyAgentServicer(proxy), roles=PROXY_ROLES),
    ]
    server, port, _ = await start_server(
        listen="127.0.0.1:0", tls=target.tls, services=services, max_message_bytes=1 << 20, program="agent"
    )
    served = Served(f"127.0.0.1:{port}", certs)
    try:
        for identity in ("reader", "operator", "target", "proxy", "controller"):
            async with served.channel(identity) as ch:
                for svc in services:
                    for m in svc.descriptor.methods:
                        denied = await _code(ch, m) is grpc.StatusCode.PERMISSION_DENIED
                        assert denied == (identity not in svc.roles[m.name]), (identity, m.full_name)
    finally:
        await server.stop(None)
