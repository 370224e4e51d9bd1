"""The provider behind each configured host."""

from __future__ import annotations

import asyncio
from pathlib import Path

from controller.db.models import Host
from vmrepl.errors import FailedPrecondition
from vmrepl.providers.base import Provider
from vmrepl.providers.filehost import FileHostProvider

PROVIDERS = ("file", "hyperv")


def provider_for(host: Host) -> Provider:
    """A provider for the host. File hosts are folders the controller and the proxies both see under the
    same path; Hyper-V hosts are reached over WinRM with the host's credential (the Hyper-V work)."""
    if host.provider == "file":
        return FileHostProvider(Path(host.address), host=host.name)
    raise FailedPrecondition(f"host {host.name}: provider {host.provider!r} is not available in this version")


async def check_host(host: Host) -> None:
    """Refuse a host sessions could not replicate correctly: a file host where two VM folders carry one id
    (checkpoints and replicas are keyed by it). A folder not there yet is not refused here."""
    if host.provider == "file" and await asyncio.to_thread(Path(host.address).is_dir):
        await asyncio.to_thread(FileHostProvider(Path(host.address), host=host.name).check_unique_ids)
