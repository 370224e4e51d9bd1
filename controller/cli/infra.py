"""`vmrepl infra`: Credentials, hosts, proxies and targets."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from controller.cli.common import JsonOpt, as_json, call, conn, err, mib, out, table
from vmrepl.domain import DEFAULT_SLOTS
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

infra = typer.Typer(help="Credentials, hosts, proxies and targets.", no_args_is_help=True)


@infra.command("credential-add")
def credential_add(
    cred_id: str,
    username: Annotated[str, typer.Option(help="user name")],
    secret_env: Annotated[str, typer.Option(help="read the secret from this environment variable (else prompt)")] = "",
) -> None:
    """Store a credential; the secret is encrypted by the controller and never shown again."""
    secret = os.environ.get(secret_env, "") if secret_env else typer.prompt("secret", hide_input=True)
    req = api.CreateCredentialRequest(
        credential_id=cred_id, credential=api.Credential(username=username), secret=secret
    )
    c = call(conn.stub().CreateCredential, req)
    out.print(f"created {c.name}")


@infra.command("host-add", help="Add a hypervisor host.")
def host_add(
    host_id: str,
    address: Annotated[str, typer.Option(help="folder (file) or host name (hyperv)")],
    provider: Annotated[str, typer.Option(help="file or hyperv")] = "file",
    credential: Annotated[str, typer.Option(help="credential id (hyperv: the WinRM account)")] = "",
    winrm_scheme: Annotated[str, typer.Option(help="hyperv: https (default) or http (message-encrypted)")] = "",
    winrm_port: Annotated[int, typer.Option(help="hyperv: WinRM port (0: 5986 https, 5985 http)")] = 0,
    winrm_auth: Annotated[str, typer.Option(help="hyperv: ntlm (default), kerberos, credssp or basic")] = "",
    winrm_ca_bundle: Annotated[str, typer.Option(help="hyperv: PEM file of the CAs of the host's certificate")] = "",
) -> None:
    host = api.Host(provider=provider, address=address, credential=f"credentials/{credential}" if credential else "")
    if provider != "hyperv" and (winrm_scheme or winrm_port or winrm_auth or winrm_ca_bundle):
        # A forgotten --provider made a file host and dropped the WinRM settings without a word.
        raise typer.BadParameter("the --winrm-* options are for a Hyper-V host: add --provider hyperv")
    if provider == "hyperv":
        host.winrm.CopyFrom(
            api.WinRmSettings(scheme=winrm_scheme, port=winrm_port, auth=winrm_auth, ca_bundle=winrm_ca_bundle)
        )
    h = call(conn.stub().CreateHost, api.CreateHostRequest(host_id=host_id, host=host))
    out.print(f"created {h.name}")


@infra.command("vms", help="The VMs a host has now, as its hypervisor reports them.")
def host_vms(host_id: str, as_json_: JsonOpt = False) -> None:
    reply = call(conn.stub().ListHostVms, api.ListHostVmsRequest(host=f"hosts/{host_id}"))
    if as_json_:
        as_json(reply)
        return
    if reply.host_details:
        table(f"hosts/{host_id}", ["fact", "value"], [[k, v] for k, v in sorted(reply.host_details.items())])
    rows: list[list[object]] = []
    for vm in reply.vms:
        facts = ", ".join(f"{k} {v}" for k, v in sorted(vm.details.items()))
        rows.append([vm.name, vm.id, vm.state, len(vm.disks), mib(sum(d.size_bytes for d in vm.disks)), facts])
    table(f"VMs of hosts/{host_id}", ["name", "id", "state", "disks", "size", "details"], rows)
    for vm in reply.vms:
        table(
            f"{vm.name}: disks",
            ["id", "format", "size", "path"],
            [[d.id, _format(d.format), mib(d.size_bytes), d.path] for d in vm.disks],
        )


def _format(value: common_pb2.DiskFormat.ValueType) -> str:
    name: str = common_pb2.DiskFormat.Name(value)
    return name.removeprefix("DISK_FORMAT_").lower()


@infra.command("proxy-add", help="Add a source proxy agent.")
def proxy_add(
    proxy_id: str,
    address: Annotated[str, typer.Option(help="host:port of the proxy agent")],
    max_tasks: Annotated[int, typer.Option(help="disk tasks at once")] = DEFAULT_SLOTS,
    host: Annotated[list[str] | None, typer.Option(help="host id it reads directly (repeat)")] = None,
    tls_server_name: Annotated[str, typer.Option(help="name in its certificate, if not the address's")] = "",
) -> None:
    proxy = api.Proxy(
        address=address,
        max_tasks=max_tasks,
        hosts=[f"hosts/{h}" for h in host or []],
        tls_server_name=tls_server_name,
    )
    p = call(conn.stub().CreateProxy, api.CreateProxyRequest(proxy_id=proxy_id, proxy=proxy))
    out.print(f"created {p.name}")


@infra.command("target-add", help="Add a target agent.")
def target_add(
    target_id: Annotated[str, typer.Argument(help="the target agent's configured name")],
    address: Annotated[str, typer.Option(help="host:port of the target agent")],
    max_tasks: Annotated[int, typer.Option(help="disk tasks at once")] = DEFAULT_SLOTS,
    tls_server_name: Annotated[str, typer.Option(help="name in its certificate, if not the address's")] = "",
) -> None:
    target = api.Target(address=address, max_tasks=max_tasks, tls_server_name=tls_server_name)
    t = call(conn.stub().CreateTarget, api.CreateTargetRequest(target_id=target_id, target=target))
    out.print(f"created {t.name}")


@infra.command("list")
def infra_list(as_json_: JsonOpt = False) -> None:
    """Credentials (never their secrets), hosts, proxies and targets."""
    s = conn.stub()
    creds = call(s.ListCredentials, api.ListCredentialsRequest())
    hosts = call(s.ListHosts, api.ListHostsRequest())
    proxies = call(s.ListProxies, api.ListProxiesRequest())
    targets = call(s.ListTargets, api.ListTargetsRequest())
    if as_json_:
        for m in (creds, hosts, proxies, targets):
            as_json(m)
        return
    table("credentials", ["name", "username"], [[c.name, c.username] for c in creds.credentials])
    table(
        "hosts",
        ["name", "provider", "address", "credential"],
        [[h.name, h.provider, h.address, h.credential] for h in hosts.hosts],
    )
    table(
        "proxies",
        ["name", "address", "max tasks", "hosts"],
        [[p.name, p.address, p.max_tasks, ", ".join(p.hosts)] for p in proxies.proxies],
    )
    table("targets", ["name", "address", "max tasks"], [[t.name, t.address, t.max_tasks] for t in targets.targets])


@infra.command("delete", help="Delete a credential, host, proxy or target (refused while in use).")
def infra_delete(
    name: Annotated[str, typer.Argument(help="credentials/ID, hosts/ID, proxies/ID or targets/ID")],
) -> None:
    s = conn.stub()
    kinds = {
        "credentials": (s.DeleteCredential, api.DeleteCredentialRequest),
        "hosts": (s.DeleteHost, api.DeleteHostRequest),
        "proxies": (s.DeleteProxy, api.DeleteProxyRequest),
        "targets": (s.DeleteTarget, api.DeleteTargetRequest),
    }
    kind = name.split("/", 1)[0]
    if kind not in kinds:
        err.print(f"[red]error[/red]: {name!r} names no credential, host, proxy or target")
        raise typer.Exit(2)
    fn, req = kinds[kind]
    call(fn, req(name=name))
    out.print(f"deleted {name}")
