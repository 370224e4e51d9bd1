"""Pages of List replies: bounded sizes and opaque tokens. Pure.

Database lists page by key (keyset): the token holds the sort key of the page's last row and the next
page starts after it, so a page costs an indexed range read however deep it is, never a scan over the
rows skipped before it (OFFSET), and rows added meanwhile neither repeat nor vanish. A session log, a
file, pages by line number. A token is checked field by field: anything else is INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute

from controller.db.types import UtcDateTime
from vmrepl.errors import InvalidArgument

MAX_PAGE = 1000  # configuration resources, restore points, session log lines
MAX_SESSION_PAGE = 100  # a session is a tree of VMs and disks: fewer per page
DEFAULT_PAGE = 100
MAX_TOKEN_CHARS = 1024
MAX_LINE_OFFSET = 10**12  # far past any session log, small enough for every integer type
_BAD_TOKEN = "is not a token from an earlier reply"


def page_size(size: int, maximum: int = MAX_PAGE) -> int:
    """How many items a page holds: the request's page_size, 0 for the default, at most `maximum`."""
    if size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(size or DEFAULT_PAGE, maximum)


def _encode(payload: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()).decode()


def _decode(token: str) -> Any:
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument("page_token", _BAD_TOKEN)
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, binascii.Error) as e:  # also UnicodeError and JSONDecodeError
        raise InvalidArgument("page_token", _BAD_TOKEN) from e


@dataclass(frozen=True)
class Keyset:
    """The unique sort key of a list (its last column unique on its own), ascending or descending."""

    kind: str  # names the list, so a token of one list is refused by another
    columns: Sequence[InstrumentedAttribute[Any]]
    descending: bool = False

    @property
    def model(self) -> Any:
        return self.columns[0].class_

    def order_by(self) -> list[Any]:
        return [c.desc() if self.descending else c.asc() for c in self.columns]

    def after(self, token: str) -> Any:
        """The WHERE clause of the page after `token`'s row; None for the first page."""
        if not token:
            return None
        key = tuple_(*self.columns)
        values = tuple_(*self.parse(token))
        return key < values if self.descending else key > values

    def parse(self, token: str) -> list[Any]:
        payload = _decode(token)
        if not isinstance(payload, list) or len(payload) != len(self.columns) + 1 or payload[0] != self.kind:
            raise InvalidArgument("page_token", _BAD_TOKEN)
        return [_value(c, v) for c, v in zip(self.columns, payload[1:], strict=True)]

    def token(self, row: Any) -> str:
        values: list[Any] = [self.kind]
        for c in self.columns:
            v = getattr(row, c.key)
            if isinstance(v, dt.datetime):  # aware UTC (controller.db.types.UtcDateTime)
                v = v.isoformat()
            values.append(v)
        return _encode(values)


def _value(column: InstrumentedAttribute[Any], raw: object) -> Any:
    if not isinstance(raw, str) or len(raw) > 256:
        raise InvalidArgument("page_token", _BAD_TOKEN)
    if not isinstance(column.type, UtcDateTime):
        return raw
    try:
        t = dt.datetime.fromisoformat(raw)
        if t.tzinfo is None:  # every token a reply made carries its offset
            raise ValueError("a time without offset")
        # Converted here, not when bound: a time at the ends of the calendar with an offset has no UTC
        # form (OverflowError), and no reply made that token.
        return t.astimezone(dt.UTC)
    except (ValueError, OverflowError) as e:
        raise InvalidArgument("page_token", _BAD_TOKEN) from e


def page_query(keyset: Keyset, *, limit: int, token: str, where: Any = None) -> Select[Any]:
    """The rows of one page, and one more to tell whether another page follows."""
    q = select(keyset.model)
    for condition in (where, keyset.after(token)):
        if condition is not None:
            q = q.where(condition)
    return q.order_by(*keyset.order_by()).limit(limit + 1)


def next_key_token(keyset: Keyset, rows: Sequence[Any], limit: int) -> str:
    """The token of the page after `rows` (fetched with limit + 1 to know whether one follows)."""
    return keyset.token(rows[limit - 1]) if len(rows) > limit else ""


def line_offset(token: str) -> int:
    """The first line of a session log page."""
    if not token:
        return 0
    payload = _decode(token)
    if (
        not isinstance(payload, list)
        or len(payload) != 2
        or payload[0] != "line"
        or type(payload[1]) is not int
        or not 0 <= payload[1] <= MAX_LINE_OFFSET
    ):
        raise InvalidArgument("page_token", _BAD_TOKEN)
    return payload[1]


def line_token(offset: int) -> str:
    return _encode(["line", offset])
