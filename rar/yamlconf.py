"""Typed YAML configs: a dataclass schema, a YAML file and dotted `key=value` overrides.

`load_config(TrainConfig, "configs/x.yaml", ["optim.lr=3e-4", "steps=100"])` returns a
`TrainConfig`. Unknown keys and values of the wrong type are errors naming the dotted key,
so a typo in a config never trains silently with a default.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

_MISSING = object()


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_union(tp) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or (hasattr(types, "UnionType") and origin is getattr(types, "UnionType"))


def _convert(value: Any, tp, key: str) -> Any:
    """Check / convert one value against a type annotation; raise ValueError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ValueError:
                continue
        raise ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping for {tp.__name__}, got {value!r}.")
        return _build(tp, value, key + ".")
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}.")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError(f"config key {key!r}: expected {len(args)} items, got {len(value)}.")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping, got {value!r}.")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"config key {key!r}: expected one of {list(args)}, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key!r}: expected a string, got {value!r}.")
        return value
    raise ValueError(f"config key {key!r}: unsupported annotation {_type_name(tp)}.")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ValueError(f"unknown config key {prefix + str(unknown[0])!r}; known keys"
                         f"{' under ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(fields)}.")
    kwargs = {}
    for name, f in fields.items():
        tp, default = hints[name], _default(f)
        if name not in raw:
            if default is _MISSING:
                raise ValueError(f"config key {prefix + name!r} is required but missing.")
            kwargs[name] = default
            continue
        value = raw[name]
        # a partial section for a nested dataclass starts from the field's default instance
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and dataclasses.is_dataclass(default):
            value = {**to_dict(default), **value}
        kwargs[name] = _convert(value, tp, prefix + name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid config{' section ' + repr(prefix[:-1]) if prefix else ''}: {err}") from err


def to_dict(instance) -> dict:
    """Dataclass -> plain dict of YAML-safe values (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(instance)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value.")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), (raw, value)


def _apply_override(cls, raw: dict, parts: list[str], value) -> None:
    text, parsed = value
    node, tp = raw, cls
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(tp):
            raise ValueError(f"unknown config key {dotted!r}: {'.'.join(parts[:i])!r} has no sub-keys.")
        hints = typing.get_type_hints(tp)
        if part not in hints or part not in {f.name for f in dataclasses.fields(tp)}:
            raise ValueError(f"unknown config key {dotted!r}; known keys: {', '.join(f.name for f in dataclasses.fields(tp))}.")
        tp = hints[part]
        if _is_union(tp):  # Optional[Section] -> Section
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 else tp
        if i < len(parts) - 1:
            child = node.get(part)
            node = node.setdefault(part, {}) if child is None or isinstance(child, dict) else child
            if not isinstance(node, dict):
                raise ValueError(f"config key {dotted!r} is not a section.")
    # `tag=123` on a str field means the text "123", not the number
    if tp is str and not isinstance(parsed, str) and parsed is not None:
        parsed = text.strip()
    node[parts[-1]] = parsed


def load_config(cls, path: Optional[Union[str, os.PathLike]] = None, overrides: Iterable[str] = ()):
    """Build a `cls` instance from defaults <- YAML file <- dotted `key=value` overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist.")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {str(p)!r} must hold a YAML mapping at the top level.")
        raw = loaded or {}
    for text in overrides:
        parts, value = _parse_override(text)
        _apply_override(cls, raw, parts, value)
    return _build(cls, raw)


def save_config(instance, path: Union[str, os.PathLike]) -> Path:
    """Write a dataclass instance as YAML that `load_config` reads back to an equal instance."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(to_dict(instance), sort_keys=False))
    return p
