"""`vmrepl-proxy`: the source proxy daemon (foreground; systemd or a Windows service runs it)."""

from __future__ import annotations

from protos.vmrepl.v1 import proxy_pb2
from proxy_agent.config import ProxySettings
from proxy_agent.servicer import ProxyAgentServicer
from vmrepl.daemon import run_daemon
from vmrepl.logs import get_logger
from vmrepl.rpc import Service, serve_until_signalled, start_server


async def serve(settings: ProxySettings) -> None:
    log = get_logger("vmrepl.proxy")
    servicer = ProxyAgentServicer(settings)
    service = Service(proxy_pb2.DESCRIPTOR.services_by_name["ProxyAgent"], servicer)
    server, port, _ = await start_server(
        listen=settings.listen, tls=settings.tls, services=[service], max_message_bytes=4 << 20
    )
    log.info("listening", address=settings.listen, port=port)
    await serve_until_signalled(server, on_stop=servicer.stop_all)


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
