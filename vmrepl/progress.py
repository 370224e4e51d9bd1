"""A transfer's progress figures as plain pairs, for the programs that count or store them."""

from __future__ import annotations

from vmrepl.v1 import proxy_pb2


def byte_counts(p: proxy_pb2.TransferProgress) -> list[tuple[str, int]]:
    """Bytes by kind: read from the source, data (before compression), sent (wire), skipped per reason."""
    s = p.skipped
    return [
        ("read", p.bytes_read),
        ("data", p.bytes_data),
        ("sent", p.bytes_sent),
        ("zero", s.zero),
        ("unallocated", s.unallocated),
        ("unchanged", s.unchanged),
        ("excluded", s.excluded),
    ]


def stage_seconds(p: proxy_pb2.TransferProgress) -> dict[str, float]:
    """Busy seconds per pipeline stage."""
    b = p.busy
    return {
        "source_read": b.source_read,
        "compress": b.compress,
        "network_wait": b.network_wait,
        "target_write": b.target_write,
    }


def busy(p: proxy_pb2.TransferProgress) -> dict[str, float]:
    """Busy seconds per stage, and the worker threads source_read and compress are summed over."""
    return {**stage_seconds(p), "threads": float(p.busy.threads)}
