"""A Hyper-V host stand-in ready to use: the WS-Man server (tests/support/wsman) answering the package's
scripts from a `HyperVHost` model (handlers.py).

    with hyperv_lab(tmp_path / "host", certs=lab_certs.directory) as lab:
        lab.host.add_vm("web01", disks=[("C:\\\\Hyper-V\\\\Virtual Hard Disks\\\\web01.vhdx", 64 * MiB)])
        Protocol(endpoint=lab.url, transport="basic", username=lab.username, password=lab.password,
                 ca_trust_path=str(lab.ca_bundle), ...)

`auth="basic"`: HTTPS with the lab CA's `target` certificate (issued for localhost) and Basic auth;
`auth="ntlm"`: plain HTTP with NTLM and message encryption (`ca_bundle` is None). `lab.drives` is the local
folder standing for the host's drives: `C:\\...` is `lab.drives / "C" / ...`, what an off-host proxy's path
mapping points at.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from controller import lab as controller_lab
from tests.support.hyperv import handlers
from tests.support.hyperv.model import HyperVHost
from tests.support.wsman import ScriptRegistry, WsmanServer

USERNAME = "HV01\\vmrepl-replicator"
PASSWORD = "stand-in lab password, not a secret"


@dataclass(frozen=True)
class HyperVLab:
    url: str
    port: int
    username: str
    password: str
    ca_bundle: Path | None  # the CA that signed the HTTPS certificate; None for NTLM over HTTP
    host: HyperVHost
    drives: Path
    server: WsmanServer
    auth: Literal["basic", "ntlm"]


@contextmanager
def hyperv_lab(
    root: Path,
    *,
    certs: Path | None = None,
    auth: Literal["basic", "ntlm"] = "basic",
    username: str = USERNAME,
    password: str = PASSWORD,
    host: HyperVHost | None = None,
    stream_chunk: int = 4096,
    streams_per_receive: int = 8,
    **host_settings: Any,
) -> Iterator[HyperVLab]:
    """Start the stand-in for the model at `root` (or `host`); `certs` is the lab certificate folder (made
    there if empty), required for Basic over HTTPS."""
    model = host or HyperVHost(root, **host_settings)
    registry = ScriptRegistry()
    handlers.register(registry, model)
    tls: dict[str, Any] = {}
    ca = None
    if auth == "basic":
        if certs is None:
            raise ValueError("Basic auth is served over HTTPS: pass the lab certificate folder")
        lab_certs = controller_lab.LabCerts.create(certs)
        tls = {"certfile": lab_certs.directory / "target.pem", "keyfile": lab_certs.directory / "target.key"}
        ca = lab_certs.directory / "ca.pem"
    with WsmanServer(
        auth=auth,
        username=username,
        password=password,
        registry=registry,
        stream_chunk=stream_chunk,
        streams_per_receive=streams_per_receive,
        **tls,
    ) as server:
        port = int(server.url.rsplit(":", 1)[1].split("/", 1)[0])
        yield HyperVLab(server.url, port, username, password, ca, model, model.drives, server, auth)
