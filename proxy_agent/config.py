"""Proxy agent settings (`vmrepl-proxy --config proxy.toml`, env prefix VMREPL_PROXY_)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from vmrepl.config import LogSettings, ProgramSettings, TlsSettings
from vmrepl.domain import DEFAULT_SLOTS, SLOTS_LIMIT
from vmrepl.extent import MiB
from vmrepl.host_paths import HostPathMapping, fold


class ProxySettings(ProgramSettings):
    model_config = SettingsConfigDict(env_prefix="VMREPL_PROXY_", env_nested_delimiter="__", extra="forbid")

    listen: str = Field("127.0.0.1:7401", description="host:port of the gRPC server")
    name: str = Field("proxy", description="this proxy's name, for logs")
    source_roots: list[Path] = Field(
        default_factory=list,
        description="directories the proxy may read source disks from; anything else is refused "
        "(with host_paths: empty, or narrowing what the mappings reach)",
    )
    host_paths: list[HostPathMapping] = Field(
        default_factory=list,
        max_length=256,
        description="Hyper-V host folders and where this proxy reads them (an off-host proxy: its SMB mounts)",
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

    @model_validator(mode="after")
    def _somewhere_to_read(self) -> Self:
        if not self.source_roots and not self.host_paths:
            raise ValueError("set source_roots, host_paths or both: this proxy may read no disk otherwise")
        prefixes = [fold(m.host_prefix) for m in self.host_paths]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("host_paths names one host_prefix twice (prefixes compare case-insensitively)")
        return self
