"""Webhooks: a JSON summary POSTed when a session ends, retried with backoff, delivered once.

A session that ends with its job's webhook set is marked `pending` in the same transaction as its end
state. This loop delivers pending notifications and marks them `sent` (or `failed` after the retries
are spent), so a crash between the end and the delivery delays it rather than losing it.
The URL is stored sealed (controller.db.secrets) and opened only to be requested; only its redacted form
(scheme, host, port) is ever logged: userinfo, path and query often carry a credential.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
from google.protobuf import json_format
from sqlalchemy import select
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from controller.db.enums import Notification, SessionState
from controller.db.models import Job, Session
from controller.db.secrets import SecretBox
from controller.engine.journal import Journal
from vmrepl.errors import SecurityError
from vmrepl.logs import get_logger
from vmrepl.supervise import every

log = get_logger("vmrepl.controller.observability.webhooks")
POLL_SECONDS = 1.0


def redact_url(url: str) -> str:
    """Scheme, host and port only: a webhook's userinfo, path, query or fragment often carries a credential.
    "/…" marks that something was left out."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # never stored (the API refuses it), but never echoed either
        return "(unreadable URL)"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    hidden = parts.username is not None or parts.password is not None
    hidden = hidden or bool(parts.path.strip("/") or parts.query or parts.fragment)
    return f"{parts.scheme}://{netloc}" + ("/…" if hidden else "")


class DeliveryFailed(Exception):
    pass


class Notifier:
    def __init__(
        self,
        *,
        journal: Journal,
        secrets: SecretBox,
        render: Callable[[str], Any],
        attempts: int = 8,
        backoff_seconds: float = 2.0,
        timeout: float = 10.0,
    ) -> None:
        self.journal = journal
        self.secrets = secrets
        self.render = render  # session id -> api.Session (for the statistics)
        self.attempts = attempts
        self.backoff = backoff_seconds
        self.timeout = timeout

    async def run(self) -> NoReturn:
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client:
            await every(POLL_SECONDS, functools.partial(self.deliver_pending, client), name="webhooks")

    async def deliver_pending(self, client: httpx.AsyncClient) -> None:
        async with self.journal.read() as db:
            rows = (
                await db.execute(
                    select(Session, Job)
                    .join(Job, Job.id == Session.job_id)
                    .where(Session.notification == Notification.PENDING)
                )
            ).all()
        for session, job in rows:
            skip = not job.has_webhook or (
                job.webhook.get("failures_only") and session.state is not SessionState.FAILED
            )
            outcome = Notification.SKIPPED if skip else await self._deliver(client, job, await self._body(session, job))
            async with self.journal.write() as db:
                row = await db.get(Session, session.id)
                if row is not None:
                    row.notification = outcome

    async def _body(self, session: Session, job: Job) -> dict[str, Any]:
        msg = await self.render(session.id)
        return {
            "job": f"jobs/{job.name}",
            "session": f"sessions/{session.id}",
            "state": session.state,
            "error": session.error,
            "start_time": json_format.MessageToDict(msg).get("startTime"),
            "end_time": json_format.MessageToDict(msg).get("endTime"),
            "statistics": json_format.MessageToDict(msg.stats, preserving_proto_field_name=True),
        }

    async def _deliver(self, client: httpx.AsyncClient, job: Job, body: dict[str, Any]) -> Notification:
        try:
            url = self.secrets.open(str(job.webhook["sealed_url"]).encode("ascii"))
        except SecurityError as e:  # the key that sealed it is no longer configured
            log.error("webhook_failed", job=job.name, session=body["session"], error=str(e))
            return Notification.FAILED
        host = redact_url(url)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((DeliveryFailed, httpx.HTTPError)),
                wait=wait_exponential(multiplier=self.backoff, max=300),
                stop=stop_after_attempt(self.attempts),
                reraise=True,
            ):
                with attempt:
                    n = attempt.retry_state.attempt_number
                    reply = await client.post(url, json=body, headers={"User-Agent": "vmrepl-controller"})
                    if reply.status_code >= 300:
                        log.warning("webhook_refused", webhook=host, status=reply.status_code, attempt=n)
                        raise DeliveryFailed(f"HTTP {reply.status_code}")
        except (DeliveryFailed, httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
            # The exception's type only: httpx's messages may quote the URL.
            log.error("webhook_failed", webhook=host, session=body["session"], error=type(e).__name__)
            return Notification.FAILED
        log.info("webhook_sent", webhook=host, session=body["session"], state=body["state"])
        return Notification.SENT
