"""A transfer's counters, updated on the event loop and read by WatchTransfer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from proxy_agent.full_check import FullCheckFindings
from vmrepl.v1 import common_pb2, proxy_pb2

RUNNING = proxy_pb2.TRANSFER_STATE_RUNNING
RECONNECTING = proxy_pb2.TRANSFER_STATE_RECONNECTING
COMPLETED = proxy_pb2.TRANSFER_STATE_COMPLETED
FAILED = proxy_pb2.TRANSFER_STATE_FAILED
CANCELLED = proxy_pb2.TRANSFER_STATE_CANCELLED


@dataclass
class TransferStats:
    transfer_id: str
    session_id: str
    disk_id: str
    disk_size: int
    state: proxy_pb2.TransferState.ValueType = RUNNING
    bytes_read: int = 0
    bytes_data: int = 0
    bytes_sent: int = 0
    zero: int = 0
    unallocated: int = 0
    unchanged: int = 0
    excluded: int = 0
    source_read: float = 0.0
    compress: float = 0.0
    network_wait: float = 0.0
    target_write_done: float = 0.0  # from streams that ended
    target_write_stream: float = 0.0  # the current stream, as its last ack said
    committed_offset: int = 0
    resumes: int = 0
    error_code: str = ""
    error_message: str = ""
    passes: int = 1
    # Sampled verification after a changed-range pass: blocks compared with the replica, and those that differed.
    sampled_blocks: int = 0
    mismatched_blocks: int = 0
    threads: int = 1
    # Set when the transfer's comparison is a full check (CompareDigests.full_check).
    full_check: FullCheckFindings | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def to_proto(self) -> proxy_pb2.TransferProgress:
        end = self.ended if self.ended is not None else time.monotonic()
        return proxy_pb2.TransferProgress(
            transfer_id=self.transfer_id,
            session_id=self.session_id,
            disk_id=self.disk_id,
            state=self.state,
            disk_size=self.disk_size,
            bytes_read=self.bytes_read,
            bytes_data=self.bytes_data,
            bytes_sent=self.bytes_sent,
            skipped=common_pb2.SkippedBytes(
                zero=self.zero, unallocated=self.unallocated, unchanged=self.unchanged, excluded=self.excluded
            ),
            busy=proxy_pb2.StageBusy(
                source_read=self.source_read,
                compress=self.compress,
                network_wait=self.network_wait,
                target_write=self.target_write_done + self.target_write_stream,
                threads=self.threads,
            ),
            committed_offset=self.committed_offset,
            resumes=self.resumes,
            elapsed_seconds=end - self.started,
            error_code=self.error_code,
            error_message=self.error_message,
            passes=self.passes,
            sample=common_pb2.SampledVerification(
                sampled_blocks=self.sampled_blocks, mismatched_blocks=self.mismatched_blocks
            ),
            full_check=self.full_check.to_proto() if self.full_check is not None else None,
        )
