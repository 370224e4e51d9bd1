"""Prometheus metrics: the HTTP endpoint every vmrepl program serves when `metrics_listen` is set.

The endpoint uses the program's own certificate and requires a client certificate from the vmrepl CA
(mTLS like every other channel): give Prometheus one (`vmrepl-certs issue --name prometheus --role
reader`) and its `tls_config`. `metrics_plain_http = true` serves plain HTTP instead, for a scraper on a
trusted management network. Metrics never carry secrets.
"""

from __future__ import annotations

from prometheus_client import Counter, start_http_server

from vmrepl.config import TlsSettings
from vmrepl.errors import ConfigError
from vmrepl.logs import get_logger
from vmrepl.progress import TransferFigures
from vmrepl.v1 import proxy_pb2

log = get_logger("vmrepl.metrics")


def count_transfer(
    p: proxy_pb2.TransferProgress, *, bytes_total: Counter, stage_busy: Counter, resumes: Counter
) -> None:
    """Add an ended transfer's figures to a program's counters (labels `kind` and `stage`)."""
    figures = TransferFigures.from_progress(p)
    for kind, value in figures.byte_counts():
        bytes_total.labels(kind).inc(value)
    for stage, seconds in figures.stage_seconds().items():
        stage_busy.labels(stage).inc(seconds)
    resumes.inc(figures.resumes)


def serve_metrics(listen: str, tls: TlsSettings, *, plain_http: bool = False) -> int | None:
    """Start the /metrics endpoint in a background thread; returns its port (None when not configured)."""
    if not listen:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"metrics_listen: {listen!r} is not host:port")
    tls_args: dict[str, object] = {}
    if not plain_http:
        tls_args = {
            "certfile": str(tls.cert_file),
            "keyfile": str(tls.key_file),
            "client_cafile": str(tls.ca_file),
            "client_auth_required": True,
        }
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", **tls_args)  # type: ignore[arg-type]
    except OSError as e:
        raise ConfigError(f"metrics_listen: cannot listen on {listen}: {e.strerror}") from e
    bound = int(server.server_port)
    log.info("metrics_listening", address=listen, port=bound, tls=not plain_http)
    return bound
