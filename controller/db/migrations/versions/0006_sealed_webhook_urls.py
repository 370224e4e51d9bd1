"""webhook URLs sealed at rest

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 17:00:00.000000

A job's webhook was stored as {"url": ..., "failures_only": ...}, the URL in clear although its userinfo,
path or query often carries a credential. It becomes {"sealed_url", "shown_url", "failures_only"}: the
URL sealed with the controller's secret key, as credentials' secrets are, and the redacted form replies
show. Converting needs the key: controller.db.connect.migrate passes it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import context, op

from vmrepl.errors import ConfigError

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("webhook", sa.JSON))


def _shown(url: str) -> str:
    """The redaction of controller.observability.webhooks.redact_url as of this revision (a migration does not follow
    later changes of the code)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "(unreadable URL)"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    hidden = parts.username is not None or parts.password is not None
    hidden = hidden or bool(parts.path.strip("/") or parts.query or parts.fragment)
    return f"{parts.scheme}://{netloc}" + ("/…" if hidden else "")


def _rows(key: str) -> list[tuple[str, dict[str, Any]]]:
    rows = op.get_bind().execute(sa.select(_jobs.c.id, _jobs.c.webhook)).all()
    return [(r[0], dict(r[1])) for r in rows if isinstance(r[1], dict) and r[1].get(key)]


def _secrets(rows: int) -> Any:
    box = context.config.attributes.get("secrets")
    if box is None and rows:
        raise ConfigError(f"migration {revision} seals the webhook URLs of {rows} jobs and needs the secret key")
    return box


def upgrade() -> None:
    rows = _rows("url")
    box = _secrets(len(rows))
    if rows and op.get_bind().dialect.name == "sqlite":
        # Overwrite the clear values' old bytes instead of leaving them in free space of the file.
        # (PostgreSQL keeps old row versions until VACUUM: docs/operations.md says so.)
        op.execute("PRAGMA secure_delete = ON")
    for job_id, hook in rows:
        url = str(hook["url"])
        stored = {"sealed_url": box.seal(url).decode("ascii"), "shown_url": _shown(url)}
        stored["failures_only"] = bool(hook.get("failures_only"))
        op.get_bind().execute(_jobs.update().where(_jobs.c.id == job_id).values(webhook=stored))


def downgrade() -> None:
    rows = _rows("sealed_url")
    box = _secrets(len(rows))
    for job_id, hook in rows:
        clear = {"url": box.open(str(hook["sealed_url"]).encode("ascii")), "failures_only": hook.get("failures_only")}
        op.get_bind().execute(_jobs.update().where(_jobs.c.id == job_id).values(webhook=clear))
