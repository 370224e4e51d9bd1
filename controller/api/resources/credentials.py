"""Credentials: their messages and checks (the secret is sealed by the caller and never shown)."""

from __future__ import annotations

from controller.api.resources.common import timestamp
from controller.db.models import Credential
from vmrepl.errors import InvalidArgument
from vmrepl.v1 import controller_pb2 as api


def credential_msg(row: Credential) -> api.Credential:
    return api.Credential(name=f"credentials/{row.name}", username=row.username, create_time=timestamp(row.created_at))


def check_username(field: str, value: str) -> str:
    if not value or len(value) > 256:
        raise InvalidArgument(field, "is required, up to 256 characters")
    return value


def check_secret(field: str, value: str) -> str:
    if not value or len(value) > 4096:
        raise InvalidArgument(field, "is required, up to 4096 characters")
    return value
