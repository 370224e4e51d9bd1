"""Target agent settings (`vmrepl-target --config target.toml`, env prefix VMREPL_TARGET_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from vmrepl.config import LogSettings, ProgramSettings, TlsSettings
from vmrepl.host_paths import HostPathMapping, fold


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
    max_streams_per_peer: int = Field(
        16, ge=1, le=1024, description="Transfer streams one proxy certificate may hold open at once"
    )
    max_streams: int = Field(64, ge=1, le=4096, description="Transfer streams open at once, from all proxies")
    # The same defaults as Transfer: every stream the Transfer bounds admit may read its digests alongside.
    max_digest_reads_per_peer: int = Field(
        16, ge=1, le=1024, description="ReadDigests calls one certificate (proxy or controller) may hold open at once"
    )
    max_digest_reads: int = Field(64, ge=1, le=4096, description="ReadDigests calls open at once, from all callers")
    # Verification and export read whole disks: few at once, so they cannot pin the disks sessions write.
    max_disk_reads_per_peer: int = Field(
        2, ge=1, le=64, description="VerifyReplica and ReadReplicaDisk calls one certificate may hold open at once"
    )
    max_disk_reads: int = Field(
        4, ge=1, le=64, description="VerifyReplica and ReadReplicaDisk calls open at once, from all callers"
    )
    open_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="a stream that sends no open message within this is ended"
    )
    idle_timeout_seconds: float = Field(
        120.0, gt=0, le=86400, description="an opened stream silent this long (target idle too) is ended"
    )
    # Failover (docs/target-agent.md, "Mounts"): where restore points are mounted as VM folders.
    vm_root: Path | None = Field(
        None,
        description="folder of failed-over VMs' folders, on the datastore's file system (mounts hard-link replica "
        "files); unset: MountPoint is refused",
    )
    vm_root_host_path: str = Field(
        "", max_length=1024, description="how the failover host names vm_root (e.g. D:\\vmrepl\\vms); empty: not said"
    )
    failback_roots: list[Path] = Field(
        default_factory=list,
        description="folders holding original VM disks a failback may write (PrepareFailbackDisk); empty: none",
    )
    host_paths: list[HostPathMapping] = Field(
        default_factory=list,
        max_length=256,
        description="Hyper-V host folders and where this target has them (a failback names an original disk "
        "by its host path: C:\\Hyper-V\\web01.vhdx)",
    )

    @field_validator("host_paths")
    @classmethod
    def _one_mapping_per_prefix(cls, value: list[HostPathMapping]) -> list[HostPathMapping]:
        prefixes = [fold(m.host_prefix) for m in value]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("host_paths names one host_prefix twice (prefixes compare case-insensitively)")
        return value

    # Test only: slows every batch write, so tests can check the bottleneck is named.
    test_write_delay_ms: float = Field(0.0, ge=0, le=1000, description="test only: added to each batch write")
