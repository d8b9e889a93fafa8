"""The rules every config section shares, and nothing else: the strict section base, the value
rules (non-empty text, secrets never echoed, paths resolved against the config's folder) and
the error that names the key a rule is about. A leaf: it imports no other config module, so
the sections of edge_agent/agent/config.py and publish/opcua_config.py can both import it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    # strict: no bool as int, no string as number (ints still pass as floats); no inf/nan.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def problem(message: str, *at: str | int) -> PydanticCustomError:
    """A rule's own message; `at` names the key below the validated value it is about (a
    model-wide rule is reported on the key to change, not on the whole section)."""
    return PydanticCustomError("config", "{problem}", {"problem": message, "at": at})


def show(value: Any) -> str:
    """A value as a message quotes it: short, with its YAML kind."""
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    kind = {dict: "mapping", list: "list", bool: "boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
    return f"{text} ({kind})"


def text(value: str) -> str:
    if not value.strip():
        raise problem("must not be empty")
    return value


def secret_text(value: SecretStr) -> SecretStr:
    text(value.get_secret_value())
    return value


def resolve(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def config_path(value: object, info: ValidationInfo) -> object:
    # The config's folder comes in as validation context: load_config knows the file.
    if value is None:
        raise problem("must not be empty")
    if not isinstance(value, str):
        raise problem(f"must be a string, got {show(value)}")
    return resolve(info.context["base"], text(value))


Text = Annotated[str, AfterValidator(text)]
Secret = Annotated[SecretStr, AfterValidator(secret_text)]
ConfigPath = Annotated[Path, BeforeValidator(config_path)]
