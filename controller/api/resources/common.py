"""Names, field checks and conversions every resource shares. Every error names the request field it is about."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from vmrepl.errors import InvalidArgument, NotFound

M = TypeVar("M")

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ADDRESS = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")


def check_id(field: str, value: str) -> str:
    if not _ID.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} is not a valid id (lower-case letters, digits, '-'; up to 63)")
    return value


def parse_name(field: str, value: str, collection: str) -> str:
    """The id in `{collection}/{id}`."""
    prefix = f"{collection}/"
    if not value:
        raise InvalidArgument(field, f"is required (a name like {prefix}ID)")
    if not value.startswith(prefix):
        raise InvalidArgument(field, f"{value!r} is not a {collection} name ({prefix}ID)")
    return check_id(field, value[len(prefix) :])


def check_address(field: str, value: str) -> str:
    if not _ADDRESS.fullmatch(value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
        raise InvalidArgument(field, f"{value!r} is not host:port")
    return value


def timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def mask_paths(field: str, paths: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """The update mask's paths, each one a field that may change; an empty mask means all of them."""
    allowed = list(allowed)
    out = list(paths) or allowed
    for p in out:
        if p not in allowed:
            raise InvalidArgument(field, f"{p!r} cannot be updated (updatable: {', '.join(allowed)})")
    return out


async def by_name(db: AsyncSession, model: type[M], field: str, name: str, collection: str) -> M:
    rid = parse_name(field, name, collection)
    row: M | None = await db.scalar(select(model).where(model.name == rid))  # type: ignore[attr-defined,arg-type]
    if row is None:
        raise NotFound(f"{collection}/{rid} does not exist")
    return row


def check_printable(field: str, value: str) -> str:
    """No NUL or other control character: such a value is never a name or a path anything can use."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument(field, "contains a NUL or another control character")
    return value
