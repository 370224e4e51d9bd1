"""Hosts: their messages, checks and changes (a file host's folder is never a system folder)."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from controller.api.resources.common import by_name, check_printable, timestamp
from controller.db.models import Credential, Host
from controller.engine.providers import PROVIDERS, winrm_settings
from vmrepl.errors import InvalidArgument
from vmrepl.providers.base import VmInfo
from vmrepl.v1 import controller_pb2 as api

HOST_FIELDS = ("provider", "address", "credential", "winrm")


async def host_msg(db: AsyncSession, row: Host) -> api.Host:
    cred = await db.get(Credential, row.credential_id) if row.credential_id else None
    return api.Host(
        name=f"hosts/{row.name}",
        provider=row.provider,
        address=row.address,
        credential=f"credentials/{cred.name}" if cred else "",
        create_time=timestamp(row.created_at),
        winrm=api.WinRmSettings(**row.winrm) if row.provider == "hyperv" and row.winrm else None,
    )


async def apply_host(db: AsyncSession, msg: api.Host, row: Host, paths: Iterable[str]) -> None:
    for path in paths:
        if path == "provider":
            if msg.provider not in PROVIDERS:
                raise InvalidArgument("host.provider", f"must be one of {', '.join(PROVIDERS)}")
            row.provider = msg.provider
        elif path == "address":
            if not msg.address or len(msg.address) > 1024:
                raise InvalidArgument("host.address", "is required, up to 1024 characters")
            row.address = check_printable("host.address", msg.address)
        elif path == "credential":
            cred = (
                await by_name(db, Credential, "host.credential", msg.credential, "credentials")
                if msg.credential
                else None
            )
            row.credential_id = cred.id if cred else None
        elif path == "winrm":
            w = msg.winrm
            row.winrm = {
                k: v
                for k, v in (
                    ("scheme", w.scheme),
                    ("port", w.port),
                    ("auth", w.auth),
                    ("ca_bundle", w.ca_bundle),
                    ("script_timeout_seconds", w.script_timeout_seconds),
                )
                if v
            }
    if row.provider == "file":
        await asyncio.to_thread(check_host_folder, "host.address", row.address)
    elif row.provider == "hyperv":
        await _check_hyperv(db, row)


async def _check_hyperv(db: AsyncSession, row: Host) -> None:
    """A Hyper-V host: a credential to log on with, and WinRM settings the client accepts (the client's own
    rules, so what is stored is what a session can use); the CA bundle is a file the controller can read."""
    cred = await db.get(Credential, row.credential_id) if row.credential_id else None
    if cred is None:
        raise InvalidArgument("host.credential", "a Hyper-V host needs the credential WinRM logs on with")
    try:
        settings = winrm_settings(row, cred.username, SecretStr("unused"))
    except InvalidArgument as e:
        # The client names its fields "winrm.<setting>" or "address": under the API's Host they are "host.<that>",
        # except the user name, which comes from the credential.
        field = "host.credential" if e.field == "winrm.username" else f"host.{e.field}"
        raise InvalidArgument(field, e.description) from e
    if settings.ca_bundle:
        await asyncio.to_thread(check_ca_bundle, "host.winrm.ca_bundle", settings.ca_bundle)


def check_ca_bundle(field: str, path: str) -> str:
    """A WinRM CA bundle: a file of PEM CA certificates the controller can load, checked when the host is saved
    rather than at its first session. The error names the path and OpenSSL's reason, never the file's text."""
    if not os.path.isabs(path):
        # Relative to the controller's working folder, not the operator's: refused rather than guessed.
        raise InvalidArgument(field, f"{path!r}: give the absolute path of the PEM file on the controller")
    if not os.path.isfile(path):
        raise InvalidArgument(field, f"{path} is not a file the controller can read")
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as e:
        raise InvalidArgument(field, f"{path} holds no PEM CA certificate ({e.reason or 'unreadable'})") from None
    except OSError as e:
        raise InvalidArgument(field, f"{path} is not a PEM file the controller can read ({e.strerror})") from None
    return path


# A file host's folder holds VM folders; the controller reads it and writes its state under it, and the
# proxies read it: never the system's own folders. SYSTEM_TREES are refused with everything inside them;
# SYSTEM_FOLDERS themselves only (a host folder may lie inside /var, /srv or /tmp).
SYSTEM_TREES = frozenset(
    ["/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin", "/sys", "/usr"]
)
SYSTEM_FOLDERS = frozenset(["/home", "/media", "/mnt", "/opt", "/root", "/srv", "/tmp", "/var"])


def check_host_folder(field: str, address: str) -> str:
    """A file host's address: an absolute path to an existing folder the controller sees (the proxies see
    it under the same path), not the file system's root nor a system folder. Symlinks are followed
    before the checks."""
    check_printable(field, address)
    if not os.path.isabs(address):
        raise InvalidArgument(field, f"{address!r}: a file host's address is an absolute folder path")
    real = Path(os.path.realpath(address))
    if not real.is_dir():
        raise InvalidArgument(field, f"{address!r} is not a folder the controller can see")
    if real == Path(real.anchor):
        raise InvalidArgument(field, f"{address!r} is the root of the file system: give the folder of the VM folders")
    if str(real) in SYSTEM_FOLDERS:
        raise InvalidArgument(field, f"{address!r} is a system folder: give the folder of the VM folders")
    for tree in sorted(SYSTEM_TREES):
        if real == Path(tree) or Path(tree) in real.parents:
            raise InvalidArgument(field, f"{address!r} lies in the system folder {tree}")
    return address


def host_vm_msg(vm: VmInfo) -> api.HostVm:
    return api.HostVm(
        id=vm.vm_id,
        name=vm.name,
        state=vm.state,
        disks=[
            api.HostVmDisk(id=d.disk_id, path=d.locator, format=d.format.to_proto(), size_bytes=d.size)
            for d in vm.disks
        ],
        details=dict(vm.details),
    )
