"""The proxy's Prometheus metrics (served by vmrepl.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from vmrepl.metrics import count_transfer
from vmrepl.v1 import proxy_pb2

TRANSFERS_RUNNING = Gauge("vmrepl_proxy_transfers_running", "Disk transfers streaming now")
TRANSFERS_ENDED = Counter("vmrepl_proxy_transfers_ended_total", "Disk transfers ended, by final state", ["state"])
BYTES = Counter(
    "vmrepl_proxy_bytes_total",
    "Bytes of ended transfers by kind: read from the source, data and sent (wire), and skipped per reason",
    ["kind"],
)
STAGE_BUSY = Counter("vmrepl_proxy_stage_busy_seconds_total", "Busy seconds of ended transfers per stage", ["stage"])
RESUMES = Counter("vmrepl_proxy_stream_resumes_total", "Times a broken stream was resumed from the committed offset")
ERRORS = Counter("vmrepl_proxy_transfer_errors_total", "Transfers that failed, by gRPC status code", ["code"])

STATE_NAMES = {v: k.removeprefix("TRANSFER_STATE_").lower() for k, v in proxy_pb2.TransferState.items()}


def transfer_ended(p: proxy_pb2.TransferProgress) -> None:
    """Count a transfer's final figures once, when it ends."""
    TRANSFERS_ENDED.labels(STATE_NAMES.get(p.state, "unknown")).inc()
    count_transfer(p, bytes_total=BYTES, stage_busy=STAGE_BUSY, resumes=RESUMES)
    if p.state == proxy_pb2.TRANSFER_STATE_FAILED:
        ERRORS.labels(p.error_code or "UNKNOWN").inc()
