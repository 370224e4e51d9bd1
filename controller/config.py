"""Controller settings (`vmrepl-controller --config controller.toml`, env prefix VMREPL_CONTROLLER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from controller.db.connect import sqlite_url
from vmrepl.call_limits import Limits
from vmrepl.config import LogSettings, ProgramSettings, TlsSettings


class ControllerSettings(ProgramSettings):
    model_config = SettingsConfigDict(env_prefix="VMREPL_CONTROLLER_", env_nested_delimiter="__", extra="forbid")

    listen: str = Field("127.0.0.1:7400", description="host:port of the ControllerService gRPC API")
    data_dir: Path = Field(description="the controller's own files: the SQLite database, the secret key file")
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty: SQLite in data_dir (postgresql+asyncpg://user:pw@host/db also works)"
    )
    secret_key_file: Path | None = Field(
        None, description="Fernet keys for credentials at rest, newest first; default data_dir/secret.key (made once)"
    )
    signing_key: Path = Field(description="Ed25519 key (PEM) that signs transfer tickets; targets hold its public half")
    tls: TlsSettings
    log: LogSettings = LogSettings()
    metrics_listen: str = Field("", description="host:port of the Prometheus /metrics endpoint (mTLS); empty: off")
    metrics_plain_http: bool = Field(False, description="serve /metrics over plain HTTP instead of mTLS")
    proxy_lost_seconds: float = Field(
        60.0,
        gt=0,
        description="how long a running transfer's unreachable proxy is retried before the disk is left resumable",
    )
    webhook_backoff_seconds: float = Field(
        2.0, gt=0, le=300, description="first wait between webhook attempts; doubles up to 5 min, 8 attempts"
    )
    stop_timeout_seconds: float = Field(30.0, gt=0, description="how long SIGTERM waits for transfers to stop")
    shutdown_vm_seconds: float = Field(
        300.0,
        gt=0,
        le=86400,
        description="how long a clean guest shutdown may take (a planned failover's source, a failback's VM)",
    )
    # API load must not starve the session engine: these bound it (docs/controller.md, "Limits").
    api_calls_per_client: int = Field(
        8, ge=1, le=1000, description="API calls (streams included) one client certificate may have open at once"
    )
    api_calls_total: int = Field(32, ge=1, le=10000, description="API calls open at once over all clients")
    api_retry_after_seconds: float = Field(
        1.0, gt=0, le=60, description="the wait a refused call is told to take before trying again"
    )
    api_database_connections: int = Field(
        4, ge=1, le=100, description="database connections of API reads (a pool apart from the engine's)"
    )
    # Test hook: the scheduler's clock runs this many seconds ahead, to reach a window's end on demand.
    test_clock_offset_seconds: float = Field(0.0, description="test only: shifts the scheduler's clock")
    # Test hook: exit right after the Nth committed state change (0: never). Used to prove crash recovery.
    test_crash_at_transition: int = Field(0, ge=0, description="test only: exit after this many state changes")

    def db_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir / "controller.db")

    def api_limits(self) -> Limits:
        return Limits(
            per_client=self.api_calls_per_client,
            total=self.api_calls_total,
            retry_after_seconds=self.api_retry_after_seconds,
        )

    def key_file(self) -> Path:
        return self.secret_key_file or self.data_dir / "secret.key"
