"""A config tree from a TOML file (or a shipped preset by name) and `section.key -> value`
overrides, each value checked against its field's declared type; the tree itself is ``config``."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import tomllib

from p2p_trainer.config import SECTIONS, Config, ConfigError


def section_fields() -> list[tuple[str, dataclasses.Field]]:
    """(section, field) for every config key, in declaration order: drives `--help`."""
    hints = typing.get_type_hints(Config)
    return [(s, f) for s in SECTIONS for f in dataclasses.fields(hints[s])]


def _field_type(section: str, key: str) -> type:
    cls = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(cls)[key]


def _coerce(where: str, value: Any, typ: type) -> Any:
    """Check a TOML value (or parse a CLI string) against the field's declared type."""
    origin = typing.get_origin(typ) or typ
    if isinstance(typ, types.UnionType):
        origin = typing.get_args(typ)[0]
    if isinstance(value, str) and origin is not str:
        value = _parse_cli_string(where, value, origin)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
    }[origin](value)
    if not ok:
        raise ConfigError(f"{where}: expected {origin.__name__}, got {value!r}")
    return float(value) if origin is float else value


def _parse_cli_string(where: str, text: str, origin: type) -> Any:
    try:
        if origin is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if origin is list:
            # `[0.9, 0.95]` is parsed as TOML; a bare word is a one-element list (a multiaddr, a path)
            return tomllib.loads(f"v = {text}")["v"] if text.startswith("[") else [text]
        return origin(text)
    except (ValueError, tomllib.TOMLDecodeError):
        raise ConfigError(f"{where}: expected {origin.__name__}, got {text!r}") from None


PRESETS = Path(__file__).parent / "configs"


def resolve_preset(path: str | Path) -> Path:
    """A config path as given, or a shipped preset by name ('debug', '14m', ...) when no such file exists."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (PRESETS / f"{path.name}.toml").exists():
        return PRESETS / f"{path.name}.toml"
    return path


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the config from a TOML file (or the defaults) and `section.key -> value` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path:
        path = resolve_preset(path)
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, source)


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    hints = typing.get_type_hints(Config)
    sections = {}
    for section, values in raw.items():
        if section not in hints:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table, got {values!r}")
        cls = hints[section]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key '{section}.{key}'")
            kwargs[key] = _coerce(f"{source}: {section}.{key}", value, _field_type(section, key))
        sections[section] = cls(**kwargs)
    return Config(**sections).validate()
