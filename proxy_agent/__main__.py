"""`vmrepl-proxy`: the source proxy daemon (foreground; systemd or a service host runs it)."""

from __future__ import annotations

from proxy_agent.config import ProxySettings
from proxy_agent.servicer import ROLES, ProxyAgentServicer
from vmrepl.daemon import run_daemon, serve_services
from vmrepl.metrics import serve_metrics
from vmrepl.rpc import Service
from vmrepl.v1 import proxy_pb2


async def serve(settings: ProxySettings) -> None:
    serve_metrics(settings.metrics_listen, settings.tls, plain_http=settings.metrics_plain_http)
    servicer = ProxyAgentServicer(settings)
    await serve_services(
        listen=settings.listen,
        tls=settings.tls,
        services=[Service(proxy_pb2.DESCRIPTOR.services_by_name["ProxyAgent"], servicer, roles=ROLES)],
        max_message_bytes=4 << 20,
        on_stop=servicer.stop_all,
        agent="proxy",
    )


def main(argv: list[str] | None = None) -> None:
    run_daemon(
        prog="vmrepl-proxy",
        description="vmrepl source proxy agent",
        settings_cls=ProxySettings,
        serve=serve,
        argv=argv,
    )


if __name__ == "__main__":
    main()
