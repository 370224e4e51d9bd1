"""Malformed, forged and misdirected input: a clear error, the agent keeps serving, nothing else changes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import lz4.block
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.engine.transfer import prepare
from tests import frames
from tests.frames import signed_open
from tests.integration.conftest import Lab
from tests.support.certs import tls_settings
from tests.support.replicas import sha256
from vmrepl.batch import LZ4, MAX_MESSAGE_BYTES, PROTOCOL_VERSIONS
from vmrepl.block import digest
from vmrepl.config import TlsSettings
from vmrepl.extent import MiB
from vmrepl.rpc import secure_channel
from vmrepl.security import certs
from vmrepl.v1 import proxy_pb2, target_pb2

BS = MiB
SESSION = "s-bad"
CHECKPOINT = "cp-bad"


def tree_state(root: Path, skip: Path) -> dict[str, str]:
    """Every file under root but the replica disk's directory, with its content hash."""
    return {str(p.relative_to(root)): sha256(p) for p in root.rglob("*") if p.is_file() and skip not in p.parents}


async def transfer(
    lab_env: Lab, frames: list[bytes], tls_name: str = "proxy"
) -> tuple[list[Any], grpc.StatusCode, str]:
    tls = tls_settings(lab_env.certs, tls_name)
    ch = secure_channel(lab_env.target.address, tls, max_message_bytes=MAX_MESSAGE_BYTES)
    try:
        call = ch.stream_stream(
            "/vmrepl.v1.TargetAgent/Transfer",
            request_serializer=None,
            response_deserializer=target_pb2.TransferResponse.FromString,
        )()
        responses: list[Any] = []
        try:
            for f in frames:
                await call.write(f)
            await call.done_writing()
        except Exception:  # the target may end the call before we finish writing
            pass
        try:
            while (msg := await call.read()) is not grpc.aio.EOF:
                responses.append(msg)
        except grpc.aio.AioRpcError:
            pass  # the status is read below
        code, details = await call.code(), await call.details() or ""
        # The target says why in-band too, before the status (see TransferFailure in target.proto).
        failures = [r.error for r in responses if r.HasField("error")]
        assert len(failures) == 1 if code != grpc.StatusCode.OK else not failures
        if failures:
            assert (failures[0].code, failures[0].message) == (code.name, details)
        return responses, code, details
    finally:
        await ch.close()


def open_frame(
    lab_env: Lab,
    *,
    key: ed25519.Ed25519PrivateKey | None = None,
    ttl: float = 60,
    ticket_disk: str = "disk0",
    replica_path: str = "jobs/vm1",
    disk_size: int = 8 * BS,
    proxy: str = "proxy",
    checkpoint: str = CHECKPOINT,
    pass_number: int = 0,
    protocol_versions: tuple[int, ...] = PROTOCOL_VERSIONS,
) -> bytes:
    return signed_open(
        key or lab_env.signing_key,
        session_id=SESSION,
        checkpoint_id=checkpoint,
        replica_path=replica_path,
        disk_size=disk_size,
        block_size=BS,
        proxy=proxy,
        ticket_disk=ticket_disk,
        ttl=ttl,
        pass_number=pass_number,
        protocol_versions=protocol_versions,
    )


def batch(extents: list[target_pb2.Extent], parts: list[bytes], *, end: int = 2 * BS) -> bytes:
    return frames.raw_batch(extents, parts, end=end)


GOOD = os.urandom(BS)


def good_extent(offset: int = 0, data: bytes = GOOD) -> target_pb2.Extent:
    return frames.extent(offset, data)


BOMB = lz4.block.compress(bytes(64 * MiB), store_size=False)

