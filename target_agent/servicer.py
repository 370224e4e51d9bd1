"""The TargetAgent gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from target_agent import export, failback, mount_registry, mounts, removal, replica, restore_points, verify, vm_replica
from target_agent.config import TargetSettings
from target_agent.datastore import Datastore
from target_agent.point_reads import READS_IN_FLIGHT
from target_agent.receiver import Receiver
from vmrepl.block import DIGEST_SIZE
from vmrepl.call_limits import Slots
from vmrepl.domain import DiskFormat, check_block_size, check_digest_count, check_disk_size, check_sample_percent
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound, TicketError
from vmrepl.logs import get_logger
from vmrepl.names import check_name
from vmrepl.rpc import handle_errors
from vmrepl.security.ticket import load_public_keys
from vmrepl.security.tls import peer_identity
from vmrepl.v1 import common_pb2, target_pb2, target_pb2_grpc

log = get_logger("vmrepl.target.servicer")

_STATES = {
    replica.PREPARED: target_pb2.REPLICA_DISK_STATE_PREPARED,
    replica.RECEIVING: target_pb2.REPLICA_DISK_STATE_RECEIVING,
    replica.COMPLETE: target_pb2.REPLICA_DISK_STATE_COMPLETE,
    replica.COMMITTED: target_pb2.REPLICA_DISK_STATE_COMMITTED,
    replica.IDLE: target_pb2.REPLICA_DISK_STATE_IDLE,
}
_REPLICA_STATES = {
    vm_replica.EMPTY: common_pb2.REPLICA_STATE_EMPTY,
    vm_replica.AT_POINT: common_pb2.REPLICA_STATE_AT_POINT,
    vm_replica.WRITING: common_pb2.REPLICA_STATE_WRITING,
    vm_replica.RESUMABLE: common_pb2.REPLICA_STATE_RESUMABLE,
}
_CONSISTENCY = {
    "": common_pb2.CONSISTENCY_UNSPECIFIED,
    "crash": common_pb2.CONSISTENCY_CRASH,
    "application": common_pb2.CONSISTENCY_APPLICATION,
}
_FORMATS = {"raw": common_pb2.DISK_FORMAT_RAW, "vhdx": common_pb2.DISK_FORMAT_VHDX}
CONTROLLER = ("controller",)
# Who may call what: the role in the caller's certificate, checked by vmrepl.rpc before a request is read.
ROLES: dict[str, tuple[str, ...]] = {
    "PrepareReplicaDisk": CONTROLLER,
    "GetReplicaDisk": CONTROLLER,
    "CommitRestorePoint": CONTROLLER,
    "ListRestorePoints": CONTROLLER,
    "DeleteRestorePoint": CONTROLLER,
    "GetReplica": CONTROLLER,
    "EndReplicaSession": CONTROLLER,
    "RollbackReplica": CONTROLLER,
    "VerifyReplica": CONTROLLER,
    "ReadReplicaDisk": CONTROLLER,
    "ReadDigests": ("controller", "proxy"),  # a proxy only for the disk its ticket names (checked in the call)
    "Transfer": ("proxy",),
    "MountPoint": CONTROLLER,
    "GetMount": CONTROLLER,
    "ListMounts": CONTROLLER,
    "UnmountPoint": CONTROLLER,
    "FlattenMount": CONTROLLER,
    "DeleteReplica": CONTROLLER,
    "PrepareFailbackDisk": CONTROLLER,
}
_KINDS = {target_pb2.MOUNT_KIND_FAILOVER: mount_registry.FAILOVER, target_pb2.MOUNT_KIND_TEST: mount_registry.TEST}
_LAYOUTS = {target_pb2.MOUNT_LAYOUT_LAYER: mounts.LAYER, target_pb2.MOUNT_LAYOUT_VHDX: mounts.VHDX}
_MOUNT_STATES = {
    mounts.MOUNTED: target_pb2.MOUNT_STATE_MOUNTED,
    mounts.FLATTENED: target_pb2.MOUNT_STATE_FLATTENED,
    # A mount a crash cut short is neither: MountPoint finishes it (creating) or UnmountPoint removes it.
    mounts.CREATING: target_pb2.MOUNT_STATE_UNSPECIFIED,
    mounts.FLATTENING: target_pb2.MOUNT_STATE_MOUNTED,
    mounts.REMOVING: target_pb2.MOUNT_STATE_UNSPECIFIED,
}
DIGESTS_PER_CHUNK = 65536  # 1 MiB of digests per message


async def _digest_chunks(disk_dir: Path, first: int, count: int) -> AsyncIterator[target_pb2.DigestChunk]:
    """Digests of blocks [first, first+count) in messages of DIGESTS_PER_CHUNK, fewer where the disk ends."""
    while count > 0:
        n = min(DIGESTS_PER_CHUNK, count)
        block_size, digests = await asyncio.to_thread(replica.read_digests, disk_dir, first, n)
        if digests:
            yield target_pb2.DigestChunk(first_block=first, block_size=block_size, digests=digests)
        got = len(digests) // DIGEST_SIZE
        if got < n:
            return
        first += got
        count -= got


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _disk_message(replica_path: str, disk_id: str, st: replica.DiskState) -> target_pb2.ReplicaDisk:
    return target_pb2.ReplicaDisk(
        replica_path=replica_path,
        disk_id=disk_id,
        disk_size=st.disk_size,
        block_size=st.block_size,
        state=_STATES[st.state],
        session_id=st.session_id,
        committed_offset=st.committed_offset,
        bytes_written=st.bytes_written,
        updated_at=_ts(st.updated_at),
        checkpoint_id=st.checkpoint_id,
        pass_number=st.pass_number,
        change_tracking_failed=st.tracking_failed,
        replica_format=_FORMATS[st.replica_format],
    )


def _point_message(
    replica_path: str, view: vm_replica.PointView, configuration: bytes = b""
) -> target_pb2.RestorePoint:
    p = view.point
    disks = [
        common_pb2.RestorePointDisk(
            disk_id=d.disk_id,
            disk_size=d.disk_size,
            format=_FORMATS[d.replica_format],
            rollback_bytes=view.rollback_bytes.get(d.disk_id, 0),
        )
        for d in p.disks
    ]
    return target_pb2.RestorePoint(
        id=p.id,
        replica_path=replica_path,
        session_id=p.session_id,
        created_at=_ts(p.created_at),
        disks=disks,
        checkpoint_id=p.checkpoint_id,
        change_reference=p.change_reference,
        consistency=_CONSISTENCY[p.consistency],
        restorable=view.restorable,
        vm_configuration=configuration,
    )


def _points_with_configurations(vm_dir: Path, guards: vm_replica.Guards) -> list[tuple[vm_replica.PointView, bytes]]:
    """The points and the VM configuration each keeps, read under the VM's lock: a deletion meanwhile would
    remove a configuration file between the list and its read. Only ListRestorePoints and the commit's reply
    carry configurations (up to 1 MiB each); the Replica replies, asked for far more often, do not."""
    with restore_points.vm_lock(vm_dir):
        status = vm_replica.status(vm_dir, guards=guards)
        return [(v, restore_points.read_configuration(vm_dir, v.point)) for v in status.points]


def _replica_message(replica_path: str, s: vm_replica.Status) -> target_pb2.Replica:
    out = target_pb2.Replica(
        replica_path=replica_path,
        state=_REPLICA_STATES[s.state],
        session_id=s.session_id,
        base_point_id=s.base_point_id,
        rolled_back_session_id=s.rolled_back_session,
        restore_points=[_point_message(replica_path, v) for v in s.points],
    )
    if s.rolled_back_at:
        out.rolled_back_at.CopyFrom(_ts(s.rolled_back_at))
    return out


def _mount_message(settings: mounts.MountSettings, rec: mounts.MountRecord, *, gone: bool = False) -> target_pb2.Mount:
    kinds = {v: k for k, v in _KINDS.items()}
    layouts = {v: k for k, v in _LAYOUTS.items()}
    out = target_pb2.Mount(
        mount_id=rec.mount_id,
        replica_path=rec.replica_path,
        point_id=rec.point_id,
        kind=kinds[rec.kind],
        layout=layouts[rec.layout],
        state=target_pb2.MOUNT_STATE_GONE if gone else _MOUNT_STATES[rec.state],
        folder=rec.mount_id,
        host_folder=mounts.host_folder(settings, rec),
        disks=[
            target_pb2.MountDisk(disk_id=d.disk_id, path=d.path, format=DiskFormat(d.format).to_proto(), size=d.size)
            for d in rec.disks
        ],
        create_time=_ts(rec.create_time),
        bytes_copied=rec.bytes_copied if gone else mounts.bytes_copied(rec),
    )
    return out


def _format_name(value: common_pb2.DiskFormat.ValueType) -> str:
    names = {common_pb2.DISK_FORMAT_UNSPECIFIED: "raw", **{v: k for k, v in _FORMATS.items()}}
    if value not in names:
        raise InvalidArgument("replica_format", "RAW or VHDX")
    return names[value]


def _consistency_name(value: common_pb2.Consistency.ValueType) -> str:
    names = {v: k for k, v in _CONSISTENCY.items()}
    if value not in names:
        raise InvalidArgument("consistency", "CRASH, APPLICATION or unspecified")
    return names[value]


class TargetAgentServicer(target_pb2_grpc.TargetAgentServicer):
    def __init__(self, settings: TargetSettings) -> None:
        self.datastore = Datastore(settings.datastore_root)
        self.receiver = Receiver(
            datastore=self.datastore,
            keys=load_public_keys(settings.controller_public_keys),
            name=settings.name,
            max_window=settings.max_window_batches,
            guards={},
            slots=Slots(per_peer=settings.max_streams_per_peer, total=settings.max_streams, what="Transfer streams"),
            open_timeout=settings.open_timeout_seconds,
            idle_timeout=settings.idle_timeout_seconds,
            write_delay=settings.test_write_delay_ms / 1000,
        )
        self.digest_slots = Slots(
            per_peer=settings.max_digest_reads_per_peer, total=settings.max_digest_reads, what="ReadDigests calls"
        )
        self.disk_read_slots = Slots(
            per_peer=settings.max_disk_reads_per_peer,
            total=settings.max_disk_reads,
            what="VerifyReplica and ReadReplicaDisk calls",
        )
        # The disks see at most this many reads for verification and export, however many calls run.
        self.disk_reads = ThreadPoolExecutor(
            max_workers=settings.max_disk_reads * READS_IN_FLIGHT, thread_name_prefix="point-read"
        )
        self.rng = random.Random()  # which blocks a sampled verification checks
        self.mount_settings = mounts.MountSettings(settings.vm_root, settings.vm_root_host_path)
        self.failback_roots = list(settings.failback_roots)
        self.host_paths = list(settings.host_paths)
        removal.empty_trash(self.datastore)  # deletions a crash cut short

    @handle_errors
    async def PrepareReplicaDisk(
        self,
        request: target_pb2.PrepareReplicaDiskRequest,
        context: grpc.aio.ServicerContext[target_pb2.PrepareReplicaDiskRequest, target_pb2.ReplicaDisk],
    ) -> target_pb2.ReplicaDisk:
        check_name("session_id", request.session_id)
        check_name("checkpoint_id", request.checkpoint_id)
        if request.resume_session_id:
            check_name("resume_session_id", request.resume_session_id)
        check_disk_size("disk_size", request.disk_size)
        check_block_size("block_size", request.block_size)
        replica_format = _format_name(request.replica_format)
        vm_dir = self.datastore.vm_dir(request.replica_path)
        disk_dir = self.datastore.disk_dir(request.replica_path, request.disk_id)
        await asyncio.to_thread(failback.check_originals, vm_dir, [request.disk_id])
        st = await asyncio.to_thread(
            vm_replica.prepare_disk,
            vm_dir,
            disk_dir,
            guards=self.receiver.guard,
            disk_size=request.disk_size,
            block_size=request.block_size,
            session_id=request.session_id,
            checkpoint_id=request.checkpoint_id,
            resume_session_id=request.resume_session_id,
            replica_format=replica_format,
        )
        return _disk_message(request.replica_path, request.disk_id, st)

    @handle_errors
    async def GetReplicaDisk(
        self,
        request: target_pb2.GetReplicaDiskRequest,
        context: grpc.aio.ServicerContext[target_pb2.GetReplicaDiskRequest, target_pb2.ReplicaDisk],
    ) -> target_pb2.ReplicaDisk:
        disk_dir = self.datastore.disk_dir(request.replica_path, request.disk_id)
        await asyncio.to_thread(failback.check_originals, disk_dir.parent.parent, [request.disk_id])
        st = await asyncio.to_thread(replica.load_state, disk_dir)
        return _disk_message(request.replica_path, request.disk_id, st)

    @handle_errors
    async def CommitRestorePoint(
        self,
        request: target_pb2.CommitRestorePointRequest,
        context: grpc.aio.ServicerContext[target_pb2.CommitRestorePointRequest, target_pb2.RestorePoint],
    ) -> target_pb2.RestorePoint:
        check_name("session_id", request.session_id)
        check_name("checkpoint_id", request.checkpoint_id)
        if not request.disk_ids:
            raise InvalidArgument("disk_ids", "name at least one disk")
        for d in request.disk_ids:
            check_name("disk_ids", d)
        if len(request.change_reference) > 4096:
            raise InvalidArgument("change_reference", "at most 4096 characters")
        consistency = _consistency_name(request.consistency)
        vm_dir = self.datastore.vm_dir(request.replica_path)
        await asyncio.to_thread(failback.check_originals, vm_dir)  # a failback writes the originals themselves
        p = await asyncio.to_thread(
            restore_points.commit,
            vm_dir,
            session_id=request.session_id,
            checkpoint_id=request.checkpoint_id,
            disk_ids=list(request.disk_ids),
            guard=self.receiver.guard,
            change_reference=request.change_reference,
            consistency=consistency,
            vm_configuration=request.vm_configuration,
        )
        views = await asyncio.to_thread(_points_with_configurations, vm_dir, self.receiver.guard)
        view, configuration = next((v, c) for v, c in views if v.point.id == p.id)
        return _point_message(request.replica_path, view, configuration)

    @handle_errors
    async def ListRestorePoints(
        self,
        request: target_pb2.ListRestorePointsRequest,
        context: grpc.aio.ServicerContext[target_pb2.ListRestorePointsRequest, target_pb2.ListRestorePointsResponse],
    ) -> target_pb2.ListRestorePointsResponse:
        vm_dir = self.datastore.vm_dir(request.replica_path)
        views = await asyncio.to_thread(_points_with_configurations, vm_dir, self.receiver.guard)
        return target_pb2.ListRestorePointsResponse(
            restore_points=[_point_message(request.replica_path, v, c) for v, c in views]
        )

    @handle_errors
    async def DeleteRestorePoint(
        self,
        request: target_pb2.DeleteRestorePointRequest,
        context: grpc.aio.ServicerContext[target_pb2.DeleteRestorePointRequest, target_pb2.DeleteRestorePointResponse],
    ) -> target_pb2.DeleteRestorePointResponse:
        check_name("restore_point_id", request.restore_point_id)
        vm_dir = self.datastore.vm_dir(request.replica_path)
        await asyncio.to_thread(restore_points.delete, vm_dir, request.restore_point_id, guard=self.receiver.guard)
        return target_pb2.DeleteRestorePointResponse()

    @handle_errors
    async def GetReplica(
        self,
        request: target_pb2.GetReplicaRequest,
        context: grpc.aio.ServicerContext[target_pb2.GetReplicaRequest, target_pb2.Replica],
    ) -> target_pb2.Replica:
        vm_dir = self.datastore.vm_dir(request.replica_path)
        status = await asyncio.to_thread(vm_replica.status, vm_dir, guards=self.receiver.guard)
        return _replica_message(request.replica_path, status)

    @handle_errors
    async def EndReplicaSession(
        self,
        request: target_pb2.EndReplicaSessionRequest,
        context: grpc.aio.ServicerContext[target_pb2.EndReplicaSessionRequest, target_pb2.Replica],
    ) -> target_pb2.Replica:
        check_name("session_id", request.session_id)
        vm_dir = self.datastore.vm_dir(request.replica_path)
        status = await asyncio.to_thread(
            vm_replica.end_session,
            vm_dir,
            request.session_id,
            keep_for_resume=request.keep_for_resume,
            guards=self.receiver.guard,
        )
        return _replica_message(request.replica_path, status)

    @handle_errors
    async def RollbackReplica(
        self,
        request: target_pb2.RollbackReplicaRequest,
        context: grpc.aio.ServicerContext[target_pb2.RollbackReplicaRequest, target_pb2.Replica],
    ) -> target_pb2.Replica:
        vm_dir = self.datastore.vm_dir(request.replica_path)
        status = await asyncio.to_thread(vm_replica.roll_back, vm_dir, guards=self.receiver.guard)
        return _replica_message(request.replica_path, status)

    @handle_errors
    async def ReadDigests(  # type: ignore[override]
        self,
        request: target_pb2.ReadDigestsRequest,
        context: grpc.aio.ServicerContext[target_pb2.ReadDigestsRequest, target_pb2.DigestChunk],
    ) -> AsyncIterator[target_pb2.DigestChunk]:
        peer, role = peer_identity(context)
        check_digest_count("block_count", request.block_count)
        disk_dir = self.datastore.disk_dir(request.replica_path, request.disk_id)  # checks the names first
        checkpoint = None
        if role == "proxy":  # a proxy reads only the disk its ticket names, as prepared for its checkpoint
            checkpoint = self.receiver.check_ticket(
                request.ticket,
                peer=peer,
                session_id=request.session_id,
                disk_id=request.disk_id,
                replica_path=request.replica_path,
            ).checkpoint_id
        self.digest_slots.take(peer)  # before anything is read; RESOURCE_EXHAUSTED past either bound
        try:
            st = await asyncio.to_thread(replica.load_state, disk_dir)
            if checkpoint is not None and st.checkpoint_id != checkpoint:
                raise TicketError("ticket is for another checkpoint than the replica disk is prepared for")
            first, count, blocks = request.first_block, request.block_count, -(-st.disk_size // st.block_size)
            if first > blocks:
                raise FailedPrecondition(f"block {first} is past the disk's {blocks} blocks")
            if count == 0:  # to the end of the disk, which must be within one call's bound too
                count = check_digest_count("block_count", blocks - first)
            async for chunk in _digest_chunks(disk_dir, first, count):
                yield chunk
        finally:
            self.digest_slots.give(peer)

    @handle_errors
    async def VerifyReplica(  # type: ignore[override]
        self,
        request: target_pb2.VerifyReplicaRequest,
        context: grpc.aio.ServicerContext[target_pb2.VerifyReplicaRequest, common_pb2.VerifyProgress],
    ) -> AsyncIterator[common_pb2.VerifyProgress]:
        peer, _ = peer_identity(context)
        vm_dir = self.datastore.vm_dir(request.replica_path)  # checks the names first
        if request.restore_point_id:
            check_name("restore_point_id", request.restore_point_id)
        disk_ids = verify.check_disk_ids("disk_ids", request.disk_ids)
        percent = check_sample_percent("sample_percent", request.sample_percent)
        self.disk_read_slots.take(peer)  # before anything is read; RESOURCE_EXHAUSTED past either bound
        try:
            progress = verify.verify_point(
                vm_dir,
                point_id=request.restore_point_id,
                disk_ids=disk_ids,
                percent=percent,
                executor=self.disk_reads,
                rng=self.rng,
            )
            # Closed here when the caller goes away, not by the garbage collector: the disk is let go at once.
            async with contextlib.aclosing(progress):
                async for message in progress:
                    yield message
        finally:
            self.disk_read_slots.give(peer)

    @handle_errors
    async def ReadReplicaDisk(  # type: ignore[override]
        self,
        request: target_pb2.ReadReplicaDiskRequest,
        context: grpc.aio.ServicerContext[target_pb2.ReadReplicaDiskRequest, common_pb2.DiskChunk],
    ) -> AsyncIterator[common_pb2.DiskChunk]:
        peer, _ = peer_identity(context)
        vm_dir = self.datastore.vm_dir(request.replica_path)
        if not request.restore_point_id:
            raise InvalidArgument("restore_point_id", "is required (a restore point's id)")
        check_name("restore_point_id", request.restore_point_id)
        self.datastore.disk_dir(request.replica_path, request.disk_id)  # checks disk_id
        self.disk_read_slots.take(peer)
        try:
            chunks = export.export_disk(
                vm_dir, point_id=request.restore_point_id, disk_id=request.disk_id, executor=self.disk_reads
            )
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        finally:
            self.disk_read_slots.give(peer)

    # Registered with raw-bytes requests (see vmrepl.batch), hence the signature differs from the stub's.
    @handle_errors
    async def Transfer(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, target_pb2.TransferResponse],
    ) -> None:
        await self.receiver.run(request_iterator, context)

    # ---- failover: mounts (docs/target-agent.md, "Mounts") ----

    @handle_errors
    async def MountPoint(
        self,
        request: target_pb2.MountPointRequest,
        context: grpc.aio.ServicerContext[target_pb2.MountPointRequest, target_pb2.Mount],
    ) -> target_pb2.Mount:
        mount_id = mounts.check_mount_id(request.mount_id)
        if request.point_id:
            check_name("point_id", request.point_id)
        if request.kind not in _KINDS:
            raise InvalidArgument("kind", "FAILOVER or TEST")
        if request.layout not in _LAYOUTS:
            raise InvalidArgument("layout", "LAYER or VHDX")
        self.datastore.vm_dir(request.replica_path)  # checks the path before anything else
        rec = await asyncio.to_thread(
            mounts.mount,
            self.datastore,
            self.mount_settings,
            self.receiver.guard,
            replica_path=request.replica_path,
            point_id=request.point_id,
            mount_id=mount_id,
            kind=_KINDS[request.kind],
            layout=_LAYOUTS[request.layout],
        )
        return await asyncio.to_thread(_mount_message, self.mount_settings, rec)

    @handle_errors
    async def GetMount(
        self,
        request: target_pb2.GetMountRequest,
        context: grpc.aio.ServicerContext[target_pb2.GetMountRequest, target_pb2.Mount],
    ) -> target_pb2.Mount:
        mount_id = mounts.check_mount_id(request.mount_id)
        rec = await asyncio.to_thread(mounts.load_record, self.datastore, mount_id)
        if rec is None:
            raise NotFound(f"mount {mount_id} does not exist")
        return await asyncio.to_thread(_mount_message, self.mount_settings, rec)

    @handle_errors
    async def ListMounts(
        self,
        request: target_pb2.ListMountsRequest,
        context: grpc.aio.ServicerContext[target_pb2.ListMountsRequest, target_pb2.ListMountsResponse],
    ) -> target_pb2.ListMountsResponse:
        if request.replica_path:
            self.datastore.vm_dir(request.replica_path)
        records = await asyncio.to_thread(mounts.list_records, self.datastore, request.replica_path)
        messages = [await asyncio.to_thread(_mount_message, self.mount_settings, r) for r in records]
        return target_pb2.ListMountsResponse(mounts=messages)

    @handle_errors
    async def UnmountPoint(
        self,
        request: target_pb2.UnmountPointRequest,
        context: grpc.aio.ServicerContext[target_pb2.UnmountPointRequest, target_pb2.Mount],
    ) -> target_pb2.Mount:
        mount_id = mounts.check_mount_id(request.mount_id)
        rec = await asyncio.to_thread(
            mounts.unmount, self.datastore, self.mount_settings, self.receiver.guard, mount_id
        )
        if rec is None:
            return target_pb2.Mount(mount_id=mount_id, state=target_pb2.MOUNT_STATE_GONE)
        return _mount_message(self.mount_settings, rec, gone=True)

    @handle_errors
    async def FlattenMount(
        self,
        request: target_pb2.FlattenMountRequest,
        context: grpc.aio.ServicerContext[target_pb2.FlattenMountRequest, target_pb2.Mount],
    ) -> target_pb2.Mount:
        mount_id = mounts.check_mount_id(request.mount_id)
        rec = await asyncio.to_thread(mounts.flatten, self.datastore, self.receiver.guard, mount_id)
        return await asyncio.to_thread(_mount_message, self.mount_settings, rec)

    @handle_errors
    async def DeleteReplica(
        self,
        request: target_pb2.DeleteReplicaRequest,
        context: grpc.aio.ServicerContext[target_pb2.DeleteReplicaRequest, target_pb2.DeleteReplicaResponse],
    ) -> target_pb2.DeleteReplicaResponse:
        vm_dir = self.datastore.vm_dir(request.replica_path)
        if request.remove_created:  # first: the record naming them goes with the folder
            removed = await asyncio.to_thread(failback.remove_created, vm_dir)
            log.info("failback_created_disks_removed", replica_path=request.replica_path, removed=removed)
        deleted = await asyncio.to_thread(
            removal.delete_replica, self.datastore, self.receiver.guard, request.replica_path
        )
        return target_pb2.DeleteReplicaResponse(deleted=deleted)

    # ---- failback ----

    @handle_errors
    async def PrepareFailbackDisk(
        self,
        request: target_pb2.PrepareFailbackDiskRequest,
        context: grpc.aio.ServicerContext[target_pb2.PrepareFailbackDiskRequest, target_pb2.ReplicaDisk],
    ) -> target_pb2.ReplicaDisk:
        check_block_size("block_size", request.block_size)
        replica_format = _format_name(request.format)
        vm_dir = self.datastore.vm_dir(request.replica_path)
        disk_dir = self.datastore.disk_dir(request.replica_path, request.disk_id)
        if request.create:
            check_disk_size("size", request.size)
            original = failback.check_new_path(
                self.failback_roots, request.original_path, datastore=self.datastore.root
            )
        else:
            original = failback.check_original_path(
                self.failback_roots, request.original_path, host_paths=self.host_paths, datastore=self.datastore.root
            )
        st = await asyncio.to_thread(
            failback.prepare,
            vm_dir,
            disk_dir,
            guards=self.receiver.guard,
            original=original,
            replica_format=replica_format,
            block_size=request.block_size,
            create_size=request.size if request.create else None,
        )
        return _disk_message(request.replica_path, request.disk_id, st)
