"""Program settings: one TOML file per program, overridden by environment variables.

`VMREPL_<PROGRAM>_<KEY>` overrides a top-level key, `__` separates nested
keys (`VMREPL_TARGET_TLS__CERT_FILE`). Settings are validated once at start;
a bad key fails with a message naming it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from vmrepl.errors import ConfigError


class TlsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ca_file: Path = Field(description="PEM bundle of the CA that signs vmrepl certificates")
    cert_file: Path = Field(description="this program's certificate (PEM)")
    key_file: Path = Field(description="this program's private key (PEM)")


class LogSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


class ProgramSettings(BaseSettings):
    """Base of every program's settings: env beats file, file beats defaults."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs, so environment variables must rank first.
        return (env_settings, init_settings)


S = TypeVar("S", bound=ProgramSettings)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {key}: {e['msg']}")
    return "\n".join(lines)


def load_settings(cls: type[S], path: Path | None) -> S:
    """Read `path` (if given), apply environment overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} does not exist") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    try:
        return cls(**data)
    except ValidationError as e:
        where = f"config file {path}" if path else "configuration"
        raise ConfigError(f"invalid {where}:\n{_describe(e)}") from e
