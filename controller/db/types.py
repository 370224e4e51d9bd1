"""Column types: points in time as timezone-aware UTC, states as their enums. What is read back is what
the code compares with, on SQLite and PostgreSQL alike, so no caller repairs a time zone or a string."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import DateTime, Dialect, Enum
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[dt.datetime]):
    """An aware datetime in UTC. PostgreSQL stores a `timestamp with time zone`; SQLite, which has no
    zones, the UTC wall time (as every earlier version wrote it), read back as UTC. A naive datetime is
    refused: nothing says which zone it was in."""

    impl = DateTime(timezone=True)
    cache_ok = True

    @property
    def python_type(self) -> type[dt.datetime]:
        return dt.datetime

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"a naive datetime ({value}) has no known time zone; give it tzinfo")
        utc = value.astimezone(dt.UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.utcoffset() is None else value.astimezone(dt.UTC)


def state_type(states: type[enum.StrEnum], *, constraint: str) -> Enum:
    """A state column: a string of at most 16 characters holding one of the enum's values (not its member
    names, so the stored text is what earlier versions wrote), checked by the CHECK `constraint` in the
    database too, and read back as the member."""
    return Enum(
        states,
        name=constraint,
        native_enum=False,  # a plain string column: adding a state needs no ALTER TYPE, only a new CHECK
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=_values,
    )


def _values(states: type[enum.StrEnum]) -> list[str]:
    return [s.value for s in states]
