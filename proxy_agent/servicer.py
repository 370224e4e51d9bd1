"""The ProxyAgent gRPC service: start, watch and cancel disk transfers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

import grpc

from proxy_agent import metrics
from proxy_agent import request as rq
from proxy_agent.config import ProxySettings
from proxy_agent.target_link import GrpcTargetLink, TargetLink
from proxy_agent.transfer import DiskTransfer, TransferSpec
from vmrepl import __version__
from vmrepl.batch import MAX_MESSAGE_BYTES
from vmrepl.domain import TRANSFER_ENDED
from vmrepl.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from vmrepl.logs import get_logger
from vmrepl.names import check_name
from vmrepl.rpc import handle_errors, secure_channel
from vmrepl.security.tls import certificate_identity
from vmrepl.v1 import proxy_pb2, proxy_pb2_grpc

log = get_logger("vmrepl.proxy")
WATCH_INTERVAL = 0.25
KEEP_FINISHED = 1000
DEFAULT_RESUME_TIMEOUT = 1800
WATCHERS = ("controller", "operator", "reader")
# Who may call what: the role in the caller's certificate, checked by vmrepl.rpc before a request is read.
# Only the controller starts and cancels transfers (it signs their tickets); people may watch them.
ROLES: dict[str, tuple[str, ...]] = {
    "StartDiskTransfer": ("controller",),
    "WatchTransfer": WATCHERS,
    "CancelTransfer": ("controller",),
    "GetAgentInfo": WATCHERS,
}


TargetLinkFactory = Callable[[proxy_pb2.TargetEndpoint], TargetLink]


class ProxyAgentServicer(proxy_pb2_grpc.ProxyAgentServicer):
    def __init__(self, settings: ProxySettings, *, target_link: TargetLinkFactory | None = None) -> None:
        self.settings = settings
        # How a transfer reaches its target: gRPC over mTLS; in-process tests give a fake.
        self._target_link = target_link or self._grpc_link
        # Finished transfers stay readable until KEEP_FINISHED newer ones push them out.
        self.transfers: OrderedDict[str, DiskTransfer] = OrderedDict()

    def _running(self) -> list[DiskTransfer]:
        return [t for t in self.transfers.values() if t.stats.state not in TRANSFER_ENDED]

    def _get(self, transfer_id: str) -> DiskTransfer:
        t = self.transfers.get(transfer_id)
        if t is None:
            raise NotFound(f"transfer {transfer_id!r} does not exist on this proxy")
        return t

    async def _open(self, req: proxy_pb2.StartDiskTransferRequest) -> DiskTransfer:
        rq.check_identity(req)
        s = self.settings
        path = rq.source_path(req.source.locator, s.source_roots, s.host_paths)
        fmt = rq.disk_format(req)
        reader = await asyncio.to_thread(
            rq.open_source, fmt, req.source.locator, path, host_paths=s.host_paths, roots=s.source_roots
        )
        try:
            if reader.size != req.source.size:
                raise FailedPrecondition(f"source disk is {reader.size} bytes, the request says {req.source.size}")
            allocated = await asyncio.to_thread(reader.allocated_extents)
            plans = rq.plans_for(req, disk_size=reader.size, allocated=allocated)
            spec = TransferSpec(
                transfer_id=req.transfer_id or uuid.uuid4().hex,
                session_id=req.session_id,
                checkpoint_id=req.checkpoint_id,
                disk_id=req.disk_id,
                replica_path=req.replica_path,
                ticket=req.ticket,
                block_size=rq.block_size(req),
                mode=plans.mode,
                compression=rq.compression(req),
                bandwidth_bytes_per_s=rq.bandwidth(req),
                resume_timeout=float(req.resume_timeout_seconds or DEFAULT_RESUME_TIMEOUT),
                batch_bytes=self.settings.batch_bytes,
                window=self.settings.window_batches,
                threads=self.settings.compress_threads,
                read_delay=self.settings.test_read_delay_ms / 1000,
                full_check=tuple(plans.full_check) if plans.full_check is not None else None,
                sample_seed=self.settings.test_sample_seed,
            )
        except BaseException:
            reader.close()
            raise
        target = req.target
        return DiskTransfer(
            spec=spec,
            plan=plans.first,
            full_plan=plans.full,
            reader=reader,
            link_factory=lambda: self._target_link(target),
        )

    def _grpc_link(self, target: proxy_pb2.TargetEndpoint) -> TargetLink:
        channel = secure_channel(
            target.address,
            self.settings.tls,
            max_message_bytes=MAX_MESSAGE_BYTES,
            server_name=target.tls_server_name,
        )
        return GrpcTargetLink(channel)

    @handle_errors
    async def StartDiskTransfer(
        self,
        request: proxy_pb2.StartDiskTransferRequest,
        context: grpc.aio.ServicerContext[proxy_pb2.StartDiskTransferRequest, proxy_pb2.StartDiskTransferResponse],
    ) -> proxy_pb2.StartDiskTransferResponse:
        if request.transfer_id:
            check_name("transfer_id", request.transfer_id)
            known = self.transfers.get(request.transfer_id)
            if known is not None:
                if _key(known.spec) != _key(request) or known.spec.checkpoint_id != request.checkpoint_id:
                    raise AlreadyExists(f"transfer {request.transfer_id} is for another session, disk or checkpoint")
                return proxy_pb2.StartDiskTransferResponse(transfer_id=request.transfer_id)  # a retried start
        for t in self._running():
            # Disk ids are unique per VM only: the replica path tells two VMs' disk0 apart.
            if _key(t.spec) == _key(request):
                raise AlreadyExists(f"disk {request.disk_id} of session {request.session_id} is already streaming")
        if len(self._running()) >= self.settings.max_tasks:
            raise ResourceExhausted(f"this proxy already runs its {self.settings.max_tasks} transfers")
        transfer = await self._open(request)
        self.transfers[transfer.spec.transfer_id] = transfer
        while len(self.transfers) > KEEP_FINISHED + self.settings.max_tasks:
            oldest = next(iter(self.transfers))
            if self.transfers[oldest].stats.state not in TRANSFER_ENDED:
                break
            del self.transfers[oldest]
        transfer.start()
        metrics.TRANSFERS_RUNNING.inc()
        if transfer.task is not None:
            transfer.task.add_done_callback(lambda _t: _ended(transfer))
        log.info(
            "transfer_started",
            transfer_id=transfer.spec.transfer_id,
            session_id=request.session_id,
            disk_id=request.disk_id,
            source=request.source.locator,
            target=request.target.address,
        )
        return proxy_pb2.StartDiskTransferResponse(transfer_id=transfer.spec.transfer_id)

    @handle_errors
    async def WatchTransfer(
        self,
        request: proxy_pb2.WatchTransferRequest,
        context: grpc.aio.ServicerContext[proxy_pb2.WatchTransferRequest, proxy_pb2.TransferProgress],
    ) -> AsyncIterator[proxy_pb2.TransferProgress]:
        transfer = self._get(request.transfer_id)
        last: bytes | None = None
        while True:
            msg = transfer.stats.to_proto()
            terminal = msg.state in TRANSFER_ENDED
            msg_cmp = msg.SerializeToString()
            # elapsed_seconds always moves: compare without it so idle transfers stay quiet.
            key = msg_cmp if terminal else _without_elapsed(msg)
            if key != last:
                yield msg
                last = key
            if terminal:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(transfer.ended.wait(), WATCH_INTERVAL)

    @handle_errors
    async def GetAgentInfo(
        self,
        request: proxy_pb2.GetAgentInfoRequest,
        context: grpc.aio.ServicerContext[proxy_pb2.GetAgentInfoRequest, proxy_pb2.AgentInfo],
    ) -> proxy_pb2.AgentInfo:
        name, role = await asyncio.to_thread(certificate_identity, self.settings.tls.cert_file)
        return proxy_pb2.AgentInfo(certificate_name=name, role=role, version=__version__)

    @handle_errors
    async def CancelTransfer(
        self,
        request: proxy_pb2.CancelTransferRequest,
        context: grpc.aio.ServicerContext[proxy_pb2.CancelTransferRequest, proxy_pb2.CancelTransferResponse],
    ) -> proxy_pb2.CancelTransferResponse:
        self._get(request.transfer_id).stop()
        return proxy_pb2.CancelTransferResponse()

    async def stop_all(self) -> None:
        """On shutdown: stop every transfer cleanly so the disks stay resumable."""
        running = self._running()
        for t in running:
            t.stop()
        tasks = [t.task for t in running if t.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=20)
            for task in pending:
                task.cancel()


def _ended(transfer: DiskTransfer) -> None:
    metrics.TRANSFERS_RUNNING.dec()
    metrics.transfer_ended(transfer.stats.to_proto())


def _key(x: TransferSpec | proxy_pb2.StartDiskTransferRequest) -> tuple[str, str, str]:
    return (x.session_id, x.replica_path, x.disk_id)


def _without_elapsed(msg: proxy_pb2.TransferProgress) -> bytes:
    copy = proxy_pb2.TransferProgress()
    copy.CopyFrom(msg)
    copy.elapsed_seconds = 0
    return copy.SerializeToString()
