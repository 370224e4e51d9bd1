"""Tickets and the replica disk's own rules against replay (issue 9, items 1 and 7), on a real target.

A ticket names one proxy (its certificate name), one checkpoint and the session's disk; the target
resumes a transfer only from the checkpoint the disk was prepared for; a committed restore point seals
the session's disks; pass numbers are bounded and follow the disk's own history.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests import frames
from tests.integration.conftest import Lab
from tests.integration.test_bad_input import (
    BS,
    CHECKPOINT,
    GOOD,
    SESSION,
    assert_still_serving,
    open_frame,
    prepare_with_data,
    transfer,
)
from tests.support.replicas import sha256
from vmrepl.security import certs
from vmrepl.v1 import proxy_pb2, target_pb2


@pytest.fixture
async def prepared(lab_env: Lab) -> Lab:
    return await prepare_with_data(lab_env)


REPLAYS: dict[str, tuple[Callable[[Lab], bytes], str, str]] = {
    "ticket for another proxy": (lambda e: open_frame(e, proxy="proxy-elsewhere"), "PERMISSION_DENIED", "not for"),
    "another checkpoint than prepared": (
        lambda e: open_frame(e, checkpoint="cp-other"),
        "FAILED_PRECONDITION",
        "only from its own checkpoint",
    ),
    "pass past the last": (lambda e: open_frame(e, pass_number=2**32 - 1), "FAILED_PRECONDITION", "last pass"),
    "next pass before this one completed": (
        lambda e: open_frame(e, pass_number=1),
        "FAILED_PRECONDITION",
        "only a complete pass 0",
    ),
}


@pytest.mark.parametrize("case", list(REPLAYS))
async def test_opens_the_disk_history_forbids_are_refused(prepared: Lab, case: str) -> None:
    make, code, text = REPLAYS[case]
    state = prepared.replica().parent / "state.json"
    before = (state.read_bytes(), sha256(prepared.replica()))
    _, got, details = await transfer(prepared, [make(prepared)])
    assert got.name == code and text in details, (got, details)
    assert (state.read_bytes(), sha256(prepared.replica())) == before  # nothing moved
    await assert_still_serving(prepared)


async def test_a_ticket_is_worthless_to_another_proxy_certificate(prepared: Lab) -> None:
    """A valid ticket copied from a log or another proxy's memory does not open a stream for anyone else."""
    certs.issue(prepared.certs.directory, name="proxy-two", role="proxy", hosts=list(certs.DEFAULT_HOSTS))
    _, code, details = await transfer(prepared, [open_frame(prepared)], tls_name="proxy-two")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not for certificate 'proxy-two'" in details, details


def _final_batch() -> bytes:
    return frames.data_batch(0, BS, [GOOD], end=8 * BS, final=True)


async def test_a_replayed_ticket_cannot_rewrite_a_committed_replica(prepared: Lab) -> None:
    """After the restore point is committed, the session's own valid ticket opens nothing: not pass 0
    (resume), not pass 1 (which used to restart the disk at 0), not a huge pass (which wedged it)."""
    _, code, details = await transfer(prepared, [open_frame(prepared), _final_batch()])
    assert code == grpc.StatusCode.OK, details
    stub = prepared.target_client().stub
    point = await stub.CommitRestorePoint(
        target_pb2.CommitRestorePointRequest(
            replica_path="jobs/vm1", session_id=SESSION, checkpoint_id=CHECKPOINT, disk_ids=["disk0"]
        )
    )
    before = sha256(prepared.replica())
    for pass_number in (0, 1, 2**32 - 1):
        _, code, details = await transfer(prepared, [open_frame(prepared, pass_number=pass_number)])
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (pass_number, code, details)
    assert sha256(prepared.replica()) == before
    disk = await stub.GetReplicaDisk(target_pb2.GetReplicaDiskRequest(replica_path="jobs/vm1", disk_id="disk0"))
    assert disk.state == target_pb2.REPLICA_DISK_STATE_COMMITTED and disk.pass_number == 0
    again = await stub.CommitRestorePoint(  # the controller retrying after a crash gets the same point
        target_pb2.CommitRestorePointRequest(
            replica_path="jobs/vm1", session_id=SESSION, checkpoint_id=CHECKPOINT, disk_ids=["disk0"]
        )
    )
    assert again.id == point.id and again.checkpoint_id == CHECKPOINT
    # Preparing the committed session again is refused too; the next session is welcome.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PrepareReplicaDisk(_prepare_request(SESSION, CHECKPOINT))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    nxt = await stub.PrepareReplicaDisk(_prepare_request("s-next", "cp-next"))
    assert nxt.state == target_pb2.REPLICA_DISK_STATE_PREPARED


def _prepare_request(session: str, checkpoint: str) -> target_pb2.PrepareReplicaDiskRequest:
    return target_pb2.PrepareReplicaDiskRequest(
        replica_path="jobs/vm1",
        disk_id="disk0",
        disk_size=8 * BS,
        block_size=BS,
        session_id=session,
        checkpoint_id=checkpoint,
    )


async def test_a_commit_names_the_checkpoint_the_disks_completed_from(prepared: Lab) -> None:
    _, code, details = await transfer(prepared, [open_frame(prepared), _final_batch()])
    assert code == grpc.StatusCode.OK, details
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await prepared.target_client().stub.CommitRestorePoint(
            target_pb2.CommitRestorePointRequest(
                replica_path="jobs/vm1", session_id=SESSION, checkpoint_id="cp-other", disk_ids=["disk0"]
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cp-other" in (err.value.details() or "")


async def test_the_proxy_names_its_certificate_for_the_controller_to_bind_tickets_to(lab_env: Lab) -> None:
    info = await lab_env.proxy_client().stub.GetAgentInfo(proxy_pb2.GetAgentInfoRequest())
    assert (info.certificate_name, info.role) == ("proxy", "proxy") and info.version
