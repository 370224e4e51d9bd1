"""`vmrepl-target`: the target agent daemon (foreground; systemd or a service host runs it)."""

from __future__ import annotations

from target_agent.config import TargetSettings
from target_agent.receiver import failure_response
from target_agent.servicer import ROLES, TargetAgentServicer
from vmrepl.batch import MAX_MESSAGE_BYTES
from vmrepl.daemon import run_daemon, serve_services
from vmrepl.memory import share_one_arena
from vmrepl.metrics import serve_metrics
from vmrepl.rpc import Service
from vmrepl.v1 import target_pb2


async def serve(settings: TargetSettings) -> None:
    serve_metrics(settings.metrics_listen, settings.tls, plain_http=settings.metrics_plain_http)
    servicer = TargetAgentServicer(settings)
    # Transfer takes raw bytes: vmrepl.batch parses frames without copying their payload.
    service = Service(
        target_pb2.DESCRIPTOR.services_by_name["TargetAgent"],
        servicer,
        raw_requests=frozenset({"Transfer"}),
        roles=ROLES,
        in_band_failures={"Transfer": failure_response},
    )
    await serve_services(
        listen=settings.listen,
        tls=settings.tls,
        services=[service],
        max_message_bytes=MAX_MESSAGE_BYTES,
        release_memory_when_idle=True,  # bursts of 16 MiB batches (or refused attempts) leave glibc holding them
        agent="target",
        datastore=str(servicer.datastore.root),
    )


def main(argv: list[str] | None = None) -> None:
    share_one_arena()  # before gRPC starts its threads: see vmrepl.memory
    run_daemon(
        prog="vmrepl-target",
        description="vmrepl target agent",
        settings_cls=TargetSettings,
        serve=serve,
        argv=argv,
    )


if __name__ == "__main__":
    main()
