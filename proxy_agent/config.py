"""Proxy agent settings (`vmrepl-proxy --config proxy.toml`, env prefix VMREPL_PROXY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from vmrepl.config import LogSettings, ProgramSettings, TlsSettings
from vmrepl.domain import DEFAULT_SLOTS, SLOTS_LIMIT
from vmrepl.extent import MiB


class ProxySettings(ProgramSettings):
    model_config = SettingsConfigDict(env_prefix="VMREPL_PROXY_", env_nested_delimiter="__", extra="forbid")

    listen: str = Field("127.0.0.1:7401", description="host:port of the gRPC server")
    name: str = Field("proxy", description="this proxy's name, for logs")
    source_roots: list[Path] = Field(
        min_length=1, description="directories the proxy may read source disks from; anything else is refused"
    )
    tls: TlsSettings
    log: LogSettings = LogSettings()
    metrics_listen: str = Field("", description="host:port of the Prometheus /metrics endpoint (mTLS); empty: off")
    metrics_plain_http: bool = Field(False, description="serve /metrics over plain HTTP instead of mTLS")
    max_tasks: int = Field(
        DEFAULT_SLOTS, ge=SLOTS_LIMIT.low, le=SLOTS_LIMIT.high, description="disk transfers run at once"
    )
    batch_bytes: int = Field(4 * MiB, ge=MiB, le=16 * MiB, description="raw data bytes per batch")
    window_batches: int = Field(16, ge=2, le=64, description="batches in flight without an ack")
    compress_threads: int = Field(2, ge=1, le=32, description="threads reading and compressing batches")
    # Test only: slows every block read, so tests can check the bottleneck is named.
    test_read_delay_ms: float = Field(0.0, ge=0, le=1000, description="test only: added to each block read")
    test_sample_seed: str = Field(
        "", max_length=128, description="test only: seeds the sample's random half instead of the transfer id"
    )
