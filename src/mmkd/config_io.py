"""Plain data in and out of typed configs: YAML read safely (``1e-3`` a number, a key given twice refused naming
the line), ``key=value`` overrides, and dataclasses built from dicts with errors that name the key.

Its own module so that config.py holds only what a run config *is* (its dataclasses and their checks).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from mmkd.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a number (YAML 1.1 needs a dot, ``1.0e-3``: a trap for learning rates) and
    refuses a key given twice in one mapping (plain YAML keeps the last silently: an edit that seems ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise ConfigError(f"{self.name}:{line}: duplicate key {key!r} (first given at line {first[key]}); "
                                      "keep one of them")
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it
                pass
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str, where: str | Path = "<text>") -> Any:
    """Parse YAML as every mmkd file is read: safe types only, ``1e-3`` a number, duplicate keys refused naming
    ``where`` and the line. A syntax error raises ``yaml.YAMLError`` for the caller to name its file."""
    loader = _Loader(text)
    loader.name = str(where)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# ----------------------------------------------------------------------------------------------------------
# building dataclasses from plain dicts, with errors that name the key


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        lists = [a for a in args if typing.get_origin(a) is list]
        if isinstance(value, (list, tuple)) and lists:  # a list's own errors name the bad item (key[i])
            return _coerce(value, lists[0], path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        return {k: _coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:  # a dataclass that validates itself (__post_init__): say which section its message is about
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"{path}: {msg}" if path else str(msg)) from None


def to_dict(obj: Any) -> Any:
    out = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get("omit_when_empty") and not out[f.name]:
            del out[f.name]
    return out


def parse_value(text: str) -> Any:
    """A command-line value read as YAML, as overrides read it (``1e-3`` a number, ``[a, b]`` a list)."""
    return load_yaml(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a plain config dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100)")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        try:
            value = parse_value(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from None
        try:  # a list index out of range or a path through a scalar: name the override, not a traceback
            node = data
            for part in parts[:-1]:
                if isinstance(node, list):
                    node = node[int(part)]
                else:
                    node = node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (IndexError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"override {item!r}: {key.strip()!r} is not a settable path here "
                              f"({type(e).__name__}: {e})") from None
    return data


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a plain mapping (this module's loader: ``1e-3`` is a number), errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        loaded = load_yaml(p.read_text(), p)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys")
    return loaded
