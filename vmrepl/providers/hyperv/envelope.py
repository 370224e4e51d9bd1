"""Read the one JSON envelope a host script prints on stdout, with Windows PowerShell 5.1's quirks.

Every script the package ships ends with exactly one of (made by `ConvertTo-Json -Depth N -Compress`):

    {"ok":true,"host":"hv01","operation":"Get-VM","result":<payload>}
    {"ok":false,"host":"hv01","operation":"Msvm_VirtualSystemSnapshotService.CreateSnapshot",
     "message":"...","code":32775}

`read_envelope(stdout, Model)` returns the payload validated as `Model`, raises `HostError` for an error
envelope, and `HostOutputError` for anything else (no output, two documents, truncated JSON, a field
missing or of the wrong type). Payload models use `PsDateTime` for 5.1 dates and `PsList[...]` where
5.1 may print one item without its array (see docs/hyperv.md and the fact sheet, section 3.2).

Validation is pydantic's strict JSON mode, so an enum that 5.1 prints as an integer validates into an
IntEnum, while `"3"` for an integer or `3` for a string is refused rather than coerced.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar, overload

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from vmrepl.errors import HostError, HostOutputError

M = TypeVar("M")
T = TypeVar("T")

# 5.1 writes DateTime as "\/Date(ms)\/" (the JSON escape leaves "/Date(ms)/" once decoded); an offset
# suffix, as .NET's DataContractJsonSerializer writes, does not change the instant: ms are UTC.
_PS_DATE = re.compile(r"/Date\((-?\d{1,15})([+-]\d{4})?\)/")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BOM = "\ufeff"


def as_list(value: Any) -> list[Any]:
    """A 5.1 JSON value that stands for a list: `null` is none, a lone item is itself, a list is a list.

    `$items | ConvertTo-Json` prints nothing for no item, the item (not a one-element array) for one,
    and an array for several (PowerShell/PowerShell#11857).
    """
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def ps_datetime(value: Any) -> Any:
    """`/Date(ms)/`, 5.1's Get-Date object `{"value": "/Date(ms)/", "DisplayHint": .., "DateTime": ..}`, or
    ISO 8601 (a script's `.ToString('o')`) to a datetime; anything else is left for pydantic to refuse."""
    if isinstance(value, dict) and "value" in value and "DisplayHint" in value:
        value = value["value"]
    if isinstance(value, str):
        match = _PS_DATE.fullmatch(value)
        if match:
            return _EPOCH + timedelta(milliseconds=int(match.group(1)))
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return value
    return value


def _aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None:  # a DateTime of Kind Unspecified: its instant is unknown, so refuse it
        raise ValueError("a date without a time zone")
    return value.astimezone(UTC)


# A 5.1 date (`/Date(ms)/`, Get-Date's wrapper object, or ISO 8601 with an offset), as aware UTC.
PsDateTime = Annotated[datetime, BeforeValidator(ps_datetime), AfterValidator(_aware_utc)]
PsList = Annotated[list[T], BeforeValidator(as_list)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _ErrorEnvelope(_Strict):
    ok: Literal[False]
    host: str = Field(min_length=1)
    operation: str = Field(min_length=1)
    message: str
    code: int | None  # the WMI method's return value or a job's ErrorCode; null for a cmdlet's error


class _Head(_Strict):
    """The fields every envelope has; read first so that an error envelope is never mistaken for a bad result."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    ok: bool


def _decode(stdout: bytes | str) -> str:
    if isinstance(stdout, bytes):
        try:
            text = stdout.decode("utf-8")  # the scripts run with code page 65001
        except UnicodeDecodeError as e:
            raise HostOutputError(f"script output is not UTF-8 (byte {e.start})") from e
    else:
        text = stdout
    return text.lstrip(_BOM).strip()


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently; which one the script meant is unknowable.
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise HostOutputError(f"script output has the key {k!r} twice in one object")
        seen.add(k)
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise HostOutputError(f"script output has {name}, which is not JSON")


def _one_document(text: str) -> Any:
    if not text:
        raise HostOutputError("script printed nothing: expected one JSON envelope")
    decoder = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    try:
        doc, end = decoder.raw_decode(text)
    except json.JSONDecodeError as e:
        raise HostOutputError(f"script output is not complete JSON: {e.msg} at character {e.pos}") from e
    if text[end:].strip():
        raise HostOutputError(f"script output has more than one JSON document (more text at character {end})")
    if not isinstance(doc, dict):
        raise HostOutputError(f"script output is a JSON {type(doc).__name__}, not an envelope object")
    return doc


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "envelope"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


@overload
def read_envelope(stdout: bytes | str, result: type[M]) -> M: ...
@overload
def read_envelope(stdout: bytes | str, result: Any) -> Any: ...  # an Annotated type such as PsList[Vm]


def read_envelope(stdout: bytes | str, result: Any) -> Any:
    """The payload of the one envelope in `stdout`, validated as `result` (a model or any pydantic type).

    Raises `HostError` for an error envelope and `HostOutputError` when `stdout` is not exactly one
    well-formed envelope of the expected shape.
    """
    text = _decode(stdout)
    doc = _one_document(text)
    try:
        head = _Head.model_validate(doc)
    except ValidationError as e:
        raise HostOutputError(f"script output is not an envelope: {_describe(e)}") from e
    if not head.ok:
        try:
            err = _ErrorEnvelope.model_validate_json(text)
        except ValidationError as e:
            raise HostOutputError(f"error envelope is malformed: {_describe(e)}") from e
        raise HostError(host=err.host, operation=err.operation, message=err.message, code=err.code)
    adapter: TypeAdapter[Any] = TypeAdapter(_result_envelope(result))
    try:
        envelope = adapter.validate_json(text, strict=True)
    except ValidationError as e:
        raise HostOutputError(f"result envelope is malformed: {_describe(e)}") from e
    return envelope.result


def _result_envelope(result: Any) -> type[BaseModel]:
    # Strict JSON mode reads a 5.1 enum integer into an IntEnum and refuses "3" for an int.
    class ResultEnvelope(_Strict):
        ok: Literal[True]
        host: str = Field(min_length=1)
        operation: str = Field(min_length=1)
        result: result  # type: ignore[valid-type]

    return ResultEnvelope
