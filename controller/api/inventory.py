"""ControllerService, inventory: credentials, hosts, proxies and targets."""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.api import resources as res
from controller.api.base import BY_NAME, ApiBase
from controller.db.models import (
    Credential,
    Host,
    Job,
    Proxy,
    Target,
)
from controller.engine.providers import check_host
from vmrepl.rpc import handle_errors
from vmrepl.v1 import controller_pb2 as api


class InventoryApi(ApiBase):
    @handle_errors
    async def CreateCredential(self, request: api.CreateCredentialRequest, context: Any) -> api.Credential:
        res.check_id("credential_id", request.credential_id)
        res.check_username("credential.username", request.credential.username)
        res.check_secret("secret", request.secret)

        async def fill(_db: AsyncSession, row: Credential) -> None:
            row.username, row.secret = request.credential.username, self.secrets.seal(request.secret)

        return res.credential_msg(
            await self._create(Credential, "credential_id", request.credential_id, "credentials", fill)
        )

    @handle_errors
    async def GetCredential(self, request: api.GetCredentialRequest, context: Any) -> api.Credential:
        async with self.reads() as db:
            return res.credential_msg(await res.by_name(db, Credential, "name", request.name, "credentials"))

    @handle_errors
    async def ListCredentials(self, request: api.ListCredentialsRequest, context: Any) -> api.ListCredentialsResponse:
        async def convert(_db: AsyncSession, rows: list[Credential]) -> list[api.Credential]:
            return [res.credential_msg(r) for r in rows]

        out, token = await self._list(request, BY_NAME[Credential], convert)
        return api.ListCredentialsResponse(credentials=out, next_page_token=token)

    @handle_errors
    async def UpdateCredential(self, request: api.UpdateCredentialRequest, context: Any) -> api.Credential:
        paths = res.mask_paths("update_mask", request.update_mask.paths, ("username", "secret"))
        async with self.journal.write() as db:
            row = await res.by_name(db, Credential, "credential.name", request.credential.name, "credentials")
            if "username" in paths:
                row.username = res.check_username("credential.username", request.credential.username)
            if "secret" in paths:
                row.secret = self.secrets.seal(res.check_secret("secret", request.secret))
        return res.credential_msg(row)

    @handle_errors
    async def DeleteCredential(self, request: api.DeleteCredentialRequest, context: Any) -> empty_pb2.Empty:
        async def users(db: AsyncSession, row: Credential) -> list[str]:
            hosts = [f"hosts/{h}" for h in await db.scalars(select(Host.name).where(Host.credential_id == row.id))]
            # A job's guest processing names its credential inside the job's JSON settings: read in Python.
            settings = (await db.execute(select(Job.name, Job.guest_processing))).all()
            jobs = [f"jobs/{j}" for j, g in settings if g.get("credential") == f"credentials/{row.name}"]
            return hosts + jobs

        await self._delete(Credential, "name", request.name, "credentials", in_use=users)
        return empty_pb2.Empty()

    # ---- hosts ----------------------------------------------------------------------------------------

    @handle_errors
    async def CreateHost(self, request: api.CreateHostRequest, context: Any) -> api.Host:
        async def fill(db: AsyncSession, row: Host) -> None:
            await res.apply_host(db, request.host, row, res.HOST_FIELDS)
            await check_host(row)

        row = await self._create(Host, "host_id", request.host_id, "hosts", fill)
        async with self.reads() as db:
            return await res.host_msg(db, row)

    @handle_errors
    async def GetHost(self, request: api.GetHostRequest, context: Any) -> api.Host:
        async with self.reads() as db:
            return await res.host_msg(db, await res.by_name(db, Host, "name", request.name, "hosts"))

    @handle_errors
    async def ListHosts(self, request: api.ListHostsRequest, context: Any) -> api.ListHostsResponse:
        async def convert(db: AsyncSession, rows: list[Host]) -> list[api.Host]:
            return [await res.host_msg(db, r) for r in rows]

        out, token = await self._list(request, BY_NAME[Host], convert)
        return api.ListHostsResponse(hosts=out, next_page_token=token)

    @handle_errors
    async def UpdateHost(self, request: api.UpdateHostRequest, context: Any) -> api.Host:
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.HOST_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Host, "host.name", request.host.name, "hosts")
            await res.apply_host(db, request.host, row, paths)
            await check_host(row)
        async with self.reads() as db:
            return await res.host_msg(db, row)

    @handle_errors
    async def DeleteHost(self, request: api.DeleteHostRequest, context: Any) -> empty_pb2.Empty:
        async def users(db: AsyncSession, row: Host) -> list[str]:
            uses = (Job.host_id == row.id) | (Job.failover_host_id == row.id)  # a failover host too
            return [f"jobs/{j}" for j in await db.scalars(select(Job.name).where(uses))]

        await self._delete(Host, "name", request.name, "hosts", in_use=users)
        return empty_pb2.Empty()

    @handle_errors
    async def ListHostVms(self, request: api.ListHostVmsRequest, context: Any) -> api.ListHostVmsResponse:
        async with self.reads() as db:
            host = await res.by_name(db, Host, "host", request.host, "hosts")
            provider = await self.providers.for_host(db, host)
        details = dict(await provider.describe_host())
        await provider.check_host()
        vms = await provider.list_vms()
        return api.ListHostVmsResponse(
            vms=[res.host_vm_msg(vm) for vm in sorted(vms, key=lambda v: v.name)], host_details=details
        )

    # ---- proxies --------------------------------------------------------------------------------------

    @handle_errors
    async def CreateProxy(self, request: api.CreateProxyRequest, context: Any) -> api.Proxy:
        async def fill(db: AsyncSession, row: Proxy) -> None:
            await res.apply_agent(db, "proxy", request.proxy, row, res.PROXY_FIELDS)

        row = await self._create(Proxy, "proxy_id", request.proxy_id, "proxies", fill)
        async with self.reads() as db:
            return await res.proxy_msg(db, row)

    @handle_errors
    async def GetProxy(self, request: api.GetProxyRequest, context: Any) -> api.Proxy:
        async with self.reads() as db:
            return await res.proxy_msg(db, await res.by_name(db, Proxy, "name", request.name, "proxies"))

    @handle_errors
    async def ListProxies(self, request: api.ListProxiesRequest, context: Any) -> api.ListProxiesResponse:
        async def convert(db: AsyncSession, rows: list[Proxy]) -> list[api.Proxy]:
            return [await res.proxy_msg(db, r) for r in rows]

        out, token = await self._list(request, BY_NAME[Proxy], convert)
        return api.ListProxiesResponse(proxies=out, next_page_token=token)

    @handle_errors
    async def UpdateProxy(self, request: api.UpdateProxyRequest, context: Any) -> api.Proxy:
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.PROXY_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Proxy, "proxy.name", request.proxy.name, "proxies")
            await res.apply_agent(db, "proxy", request.proxy, row, paths)
        async with self.reads() as db:
            return await res.proxy_msg(db, row)

    @handle_errors
    async def DeleteProxy(self, request: api.DeleteProxyRequest, context: Any) -> empty_pb2.Empty:
        await self._delete(Proxy, "name", request.name, "proxies")
        return empty_pb2.Empty()

    # ---- targets --------------------------------------------------------------------------------------

    @handle_errors
    async def CreateTarget(self, request: api.CreateTargetRequest, context: Any) -> api.Target:
        async def fill(db: AsyncSession, row: Target) -> None:
            await res.apply_agent(db, "target", request.target, row, res.TARGET_FIELDS)

        return res.target_msg(await self._create(Target, "target_id", request.target_id, "targets", fill))

    @handle_errors
    async def GetTarget(self, request: api.GetTargetRequest, context: Any) -> api.Target:
        async with self.reads() as db:
            return res.target_msg(await res.by_name(db, Target, "name", request.name, "targets"))

    @handle_errors
    async def ListTargets(self, request: api.ListTargetsRequest, context: Any) -> api.ListTargetsResponse:
        async def convert(_db: AsyncSession, rows: list[Target]) -> list[api.Target]:
            return [res.target_msg(r) for r in rows]

        out, token = await self._list(request, BY_NAME[Target], convert)
        return api.ListTargetsResponse(targets=out, next_page_token=token)

    @handle_errors
    async def UpdateTarget(self, request: api.UpdateTargetRequest, context: Any) -> api.Target:
        paths = res.mask_paths("update_mask", request.update_mask.paths, res.TARGET_FIELDS)
        async with self.journal.write() as db:
            row = await res.by_name(db, Target, "target.name", request.target.name, "targets")
            await res.apply_agent(db, "target", request.target, row, paths)
        return res.target_msg(row)

    @handle_errors
    async def DeleteTarget(self, request: api.DeleteTargetRequest, context: Any) -> empty_pb2.Empty:
        async def users(db: AsyncSession, row: Target) -> list[str]:
            uses = (Job.target_id == row.id) | (Job.failback_target_id == row.id)  # a failback target too
            return [f"jobs/{j}" for j in await db.scalars(select(Job.name).where(uses))]

        await self._delete(Target, "name", request.name, "targets", in_use=users)
        return empty_pb2.Empty()
