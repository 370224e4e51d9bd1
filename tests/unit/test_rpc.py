"""The one mapping from exceptions to gRPC statuses: an internal error names the program whose log to read."""

from __future__ import annotations

import grpc

from controller import lab
from tests.support.certs import tls_settings
from vmrepl.errors import NotFound
from vmrepl.rpc import start_server, status_for


async def test_internal_errors_name_the_program_that_serves(lab_certs: lab.LabCerts) -> None:
    for program in ("proxy", "target", "controller"):
        tls = tls_settings(lab_certs, program)
        server, _, _ = await start_server(
            listen="127.0.0.1:0", tls=tls, services=[], max_message_bytes=1 << 20, program=program
        )
        try:
            assert status_for(RuntimeError("boom")) == (
                grpc.StatusCode.INTERNAL,
                f"internal error; see the {program}'s log",
            )
            assert status_for(NotFound("no such disk")) == (grpc.StatusCode.NOT_FOUND, "no such disk")
        finally:
            await server.stop(None)
