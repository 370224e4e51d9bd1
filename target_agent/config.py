"""Target agent settings (`vmrepl-target --config target.toml`, env prefix VMREPL_TARGET_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from vmrepl.config import LogSettings, ProgramSettings, TlsSettings


class TargetSettings(ProgramSettings):
    model_config = SettingsConfigDict(env_prefix="VMREPL_TARGET_", env_nested_delimiter="__", extra="forbid")

    listen: str = Field("127.0.0.1:7402", description="host:port of the gRPC server")
    name: str = Field("target", description="this target's name; tickets with another audience are refused")
    datastore_root: Path = Field(description="directory that holds every replica; nothing is written outside it")
    controller_public_keys: list[Path] = Field(description="PEM Ed25519 keys whose tickets are accepted")
    tls: TlsSettings
    log: LogSettings = LogSettings()
    metrics_listen: str = Field("", description="host:port of the Prometheus /metrics endpoint (mTLS); empty: off")
    metrics_plain_http: bool = Field(False, description="serve /metrics over plain HTTP instead of mTLS")
    max_window_batches: int = Field(64, ge=2, le=256, description="largest window a proxy may ask for")
    # Test only: slows every batch write, so tests can check the bottleneck is named.
    test_write_delay_ms: float = Field(0.0, ge=0, le=1000, description="test only: added to each batch write")
