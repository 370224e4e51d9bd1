"""Real agent processes on loopback with mTLS, and the images they replicate."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from controller import lab
from controller.engine.agents import GrpcProxyClient, GrpcTargetClient, proxy_client, target_client
from controller.engine.transfer import DiskTaskSpec, run_disk_task
from tests.conftest import need_tool
from tests.integration.controller_env import ControllerEnv, make_env
from tests.support.certs import tls_settings
from tests.support.database import BACKENDS, create_pg_database, drop_pg_database
from vmrepl.config import TlsSettings
from vmrepl.extent import MiB
from vmrepl.security.ticket import load_signing_key
from vmrepl.v1 import proxy_pb2, target_pb2

IMAGE_SIZE = 256 * MiB


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("images") / "base.raw"
    counts = lab.make_mixed_image(path, IMAGE_SIZE)
    return path, counts


@dataclass
class Lab:
    work: Path
    certs: lab.LabCerts
    image: Path
    counts: dict[str, int]
    target: lab.AgentProcess
    proxy: lab.AgentProcess
    clients: list[GrpcProxyClient | GrpcTargetClient] = field(default_factory=list)

    @property
    def signing_key(self) -> ed25519.Ed25519PrivateKey:
        return load_signing_key(self.certs.signing_key)

    def tls(self, name: str = "controller") -> TlsSettings:
        return tls_settings(self.certs, name)

    def proxy_client(self) -> GrpcProxyClient:
        c = proxy_client(self.proxy.address, self.tls())
        self.clients.append(c)
        return c

    def target_client(self, name: str = "controller", address: str | None = None) -> GrpcTargetClient:
        c = target_client(address or self.target.address, self.tls(name))
        self.clients.append(c)
        return c

    async def replica_disk(self, replica_path: str = "jobs/vm1", disk_id: str = "disk0") -> target_pb2.ReplicaDisk:
        """The target's view of a replica disk, asked on a new channel (the target may have restarted)."""
        return await self.target_client().get_disk(replica_path, disk_id, within=2)

    def replica(self, replica_path: str = "jobs/vm1", disk_id: str = "disk0") -> Path:
        return self.work / "datastore" / replica_path / "disks" / disk_id / "data.raw"

    def spec(self, session_id: str, **over: object) -> DiskTaskSpec:
        args: dict[str, object] = {
            "session_id": session_id,
            "checkpoint_id": f"cp-{session_id}",
            "disk_id": "disk0",
            "source_locator": str(self.image),
            "disk_size": self.image.stat().st_size,
            "replica_path": "jobs/vm1",
        }
        args.update(over)
        return DiskTaskSpec(**args)  # type: ignore[arg-type]

    async def replicate(self, spec: DiskTaskSpec, target_address: str | None = None) -> proxy_pb2.TransferProgress:
        return await run_disk_task(
            proxy=self.proxy_client(),
            target=self.target_client(address=target_address),
            spec=spec,
            signing_key=self.signing_key,
        )

    def restart_proxy(self, **settings: Any) -> None:
        """Run the proxy again with other settings (batch size, window, threads)."""
        self.proxy.stop()
        sources = Path(self.image).parent
        config = lab.proxy_config(self.work, self.certs, sources=sources, **settings)
        self.proxy = lab.AgentProcess("proxy_agent", config, self.work / "proxy.log")
        self.proxy.start()

    def stop(self) -> None:
        self.proxy.stop()
        self.target.stop()

    def target_events(self, event: str) -> list[dict[str, object]]:
        return [e for e in self.target.events() if e.get("event") == event]


@pytest.fixture
async def lab_env(
    tmp_path: Path, lab_certs: lab.LabCerts, base_image: tuple[Path, dict[str, int]]
) -> AsyncIterator[Lab]:
    sources = tmp_path / "sources"
    sources.mkdir()
    image = sources / "vm1-disk0.raw"
    subprocess.run(["cp", "--sparse=always", str(base_image[0]), str(image)], check=True)
    target = lab.AgentProcess(
        "target_agent", lab.target_config(tmp_path, lab_certs, level="debug"), tmp_path / "target.log"
    )
    proxy = lab.AgentProcess(
        "proxy_agent", lab.proxy_config(tmp_path, lab_certs, sources=sources), tmp_path / "proxy.log"
    )
    env = Lab(tmp_path, lab_certs, image, base_image[1], target, proxy)
    try:
        target.start()
        proxy.start()
        yield env
    finally:
        for c in env.clients:
            await c.close()
        env.stop()  # the agents running now: restart_proxy replaces env.proxy


@pytest.fixture
def data_bytes(base_image: tuple[Path, dict[str, int]]) -> Iterator[int]:
    counts = base_image[1]
    yield (counts["text"] + counts["random"]) * MiB


@pytest.fixture
def ctl(tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[ControllerEnv]:
    need_tool("mkntfs")
    env = make_env(tmp_path, lab_certs, sample_vm=True)
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture
def ctl_raw(tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[ControllerEnv]:
    """Small raw disks only: for tests that run many sessions."""
    env = make_env(tmp_path, lab_certs, disk_mib=8)
    try:
        yield env
    finally:
        env.stop()


@pytest.fixture(params=BACKENDS)
def ctl_db(request: pytest.FixtureRequest, tmp_path: Path, lab_certs: lab.LabCerts) -> Iterator[ControllerEnv]:
    """As ctl_raw, on each database backend."""
    base = os.environ.get("VMREPL_TEST_DATABASE_URL", "")
    url, name = create_pg_database(base) if request.param == "postgresql" else ("", "")
    env = make_env(tmp_path, lab_certs, disk_mib=8, database_url=url)
    try:
        yield env
    finally:
        env.stop()
        if name:
            drop_pg_database(base, name)