BATCH_CASES: dict[str, tuple[Callable[[], bytes], grpc.StatusCode]] = {
    "extent past the disk end": (
        lambda: batch([good_extent(9 * BS)], [GOOD], end=10 * BS),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "huge length (negative as uint64)": (
        lambda: batch([frames.extent(0, GOOD, length=2**64 - BS)], [GOOD]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "decompression bomb": (
        lambda: batch([frames.extent(0, GOOD, encoding=LZ4, stored_size=len(BOMB))], [BOMB]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "bad checksum (second extent; the first must not be written either)": (
        lambda: batch(
            [good_extent(0), frames.extent(BS, GOOD, block_digest=digest(b"x"))],
            [GOOD, GOOD],
        ),
        grpc.StatusCode.DATA_LOSS,
    ),
    "payload shorter than the header says": (
        lambda: frames.raw_batch([good_extent()], [GOOD[:100]], end=BS, payload_size=BS),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "wrong sequence number": (
        lambda: frames.raw_batch([], [], seq=3, end=BS),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "garbage frame": (lambda: b"\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT),
}


async def prepare_with_data(lab_env: Lab) -> Lab:
    """The replica disk prepared for SESSION with its first block committed."""
    from controller.engine.transfer import DiskTaskSpec

    target = lab_env.target_client()
    spec = DiskTaskSpec(
        session_id=SESSION,
        checkpoint_id=CHECKPOINT,
        disk_id="disk0",
        source_locator="/unused",
        disk_size=8 * BS,
        replica_path="jobs/vm1",
    )
    await prepare(target, spec)
    # Some committed data, so "nothing changes" is checked against real content.
    first = frames.data_batch(0, 0, [GOOD])
    _, code, details = await transfer(lab_env, [open_frame(lab_env), first])
    assert code == grpc.StatusCode.OK, details
    return lab_env


@pytest.fixture
async def prepared(lab_env: Lab) -> Lab:
    return await prepare_with_data(lab_env)


async def assert_still_serving(lab_env: Lab) -> None:
    ch = secure_channel(lab_env.target.address, lab_env.tls())
    try:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await ch.close()
    assert lab_env.target.proc is not None and lab_env.target.proc.poll() is None


@pytest.mark.parametrize("case", list(BATCH_CASES))
async def test_bad_batches_are_rejected_and_change_nothing(prepared: Lab, case: str) -> None:
    lab_env = prepared
    disk_dir = lab_env.replica().parent
    before_tree = tree_state(lab_env.work / "datastore", disk_dir)
    before_data = sha256(lab_env.replica())
    make, want = BATCH_CASES[case]
    responses, code, details = await transfer(lab_env, [open_frame(lab_env), make_resumed(make())])
    assert code == want, (code, details)
    assert details  # a message a person can read
    assert responses[0].accept.resume_offset == BS
    assert sha256(lab_env.replica()) == before_data
    assert tree_state(lab_env.work / "datastore", disk_dir) == before_tree
    await assert_still_serving(lab_env)


def make_resumed(frame: bytes) -> bytes:
    """Shift a batch written from offset 0 so it starts at the resume offset (BS) the target will give."""
    return frames.shifted(frame, BS)


OPEN_CASES: dict[str, tuple[Callable[[Lab], bytes], grpc.StatusCode, str]] = {
    "forged ticket": (
        lambda e: open_frame(e, key=ed25519.Ed25519PrivateKey.generate()),
        grpc.StatusCode.PERMISSION_DENIED,
        "unknown key",
    ),
    "expired ticket": (lambda e: open_frame(e, ttl=-5), grpc.StatusCode.PERMISSION_DENIED, "expired"),
    "ticket for another disk": (
        lambda e: open_frame(e, ticket_disk="disk1"),
        grpc.StatusCode.PERMISSION_DENIED,
        "another disk",
    ),
    "../ path": (
        lambda e: open_frame(e, replica_path="jobs/../../etc"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'..'",
    ),
    "absolute path": (
        lambda e: open_frame(e, replica_path="/etc/vm1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "relative",
    ),
    "disk not prepared for the session": (
        lambda e: open_frame(e, replica_path="jobs/vm2"),
        grpc.StatusCode.NOT_FOUND,
        "does not exist",
    ),
    "a proxy of another protocol version": (
        lambda e: open_frame(e, protocol_versions=(7, 8)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "the proxy speaks Transfer protocol version(s) 7, 8, this target speaks 1",
    ),
    "an open without versions is version 1 (an older proxy), here refused for its size": (
        lambda e: open_frame(e, protocol_versions=(), disk_size=4 * BS),
        grpc.StatusCode.FAILED_PRECONDITION,
        "prepared with size",
    ),
    "size differs from the prepared disk": (
        lambda e: open_frame(e, disk_size=4 * BS),
        grpc.StatusCode.FAILED_PRECONDITION,
        "prepared with size",
    ),
}


@pytest.mark.parametrize("case", list(OPEN_CASES))
async def test_bad_opens_are_refused(prepared: Lab, case: str) -> None:
    lab_env = prepared
    before = tree_state(lab_env.work / "datastore", lab_env.work / "none")
    make, want, text = OPEN_CASES[case]
    _, code, details = await transfer(lab_env, [make(lab_env)])
    assert code == want and text in details, (code, details)
    assert tree_state(lab_env.work / "datastore", lab_env.work / "none") == before
    assert not (lab_env.work / "etc").exists()
    await assert_still_serving(lab_env)


async def test_a_controller_certificate_cannot_open_a_stream(prepared: Lab) -> None:
    # The role is checked before the target reads anything, so the refusal needs no message from the caller
    # (one written while the refusal arrives can make grpc.aio report INTERNAL instead, grpc/grpc#36066).
    ch = secure_channel(prepared.target.address, prepared.tls("controller"), max_message_bytes=MAX_MESSAGE_BYTES)
    try:
        call = ch.stream_stream(
            "/vmrepl.v1.TargetAgent/Transfer",
            request_serializer=None,
            response_deserializer=target_pb2.TransferResponse.FromString,
        )()
        await call.wait_for_connection()
        answer = await asyncio.wait_for(call.read(), 10)
        code, details = await call.code(), await call.details() or ""
    finally:
        await ch.close()
    assert code == grpc.StatusCode.PERMISSION_DENIED and "needs proxy" in details, (code, details)
    # ... and told in-band, as every refused stream is, so a proxy with the wrong certificate stops retrying.
    assert (answer.error.code, answer.error.message) == (code.name, details)


async def test_a_proxy_certificate_cannot_prepare_disks(prepared: Lab) -> None:
    stub = prepared.target_client("proxy").stub
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PrepareReplicaDisk(
            target_pb2.PrepareReplicaDiskRequest(
                replica_path="jobs/vm9", disk_id="d", disk_size=BS, block_size=BS, session_id="x"
            )
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_certificate_from_another_ca_is_refused(prepared: Lab, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    certs.init(other, list(certs.DEFAULT_HOSTS))
    # Trust the real CA for the server, but present a client certificate the target's CA never signed.
    tls = TlsSettings(
        ca_file=prepared.certs.directory / "ca.pem",
        cert_file=other / "proxy.pem",
        key_file=other / "proxy.key",
    )
    ch = secure_channel(prepared.target.address, tls)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await ch.close()
    await assert_still_serving(prepared)


async def test_proxy_refuses_bad_start_requests(lab_env: Lab, tmp_path: Path) -> None:
    from controller.engine.transfer import start_request

    stub = lab_env.proxy_client().stub
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"\0" * BS)
    cases = {
        "source.locator": lab_env.spec("p1", source_locator=str(outside), disk_size=BS),
        "block_size": lab_env.spec("p2", block_size=3000),
        "session_id": lab_env.spec("../x"),
        "replica_path": lab_env.spec("p3", replica_path="/abs"),
    }
    for field, spec in cases.items():
        req = start_request(spec, target_address=lab_env.target.address, signing_key=lab_env.signing_key, proxy="proxy")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StartDiskTransfer(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (err.value.details() or ""), field
    req = start_request(
        lab_env.spec("p4", disk_size=BS), target_address="x", signing_key=lab_env.signing_key, proxy="proxy"
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartDiskTransfer(req)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # size differs from the source
    req = start_request(lab_env.spec("p5"), target_address="x", signing_key=lab_env.signing_key, proxy="proxy")
    req.exclusions.guest.skip_pagefile = True
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.StartDiskTransfer(req)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # An operator certificate may watch but not start transfers.
    from controller.engine.agents import proxy_client

    op = proxy_client(lab_env.proxy.address, lab_env.tls("operator"))
    lab_env.clients.append(op)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await op.stub.StartDiskTransfer(proxy_pb2.StartDiskTransferRequest())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_proxy_follows_no_symbolic_link_in_its_source_roots(lab_env: Lab) -> None:
    """Found in review: a disk image swapped for a link (to another VM's disk, or to the file provider's
    sealing key, both inside the root) after the provider checked it was read through the link."""
    from controller.engine.transfer import start_request

    link = lab_env.image.parent / "swapped.raw"
    link.symlink_to(lab_env.image)  # points inside the source root: still refused
    linked_dir = lab_env.image.parent / "vmdir"
    linked_dir.symlink_to(lab_env.image.parent, target_is_directory=True)
    stub = lab_env.proxy_client().stub
    for locator in (link, linked_dir / lab_env.image.name):
        spec = lab_env.spec(f"p-{locator.parent.name}", source_locator=str(locator))
        req = start_request(spec, target_address=lab_env.target.address, signing_key=lab_env.signing_key, proxy="proxy")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StartDiskTransfer(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, locator
        assert "symbolic link" in (err.value.details() or ""), err.value.details()
