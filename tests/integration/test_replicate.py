"""Full and changed-range replication through real agent processes."""

from __future__ import annotations

import grpc
import pytest

from controller import lab
from tests.integration.conftest import Lab
from tests.support.replicas import qemu_identical
from vmrepl.extent import MiB
from vmrepl.v1 import common_pb2, proxy_pb2, target_pb2


async def test_full_replication_is_identical(lab_env: Lab, data_bytes: int) -> None:
    result = await lab_env.replicate(lab_env.spec("s-full"))
    replica = lab_env.replica()
    assert qemu_identical(lab_env.image, replica)
    counts = lab_env.counts
    assert result.bytes_data == data_bytes
    assert result.skipped.zero + result.skipped.unallocated == (counts["zero"] + counts["hole"]) * MiB
    assert result.skipped.unallocated >= counts["hole"] * MiB // 2  # the file system reports holes
    assert 0 < result.bytes_sent < data_bytes  # text compressed
    assert result.committed_offset == lab_env.image.stat().st_size
    # Zero blocks became holes on the target.
    assert replica.stat().st_blocks * 512 <= data_bytes + 8 * MiB
    disk = await lab_env.target_client().stub.GetReplicaDisk(
        target_pb2.GetReplicaDiskRequest(replica_path="jobs/vm1", disk_id="disk0")
    )
    assert disk.state == target_pb2.REPLICA_DISK_STATE_COMPLETE and disk.bytes_written == data_bytes


async def test_changed_ranges_send_only_those_blocks_and_restore_points(lab_env: Lab) -> None:
    await lab_env.replicate(lab_env.spec("s1"))
    changed = lab.change_blocks(lab_env.image, fraction=0.05, seed=7)
    ranges = [common_pb2.ByteRange(offset=o, length=MiB) for o in changed]
    spec = lab_env.spec(
        "s2",
        change_source=proxy_pb2.ChangeSource(
            changed_ranges=proxy_pb2.ChangedRanges(ranges=ranges, reference_id="rct-1")
        ),
    )
    result = await lab_env.replicate(spec)
    assert qemu_identical(lab_env.image, lab_env.replica())
    # The changed blocks, then 16 unsent blocks read for the sampled verification.
    assert result.bytes_read == (len(changed) + 16) * MiB
    assert result.bytes_data == len(changed) * MiB
    assert result.passes == 1 and (result.sample.sampled_blocks, result.sample.mismatched_blocks) == (16, 0)
    assert result.skipped.unchanged == lab_env.image.stat().st_size - len(changed) * MiB

    target = lab_env.target_client().stub
    p1 = await target.CommitRestorePoint(
        target_pb2.CommitRestorePointRequest(
            replica_path="jobs/vm1", session_id="s2", checkpoint_id="cp-s2", disk_ids=["disk0"]
        )
    )
    again = await target.CommitRestorePoint(
        target_pb2.CommitRestorePointRequest(
            replica_path="jobs/vm1", session_id="s2", checkpoint_id="cp-s2", disk_ids=["disk0"]
        )
    )
    assert again.id == p1.id  # idempotent per session
    with pytest.raises(grpc.aio.AioRpcError) as err:  # s1's transfer was superseded by s2
        await target.CommitRestorePoint(
            target_pb2.CommitRestorePointRequest(
                replica_path="jobs/vm1", session_id="s1", checkpoint_id="cp-s1", disk_ids=["disk0"]
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listed = await target.ListRestorePoints(target_pb2.ListRestorePointsRequest(replica_path="jobs/vm1"))
    assert [p.id for p in listed.restore_points] == [p1.id]
    await target.DeleteRestorePoint(
        target_pb2.DeleteRestorePointRequest(replica_path="jobs/vm1", restore_point_id=p1.id)
    )
    listed = await target.ListRestorePoints(target_pb2.ListRestorePointsRequest(replica_path="jobs/vm1"))
    assert list(listed.restore_points) == []


async def test_cancel_leaves_a_resumable_disk(lab_env: Lab) -> None:
    from controller.engine.transfer import prepare, start_request

    spec = lab_env.spec("s-cancel", bandwidth_limit_mbps=40)
    proxy, target = lab_env.proxy_client().stub, lab_env.target_client()
    await prepare(target, spec)
    started = await proxy.StartDiskTransfer(
        start_request(spec, target_address=target.address, signing_key=lab_env.signing_key, proxy="proxy")
    )
    async for p in proxy.WatchTransfer(proxy_pb2.WatchTransferRequest(transfer_id=started.transfer_id)):
        if p.committed_offset > 0 and p.state == proxy_pb2.TRANSFER_STATE_RUNNING:
            await proxy.CancelTransfer(proxy_pb2.CancelTransferRequest(transfer_id=started.transfer_id))
        last = p
    assert last.state == proxy_pb2.TRANSFER_STATE_CANCELLED
    disk = await target.stub.GetReplicaDisk(target_pb2.GetReplicaDiskRequest(replica_path="jobs/vm1", disk_id="disk0"))
    assert disk.state == target_pb2.REPLICA_DISK_STATE_RECEIVING
    assert 0 < disk.committed_offset < spec.disk_size
    # The same session again resumes from the committed offset.
    result = await lab_env.replicate(lab_env.spec("s-cancel"))
    accepts = lab_env.target_events("stream_opened")
    assert accepts[-1]["resume_offset"] == disk.committed_offset
    assert result.state == proxy_pb2.TRANSFER_STATE_COMPLETED
    assert qemu_identical(lab_env.image, lab_env.replica())


async def test_agents_serve_health_and_reflection(lab_env: Lab) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for client in (lab_env.proxy_client(), lab_env.target_client()):
        ch = client.channel
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in call for s in r.list_services_response.service}
        assert "grpc.health.v1.Health" in names
        assert names & {"vmrepl.v1.ProxyAgent", "vmrepl.v1.TargetAgent"}


async def test_a_retried_start_with_the_same_transfer_id_is_idempotent(lab_env: Lab) -> None:
    from controller.engine.transfer import prepare, start_request

    spec = lab_env.spec("s-idem", transfer_id="t-0001", bandwidth_limit_mbps=50)
    proxy, target = lab_env.proxy_client().stub, lab_env.target_client()
    await prepare(target, spec)
    req = start_request(spec, target_address=target.address, signing_key=lab_env.signing_key, proxy="proxy")
    first = await proxy.StartDiskTransfer(req)
    again = await proxy.StartDiskTransfer(req)  # as a controller that crashed mid-call would
    assert first.transfer_id == again.transfer_id == "t-0001"
    other = start_request(lab_env.spec("s-other", transfer_id="t-0001"), target_address=target.address,
                          signing_key=lab_env.signing_key, proxy="proxy")  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await proxy.StartDiskTransfer(other)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    async for p in proxy.WatchTransfer(proxy_pb2.WatchTransferRequest(transfer_id="t-0001")):
        last = p
    assert last.state == proxy_pb2.TRANSFER_STATE_COMPLETED
    assert len([e for e in lab_env.proxy.events() if e.get("event") == "transfer_started"]) == 1
