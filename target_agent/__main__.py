"""`vmrepl-target`: the target agent daemon (foreground; systemd or a Windows service runs it)."""

from __future__ import annotations

from protos.vmrepl.v1 import target_pb2
from target_agent.config import TargetSettings
from target_agent.servicer import TargetAgentServicer
from vmrepl.batch import MAX_MESSAGE_BYTES
from vmrepl.daemon import run_daemon
from vmrepl.logs import get_logger
from vmrepl.rpc import Service, serve_until_signalled, start_server


async def serve(settings: TargetSettings) -> None:
    log = get_logger("vmrepl.target")
    servicer = TargetAgentServicer(settings)
    service = Service(
        target_pb2.DESCRIPTOR.services_by_name["TargetAgent"], servicer, raw_requests=frozenset({"Transfer"})
    )
    server, port, _ = await start_server(
        listen=settings.listen, tls=settings.tls, services=[service], max_message_bytes=MAX_MESSAGE_BYTES
    )
    log.info("listening", address=settings.listen, port=port, datastore=str(servicer.datastore.root))
    await serve_until_signalled(server)


def main(argv: list[str] | None = None) -> None:
    run_daemon(
        prog="vmrepl-target",
        description="vmrepl target agent",
        settings_cls=TargetSettings,
        serve=serve,
        argv=argv,
    )


if __name__ == "__main__":
    main()
