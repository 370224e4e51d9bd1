"""`vmrepl`: the operator's CLI, a thin client of the ControllerService API (plus `lab` helpers for demos).

Connection: --controller (VMREPL_CONTROLLER, default 127.0.0.1:7400) and a certificate from the vmrepl CA:
--certs-dir (VMREPL_CERTS_DIR) holding ca.pem and IDENTITY.pem/.key, --identity (VMREPL_IDENTITY, default
operator). Read commands take --json. `job start --wait` exits 0 only when the session succeeded (1 failed,
3 incomplete).
"""

import sys
from pathlib import Path
from typing import Annotated

import typer

from controller.cli import operations, replica_reads  # noqa: F401  (add `replica failover ...`, `replica verify`, `restore-points export`)
from controller.cli.common import conn
from controller.cli.infra import infra
from controller.cli.jobs import job_app
from controller.cli.lab import lab_app
from controller.cli.replicas import replica_app
from controller.cli.sessions import points_app, session_app

app = typer.Typer(help="vmrepl: VM replication. Talks to vmrepl-controller over mTLS.", no_args_is_help=True)
app.add_typer(infra, name="infra")
app.add_typer(job_app, name="job")
app.add_typer(session_app, name="session")
app.add_typer(points_app, name="restore-points")
app.add_typer(replica_app, name="replica")
app.add_typer(lab_app, name="lab")


@app.callback()
def connection(
    controller: Annotated[str, typer.Option(envvar="VMREPL_CONTROLLER", help="controller host:port")] = conn.controller,
    certs_dir: Annotated[
        Path, typer.Option(envvar="VMREPL_CERTS_DIR", help="folder with ca.pem, IDENTITY.pem/.key")
    ] = conn.certs_dir,
    identity: Annotated[
        str, typer.Option(envvar="VMREPL_IDENTITY", help="certificate name in --certs-dir")
    ] = conn.identity,
) -> None:
    conn.controller, conn.certs_dir, conn.identity = controller, certs_dir, identity


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
