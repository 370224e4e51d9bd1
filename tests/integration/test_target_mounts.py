"""Mounts and failback disks with real proxy and target processes over mTLS: a TEST mount of an older point
keeps exactly that point's bytes while the real target replicates over it (its copy-on-write runs in the
target process); a FAILOVER mount pauses replication; a failback disk written by a real digest-comparison
transfer gets only the differing blocks, and RollbackReplica puts the original back byte for byte."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller import lab
from tests.integration.conftest import Lab
from tests.support.certs import tls_settings
from vmrepl.disk.layer import open_layer
from vmrepl.domain import compare_digests
from vmrepl.extent import MiB
from vmrepl.security.tls import channel_credentials
from vmrepl.v1 import common_pb2, target_pb2, target_pb2_grpc

pytestmark = pytest.mark.integration


def sha_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def sha_of_layer(path: Path) -> str:
    h = hashlib.sha256()
    with open_layer(path) as disk:
        buf = bytearray(4 * MiB)
        for at in range(0, disk.size, len(buf)):
            view = memoryview(buf)[: min(len(buf), disk.size - at)]
            disk.read_into(view, at)
            h.update(view)
    return h.hexdigest()


def snapshot(env: Lab, tag: str) -> Path:
    copy = env.work / f"source-{tag}.raw"
    subprocess.run(["cp", "--sparse=always", str(env.image), str(copy)], check=True)
    return copy


@pytest.fixture
async def mount_env(
    tmp_path: Path, lab_certs: lab.LabCerts, base_image: tuple[Path, dict[str, int]]
) -> AsyncIterator[Lab]:
    sources = tmp_path / "sources"
    sources.mkdir()
    image = sources / "vm1-disk0.raw"
    subprocess.run(["cp", "--sparse=always", str(base_image[0]), str(image)], check=True)
    (tmp_path / "originals").mkdir()
    config = lab.target_config(
        tmp_path,
        lab_certs,
        level="debug",
        vm_root=str(tmp_path / "vms"),
        vm_root_host_path="D:\\vmrepl\\vms",
        failback_roots=[str(tmp_path / "originals")],
    )
    target = lab.AgentProcess("target_agent", config, tmp_path / "target.log")
    proxy = lab.AgentProcess(
        "proxy_agent", lab.proxy_config(tmp_path, lab_certs, sources=sources), tmp_path / "proxy.log"
    )
    env = Lab(tmp_path, lab_certs, image, base_image[1], target, proxy)
    try:
        target.start()
        proxy.start()
        yield env
    finally:
        for c in env.clients:
            await c.close()
        env.stop()


def stub(env: Lab, role: str = "controller") -> target_pb2_grpc.TargetAgentStub:
    tls = tls_settings(env.certs, role)
    return target_pb2_grpc.TargetAgentStub(grpc.secure_channel(env.target.address, channel_credentials(tls)))


async def session(env: Lab, sid: str, *, replica_path: str = "jobs/vm1", first: bool = False) -> str:
    """A replication session of the lab's image to `replica_path` (digest comparison after the first), its
    restore point committed; returns the point's id."""
    more = {} if first else {"change_source": compare_digests()}
    await env.replicate(env.spec(sid, replica_path=replica_path, **more))
    request = target_pb2.CommitRestorePointRequest(
        replica_path=replica_path, session_id=sid, checkpoint_id=f"cp-{sid}", disk_ids=["disk0"]
    )
    return (await env.target_client().commit(request)).id


