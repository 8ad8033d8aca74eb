"""Settings read from the environment (``CDAE_*`` variables), typed and checked (pydantic-settings).

:class:`RuntimeSettings` holds what the pipelines layer reads: the data directory, the device and
torch's thread count. The service extends it (``service.config.Settings``). An instance reads
the environment when it is made, so make one where a value is needed rather than keeping one
from import time: tests and the command line change the environment. A bad value raises
:class:`SettingsError` naming the variable. The README's "Settings" section lists every
variable; a test keeps that list and the fields in step.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["RuntimeSettings", "SettingsError", "settings_table"]


class SettingsError(ValueError):
    """An environment variable holds a value its setting does not take."""


class RuntimeSettings(BaseSettings):
    """The ``CDAE_*`` variables every process reads (the command line, training, the workers)."""

    model_config = SettingsConfigDict(env_prefix="CDAE_", env_ignore_empty=True, frozen=True, extra="ignore")

    home: Path = Field(Path("~/.cdae-med"),
                       description="Data directory: registered models, jobs, the job database, the embedded Redis.")
    device: str = Field("auto", description="Device of training and of the workers: auto (the GPU if torch sees one), "
                                    "cpu or cuda.")
    torch_threads: int | None = Field(None, ge=1, description="Torch threads per worker process on a CPU "
                                                              "[torch's default].")

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise SettingsError(_describe(type(self), err)) from None

    @field_validator("home")
    @classmethod
    def _expand(cls, home: Path) -> Path:
        return home.expanduser()

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError("use auto, cpu or cuda (or cuda:N)")
        return device

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of a field: ``home`` -> ``CDAE_HOME``."""
        return cls.model_config["env_prefix"] + field.upper()


def _describe(cls: type[RuntimeSettings], err: ValidationError) -> str:
    """One line per bad setting, named by its environment variable, with the value given."""
    parts = []
    for e in err.errors():
        field = str(e["loc"][0]) if e.get("loc") else ""
        name = cls.env_name(field) if field in cls.model_fields else field or "settings"
        raw = os.environ.get(name, e.get("input"))
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{name}={raw!r}: {msg}")
    return "; ".join(parts)


def settings_table(cls: type[RuntimeSettings], width: int = 100) -> str:
    """The variables of ``cls``, one entry each: name, description and [default] (none shown for an unset one)."""
    entries = []
    for field, info in cls.model_fields.items():
        default = info.get_default(call_default_factory=True)
        text = info.description or ""
        if default not in (None, "") and "[" not in text:
            text += f" [{default}]"
        entries.append(textwrap.fill(text, width, initial_indent=f"    {cls.env_name(field):<20} ",
                                     subsequent_indent=" " * 25))
    return "\n".join(entries)
