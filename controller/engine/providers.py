"""The provider behind each configured host."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from controller.db.models import Credential, Host
from controller.db.secrets import SecretBox
from vmrepl.errors import FailedPrecondition
from vmrepl.providers.base import Provider
from vmrepl.providers.filehost import FileHostProvider
from vmrepl.providers.hyperv.provider import CHECKPOINT_PREFIX, HyperVProvider
from vmrepl.providers.hyperv.winrm import HostClient, WinRmSettings

PROVIDERS = ("file", "hyperv")


class Providers:
    """Builds the provider of a host: a file host is a folder the controller and the proxies both see under
    the same path; a Hyper-V host is reached over WinRM with the host's credential, unsealed here and handed
    to the client alone (never logged, never in a reply)."""

    def __init__(self, secrets: SecretBox | None, *, installation: str = "") -> None:
        self._secrets = secrets
        # Hyper-V checkpoints are named `vmrepl-<installation>-...`: this installation's leftovers are removed,
        # another's (a second controller replicating the same VM) are reported and left alone.
        self._checkpoint_prefix = f"{CHECKPOINT_PREFIX}{installation}-" if installation else CHECKPOINT_PREFIX

    async def for_host(self, db: AsyncSession, host: Host) -> Provider:
        if host.provider == "file":
            return FileHostProvider(Path(host.address), host=host.name)
        if host.provider == "hyperv":
            return await self._hyperv(db, host)
        raise FailedPrecondition(f"host {host.name}: provider {host.provider!r} is not available in this version")

    async def _hyperv(self, db: AsyncSession, host: Host) -> Provider:
        cred = await db.get(Credential, host.credential_id) if host.credential_id else None
        if cred is None:
            raise FailedPrecondition(
                f"host {host.name}: a Hyper-V host needs a credential "
                f"(vmrepl infra host-update {host.name} --credential C)"
            )
        if self._secrets is None:
            raise FailedPrecondition("this controller has no secret keys to unseal host credentials with")
        settings = winrm_settings(host, cred.username, SecretStr(self._secrets.open(cred.secret)))
        return HyperVProvider(runner=HostClient(settings), host=host.name, checkpoint_prefix=self._checkpoint_prefix)


def winrm_settings(host: Host, username: str, password: SecretStr) -> WinRmSettings:
    """The host's stored WinRM settings (controller.proto WinRmSettings; {} = the defaults), validated by
    the client's own rules: the API refuses what a session could not use."""
    w = host.winrm or {}
    try:
        return WinRmSettings(
            address=host.address,
            username=username,
            password=password,
            scheme=str(w.get("scheme", "")),  # type: ignore[arg-type]  # validated by WinRmSettings
            port=int(w.get("port", 0)),
            auth=str(w.get("auth", "")),  # type: ignore[arg-type]
            ca_bundle=str(w.get("ca_bundle", "")),
            script_timeout_seconds=int(w.get("script_timeout_seconds", 0)),
        )
    except (TypeError, ValueError) as e:
        raise FailedPrecondition(f"host {host.name}: its stored WinRM settings are damaged: {e}") from e


async def check_host(host: Host) -> None:
    """Refuse a host sessions could not replicate correctly: a file host where two VM folders carry one id
    (checkpoints and replicas are keyed by it). A folder not there yet is not refused here."""
    if host.provider == "file" and await asyncio.to_thread(Path(host.address).is_dir):
        await asyncio.to_thread(FileHostProvider(Path(host.address), host=host.name).check_unique_ids)
