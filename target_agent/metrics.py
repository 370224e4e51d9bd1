"""The target's Prometheus metrics (served by vmrepl.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

STREAMS_OPEN = Gauge("vmrepl_target_streams_open", "Transfer streams being received now")
STREAMS = Counter("vmrepl_target_streams_total", "Transfer streams accepted (a resumed stream counts again)")
BATCHES = Counter("vmrepl_target_batches_total", "Batches received and applied")
BYTES = Counter("vmrepl_target_bytes_total", "Bytes received: data (decompressed) and wire", ["kind"])
WRITE_BUSY = Counter("vmrepl_target_write_busy_seconds_total", "Seconds spent decompressing, verifying and writing")
ERRORS = Counter("vmrepl_target_stream_errors_total", "Streams refused or failed, by gRPC status code", ["code"])
