"""The strict loader behind the config tree: YAML -> dict -> dotted overrides -> typed dataclasses.

Nothing here knows the sections; it reads any tree of dataclasses from their annotations, so a
field added to a section is loadable, overridable and listed among the valid keys by itself.
Mistakes fail at load time, naming the key, before any Ray worker starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """An invalid configuration; the message names the key."""


def string_shorthand(cls: type) -> str | None:
    """The field a plain string stands for in place of a `cls` mapping (`SHORTHAND_FIELD`), if any."""
    return getattr(cls, "SHORTHAND_FIELD", None)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file ({} for an empty file). Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded or {}


def apply_override(raw: dict[str, Any], item: str, root: type) -> None:
    """Set `a.b.c=value` in the nested dict of a `root` tree; the value is parsed as YAML
    (numbers, null, [lists]), falling back to the literal string."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text  # not YAML (a template with a lone brace, say): take it as the string typed
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str):
            shorthand = string_shorthand(_field_type_at(root, parts[: depth + 1]) or object)
            if shorthand is not None:
                child = {shorthand: child}  # the string shorthand gains a sibling key
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def field_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls: type) -> list[str]:
    """All dotted keys of a config dataclass, for error messages and docs."""
    keys: list[str] = []
    for name, hint in field_hints(cls).items():
        inner = _dataclass_in(hint)
        if inner is not None:
            keys.extend(f"{name}.{sub}" for sub in valid_keys(inner))
        else:
            keys.append(name)
    return keys


def build_dataclass(cls: type, value: Any, key: str) -> Any:
    """Build `cls` from a mapping, recursively, rejecting unknown keys and wrong types."""
    shorthand = string_shorthand(cls)
    if shorthand is not None and isinstance(value, str):
        value = {shorthand: value}
    if not isinstance(value, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {_type_name(value)}")
    hints = field_hints(cls)
    unknown = [k for k in value if k not in hints]
    if unknown:
        prefix = f"{key}." if key else ""
        valid = [f"{prefix}{k}" for k in valid_keys(cls)]
        close = difflib.get_close_matches(f"{prefix}{unknown[0]}", valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}{hint}; valid keys: " + ", ".join(valid))
    kwargs = {}
    for name, hint in hints.items():
        if name in value:
            kwargs[name] = _coerce(hint, value[name], f"{key}.{name}" if key else name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _coerce_union(args, value, key)
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is Literal:
        return _coerce_literal(args, value, key)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)  # type: ignore[arg-type]
    if origin is list:
        (item_type,) = args
        if isinstance(value, str) and item_type is str:
            value = [value]  # `loss_type: sigmoid` means [sigmoid]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_type_name(value)}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, item_type = args
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_type_name(value)}")
        return {_coerce(key_type, k, key): _coerce(item_type, v, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    return _coerce_scalar(hint, value, key)


def _coerce_union(args: tuple[Any, ...], value: Any, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    errors = []
    for option in options:
        try:
            return _coerce(option, value, key)
        except ConfigError as e:
            errors.append(str(e))
    # A list given where a mapping or a list of mappings is allowed is meant as the list: its
    # error (data.train[1].weight: ...) says more than "fits none of its types".
    shaped = [e for option, e in zip(options, errors) if _same_shape(option, value)]
    if len(errors) == 1 or len(shaped) == 1:
        raise ConfigError(errors[0] if len(errors) == 1 else shaped[0])
    raise ConfigError(f"{key}: {_type_name(value)} fits none of its types")


def _same_shape(hint: Any, value: Any) -> bool:
    """Whether `value` has the container shape of `hint` (a list for list[...], a mapping or the
    string shorthand for a config dataclass)."""
    if typing.get_origin(hint) is list:
        return isinstance(value, list)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict) or (isinstance(value, str) and string_shorthand(hint) is not None)  # type: ignore[arg-type]
    return False


def _coerce_literal(args: tuple[Any, ...], value: Any, key: str) -> Any:
    if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
        # YAML 1.1 reads no/off/yes/on as booleans; map back to the option spelled that way.
        spelled = [
            a
            for a in args
            if isinstance(a, str)
            and a.lower() in (("yes", "on", "true") if value else ("no", "off", "false"))
        ]
        value = spelled[0] if spelled else value
    if value not in args:
        raise ConfigError(f"{key}: {value!r} is not one of: {', '.join(map(str, args))}")
    return value


def _coerce_scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-6 without a dot as a string; it is meant as a number.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def _field_type_at(root: type, parts: list[str]) -> type | None:
    cls: type | None = root
    for part in parts:
        if cls is None:
            return None
        hint = field_hints(cls).get(part)
        cls = _dataclass_in(hint) if hint is not None else None
    return cls


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
