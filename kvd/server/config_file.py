"""Where `kvd serve`'s settings come from: defaults < a TOML file < ``KVD_*`` variables < flags.

The file is flat: one key per :class:`~kvd.server.config.ServeConfig` field (``dram_bytes =
"8GiB"``, ``nvme_dir = "/var/lib/kvd"``, ``policy = "typed"``). The environment uses the same
names upper-cased with a ``KVD_`` prefix (``KVD_DRAM_BYTES=8GiB``). Sizes take ``KiB``/
``MiB``/``GiB`` suffixes or plain integers. A bad value is a :class:`ConfigError` naming
where it came from and the key.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from kvd.server.config import ServeConfig
from kvd.sizes import parse_size

ENV_PREFIX = "KVD_"
_HINTS = typing.get_type_hints(ServeConfig)
FIELDS = {f.name: _HINTS[f.name] for f in fields(ServeConfig)}
# the clients' variables (kvctl, kvd.client), not the daemon's
_NOT_SETTINGS = {"KVD_ADDR", "KVD_TOKEN", "KVD_TLS_CA", "KVD_TLS_CLIENT_CERT", "KVD_TLS_CLIENT_KEY", "KVD_ALLOW_FAULTS"}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names its source and key."""


def load_config(
    path: Path | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ServeConfig:
    """The effective config: defaults, then ``path`` (TOML), then ``env``, then ``overrides``
    (already typed, e.g. from flags). Validates the result; raises ConfigError."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for key, raw in data.items():
            values[key] = _coerce(f"{path}: {key}", key, raw, from_text=False)
    for name, raw in sorted((env or {}).items()):
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        values[key] = _coerce(f"${name}", key, raw, from_text=True)
    values.update(overrides or {})
    config = replace(ServeConfig(), **values)
    try:
        config.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return config


def _coerce(where: str, key: str, raw: Any, from_text: bool) -> Any:
    if key not in FIELDS:
        raise ConfigError(f"{where}: unknown setting; known: {', '.join(sorted(FIELDS))}")
    kind = FIELDS[key]
    optional = isinstance(kind, types.UnionType) and type(None) in kind.__args__
    if optional:
        kind = next(a for a in kind.__args__ if a is not type(None))
        if raw == "" or raw is None:
            return None
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if from_text and str(raw).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return str(raw).lower() in ("1", "true", "yes", "on")
            raise ValueError("expected true or false")
        if kind is int:
            if key.endswith("_bytes") and isinstance(raw, str):
                return parse_size(raw)
            if isinstance(raw, bool) or not isinstance(raw, int | str):
                raise ValueError("expected an integer")
            return int(raw)
        if kind is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise ValueError("expected a number")
            value = float(raw)
            if not math.isfinite(value):  # NaN passes every `<= 0` check: refuse it here
                raise ValueError("expected a finite number")
            return value
        if kind is Path:
            if not isinstance(raw, str) or "\0" in raw:
                raise ValueError("expected a path")
            return Path(raw)
        if kind is str:
            if not isinstance(raw, str) or "\0" in raw:
                raise ValueError("expected a string without NUL characters")
            return raw
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} (got {raw!r})") from None
    raise ConfigError(f"{where}: cannot be set here")


def to_toml(config: ServeConfig) -> str:
    """The config as the flat TOML `--config` reads (unset optional settings commented out)."""
    lines = []
    for name in FIELDS:
        value = getattr(config, name)
        if value is None:
            lines.append(f"# {name} =")
        elif isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{name} = {value}")
        else:
            text = str(value).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{name} = "{text}"')
    return "\n".join(lines) + "\n"
