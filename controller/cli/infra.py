"""`vmrepl infra`: Credentials, hosts, proxies and targets."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from google.protobuf import field_mask_pb2

from controller.cli.common import JsonOpt, as_json, call, conn, err, mib, out, table
from vmrepl.domain import DEFAULT_SLOTS
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

infra = typer.Typer(help="Credentials, hosts, proxies and targets.", no_args_is_help=True)


def _secret(secret_env: str) -> str:
    """The secret from the named environment variable, else prompted (hidden). A variable that is not set
    is a usage error: sent empty, the API's "secret: is required" did not say that the export was missing."""
    if not secret_env:
        return str(typer.prompt("secret", hide_input=True))
    secret = os.environ.get(secret_env, "")
    if not secret:
        raise typer.BadParameter(
            f"the environment variable {secret_env} is not set or empty", param_hint="--secret-env"
        )
    return secret


@infra.command("credential-add")
def credential_add(
    cred_id: str,
    username: Annotated[str, typer.Option(help="user name")],
    secret_env: Annotated[str, typer.Option(help="read the secret from this environment variable (else prompt)")] = "",
) -> None:
    """Store a credential; the secret is encrypted by the controller and never shown again."""
    secret = _secret(secret_env)
    req = api.CreateCredentialRequest(
        credential_id=cred_id, credential=api.Credential(username=username), secret=secret
    )
    c = call(conn.stub().CreateCredential, req)
    out.print(f"created {c.name}")


@infra.command("credential-update")
def credential_update(
    cred_id: str,
    username: Annotated[str, typer.Option(help="a new user name")] = "",
    secret_env: Annotated[str, typer.Option(help="a new secret from this environment variable")] = "",
    new_secret: Annotated[bool, typer.Option("--new-secret", help="prompt (hidden) for a new secret")] = False,
) -> None:
    """Change a credential's user name or secret (a rotated password); the hosts using it use the new one."""
    if not (username or secret_env or new_secret):
        raise typer.BadParameter("give --username, --secret-env VAR or --new-secret")
    paths = ["username"] if username else []
    secret = ""
    if secret_env or new_secret:
        secret, paths = _secret(secret_env), [*paths, "secret"]
    req = api.UpdateCredentialRequest(
        credential=api.Credential(name=f"credentials/{cred_id}", username=username),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
        secret=secret,
    )
    c = call(conn.stub().UpdateCredential, req)
    out.print(f"updated {c.name}")


_SCHEME = typer.Option(help="hyperv: https (default) or http (message-encrypted)")
_PORT = typer.Option(help="hyperv: WinRM port (0: 5986 https, 5985 http)")
_AUTH = typer.Option(help="hyperv: ntlm (default), kerberos, credssp or basic")
_CA = typer.Option(help="hyperv: PEM file of the CAs of the host's certificate, an absolute path on the controller")


@infra.command("host-add", help="Add a hypervisor host (nothing connects to it yet: `infra vms ID` does).")
def host_add(
    host_id: str,
    address: Annotated[str, typer.Option(help="folder (file) or host name (hyperv)")],
    provider: Annotated[str, typer.Option(help="file or hyperv")] = "file",
    credential: Annotated[str, typer.Option(help="credential id (hyperv: the WinRM account)")] = "",
    winrm_scheme: Annotated[str, _SCHEME] = "",
    winrm_port: Annotated[int, _PORT] = 0,
    winrm_auth: Annotated[str, _AUTH] = "",
    winrm_ca_bundle: Annotated[str, _CA] = "",
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


@infra.command("host-update", help="Change a host's address, credential or WinRM settings (the others are kept).")
def host_update(
    host_id: str,
    address: Annotated[str, typer.Option(help="folder (file) or host name (hyperv)")] = "",
    credential: Annotated[str, typer.Option(help="credential id (hyperv: the WinRM account)")] = "",
    winrm_scheme: Annotated[str | None, _SCHEME] = None,
    winrm_port: Annotated[int | None, _PORT] = None,
    winrm_auth: Annotated[str | None, _AUTH] = None,
    winrm_ca_bundle: Annotated[str | None, typer.Option(help='as host-add; "" for the system\'s trust store')] = None,
) -> None:
    """Only the options given change; a --winrm-* option given "" (or port 0) returns it to its default. The
    API replaces the WinRM settings as a whole, so the host's current ones are read and the given ones merged."""
    s = conn.stub()
    host = call(s.GetHost, api.GetHostRequest(name=f"hosts/{host_id}"))
    paths = [p for p, v in (("address", address), ("credential", credential)) if v]
    host.address = address or host.address
    host.credential = f"credentials/{credential}" if credential else host.credential
    winrm = {"scheme": winrm_scheme, "port": winrm_port, "auth": winrm_auth, "ca_bundle": winrm_ca_bundle}
    given = {k: v for k, v in winrm.items() if v is not None}
    if given and host.provider != "hyperv":
        raise typer.BadParameter(f"hosts/{host_id} is a {host.provider} host: the --winrm-* options are for hyperv")
    if given:
        for k, v in given.items():
            setattr(host.winrm, k, v)
        paths.append("winrm")
    if not paths:
        raise typer.BadParameter("give at least one option to change (--help lists them)")
    mask = field_mask_pb2.FieldMask(paths=paths)
    h = call(s.UpdateHost, api.UpdateHostRequest(host=host, update_mask=mask))
    out.print(f"updated {h.name}")


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
        ["name", "provider", "address", "credential", "winrm"],
        [[h.name, h.provider, h.address, h.credential, _winrm(h)] for h in hosts.hosts],
    )
    table(
        "proxies",
        ["name", "address", "max tasks", "hosts"],
        [[p.name, p.address, p.max_tasks, ", ".join(p.hosts)] for p in proxies.proxies],
    )
    table("targets", ["name", "address", "max tasks"], [[t.name, t.address, t.max_tasks] for t in targets.targets])


def _winrm(host: api.Host) -> str:
    """A Hyper-V host's WinRM settings with the defaults filled in, so that what host-add or host-update
    stored can be checked without --json: `basic over https:15986, CA /etc/vmrepl/ca.pem`."""
    if host.provider != "hyperv":
        return ""
    w = host.winrm
    scheme = w.scheme or "https"
    port = w.port or (5985 if scheme == "http" else 5986)
    text = f"{w.auth or 'ntlm'} over {scheme}:{port}"
    if scheme == "https":
        text += f", CA {w.ca_bundle}" if w.ca_bundle else ", the system's CAs"
    return text


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