async def test_a_test_mount_keeps_its_point_while_the_target_replicates(mount_env: Lab) -> None:
    env = mount_env
    p1 = await session(env, "s1", first=True)
    at_p1 = sha_of_file(snapshot(env, "p1"))
    lab.change_blocks(env.image, fraction=0.05, seed=3)
    p2 = await session(env, "s2")
    target = stub(env)
    request = target_pb2.MountPointRequest(
        replica_path="jobs/vm1",
        point_id=p1,
        mount_id="test-1",
        kind=target_pb2.MOUNT_KIND_TEST,
        layout=target_pb2.MOUNT_LAYOUT_LAYER,
    )
    mounted = target.MountPoint(request)
    assert mounted.state == target_pb2.MOUNT_STATE_MOUNTED and mounted.host_folder == "D:\\vmrepl\\vms\\test-1"
    assert 0 < mounted.bytes_copied <= 0.06 * env.image.stat().st_size  # only the chain's blocks
    layer = env.work / "vms" / "test-1" / mounted.disks[0].path
    assert sha_of_layer(layer) == at_p1
    env.target.stop()  # a restarted target finds the mount from its files
    env.target.start()
    target = stub(env)
    changed = lab.change_blocks(env.image, fraction=0.2, seed=4)
    await session(env, "s3")  # the target process saves each overwritten block's old bytes into the mount
    assert sha_of_layer(layer) == at_p1
    got = target.GetMount(target_pb2.GetMountRequest(mount_id="test-1"))
    assert got.bytes_copied > mounted.bytes_copied and got.bytes_copied <= mounted.bytes_copied + len(changed) * MiB
    with pytest.raises(grpc.RpcError) as kept:
        target.DeleteRestorePoint(target_pb2.DeleteRestorePointRequest(replica_path="jobs/vm1", restore_point_id=p1))
    assert kept.value.code() is grpc.StatusCode.FAILED_PRECONDITION and "mounted" in (kept.value.details() or "")
    with pytest.raises(grpc.RpcError) as denied:
        stub(env, "proxy").MountPoint(request)
    assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # A failover of the newest point pauses replication of the VM.
    failover = target_pb2.MountPointRequest(
        replica_path="jobs/vm1",
        mount_id="fo-1",
        kind=target_pb2.MOUNT_KIND_FAILOVER,
        layout=target_pb2.MOUNT_LAYOUT_LAYER,
    )
    fo = target.MountPoint(failover)
    assert fo.point_id not in (p1, p2)
    assert sha_of_layer(env.work / "vms" / "fo-1" / fo.disks[0].path) == sha_of_file(env.image)
    lab.change_blocks(env.image, fraction=0.01, seed=5)
    with pytest.raises(grpc.aio.AioRpcError) as paused:
        await session(env, "s4")
    assert paused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "failed over" in (paused.value.details() or "")
    assert target.UnmountPoint(target_pb2.UnmountPointRequest(mount_id="fo-1")).state == target_pb2.MOUNT_STATE_GONE
    await session(env, "s5")
    assert sha_of_layer(layer) == at_p1
    with pytest.raises(grpc.RpcError) as busy:
        target.DeleteReplica(target_pb2.DeleteReplicaRequest(replica_path="jobs/vm1"))
    assert busy.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    target.UnmountPoint(target_pb2.UnmountPointRequest(mount_id="test-1"))
    assert not (env.work / "vms" / "test-1").exists()
    assert target.DeleteReplica(target_pb2.DeleteReplicaRequest(replica_path="jobs/vm1")).deleted
    assert not (env.work / "datastore" / "jobs" / "vm1").exists()


async def test_a_failback_disk_gets_only_differing_blocks_and_rolls_back_to_the_original(mount_env: Lab) -> None:
    env = mount_env
    original = env.work / "originals" / "vm1-disk0.raw"
    subprocess.run(["cp", "--sparse=always", str(env.image), str(original)], check=True)
    before = sha_of_file(original)
    changed = lab.change_blocks(env.image, fraction=0.05, seed=8)  # the failed-over VM wrote these
    target = stub(env)
    fb = ".failback/job1/vm1"
    disk = target.PrepareFailbackDisk(
        target_pb2.PrepareFailbackDiskRequest(
            replica_path=fb,
            disk_id="disk0",
            original_path=str(original),
            format=common_pb2.DISK_FORMAT_RAW,
            block_size=MiB,
        )
    )
    assert disk.state == target_pb2.REPLICA_DISK_STATE_IDLE and disk.disk_size == env.image.stat().st_size
    spec = env.spec("fb1", replica_path=fb, block_size=MiB, change_source=compare_digests())
    result = await env.replicate(spec)
    assert result.bytes_data == len(changed) * MiB  # only the blocks that differ travelled
    assert sha_of_file(original) == sha_of_file(env.image)
    rolled = target.RollbackReplica(target_pb2.RollbackReplicaRequest(replica_path=fb))
    assert rolled.state == common_pb2.REPLICA_STATE_AT_POINT
    assert sha_of_file(original) == before  # the original as it was, byte for byte
    # Again, committed this time: the original is the failed-over VM's disk; the failback folder goes.
    await env.replicate(env.spec("fb2", replica_path=fb, block_size=MiB, change_source=compare_digests()))
    commit = target_pb2.CommitRestorePointRequest(
        replica_path=fb, session_id="fb2", checkpoint_id="cp-fb2", disk_ids=["disk0"]
    )
    target.CommitRestorePoint(commit)
    assert target.DeleteReplica(target_pb2.DeleteReplicaRequest(replica_path=fb)).deleted
    assert sha_of_file(original) == sha_of_file(env.image)
