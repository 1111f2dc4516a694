"""Run configurations: a dataclass schema, a YAML file and dotted `key=value` overrides, merged by
OmegaConf structured configs (as the official RAR code and most of the field do).

`load_config(TrainConfig, "configs/x.yaml", ["optim.lr=3e-4", "max_steps=100"])` returns a
`TrainConfig`. An unknown key or a value of the wrong type is a ValueError naming the dotted key,
so a typo never trains silently with a default; range checks live in each dataclass's
`__post_init__` and run when the instance is built.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Iterable, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


_EXPECTED = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _clear(err: OmegaConfBaseException, source: str) -> ValueError:
    """OmegaConf's multi-line message as one sentence naming the key."""
    first = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
    found = re.match(r"Value '(.*)' of type '\w+' could not be converted to (\w+)", first)
    if found and found.group(2) in _EXPECTED:
        first = f"expected {_EXPECTED[found.group(2)]}, got {found.group(1)!r}"
    key = getattr(err, "full_key", None)
    return ValueError(f"{source}: config key {key!r}: {first}." if key else f"{source}: {first}.")


def require(ok: bool, key: str, value, expected: str) -> None:
    """A range check for a config's `__post_init__`: it runs when the config is built, so a bad
    value fails before any work, naming the dotted key."""
    if not ok:
        raise ValueError(f"config key {key!r} must be {expected}, got {value!r}.")


_TYPE_CHECKS = {int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
                bool: ("true or false", lambda v: isinstance(v, bool)), str: ("a string", lambda v: isinstance(v, str))}


def check_types(instance, prefix: str = "") -> None:
    """A config dataclass built directly (not through `load_config`) gets the same one-sentence
    errors for a value of the wrong type as a YAML file would, before its range checks compare it."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        tp, value, key = hints.get(f.name), getattr(instance, f.name), prefix + f.name
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Union and type(None) in args and len(args) == 2:
            if value is None:
                continue
            tp = next(a for a in args if a is not type(None))  # Optional[X]: X unless unset
        if tp in _TYPE_CHECKS and not _TYPE_CHECKS[tp][1](value):
            raise ValueError(f"config key {key!r} must be {_TYPE_CHECKS[tp][0]}, got {value!r}.")
        if dataclasses.is_dataclass(tp) and not isinstance(value, tp):
            raise ValueError(f"config key {key!r} must be a {tp.__name__} section, got {type(value).__name__} (build "
                             "a config from plain dicts with rar.core.runconfig.config_from_dict).")


def _check_shapes(cls, raw, source: str, prefix: str = "") -> None:
    """What OmegaConf converts or reports without the key: a bool field given anything but true or
    false (it would take 3 as true), a section given a scalar, a fixed-length tuple of another length."""
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        tp, key = hints.get(name), prefix + str(name)
        if tp is bool and not isinstance(value, bool):
            raise ValueError(f"{source}: config key {key!r}: expected true or false, got {value!r}.")
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: config key {key!r} is a section, got {value!r}.")
            _check_shapes(tp, value, source, key + ".")
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (list, tuple) and value is not None and not isinstance(value, list):
            raise ValueError(f"{source}: config key {key!r}: expected a list in brackets, e.g. [a, b], got {value!r}.")
        if origin is dict and not isinstance(value, dict):
            raise ValueError(f"{source}: config key {key!r}: expected a mapping (name: value), got {value!r}.")
        if origin is dict and args and typing.get_origin(args[1]) is list:
            bad = next((k for k, v in value.items() if not isinstance(v, list)), None)
            if bad is not None:
                raise ValueError(f"{source}: config key {key + '.' + str(bad)!r}: expected a list such as "
                                 f"[key=value, ...], got {value[bad]!r}.")
        if tp is str and isinstance(value, (dict, list)):
            raise ValueError(f"{source}: config key {key!r}: expected a string, got {value!r}.")
        if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis and isinstance(value, list) \
                and len(value) != len(args):
            raise ValueError(f"{source}: config key {key!r}: expected {len(args)} items, got {len(value)}.")


def override_key(text: str) -> str:
    """The dotted key a `key=value` override sets."""
    return text.split("=", 1)[0].strip()


def _overrides(items: Iterable[str]):
    items = list(items)
    for text in items:
        key = override_key(text)
        if "=" not in text or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {text!r} is not of the form key=value (e.g. optim.lr=3e-4).")
        if not text.split("=", 1)[1].strip():
            raise ValueError(f"override {text!r} has no value; expected key=value (e.g. {key}=...).")
    return OmegaConf.from_dotlist(items)


def _blame(err: OmegaConfBaseException, source: str, overrides: list[str]) -> str:
    """Where a bad value came from: the override that set its key, else the file."""
    key = str(getattr(err, "full_key", "") or "")
    for text in reversed(overrides):
        k = override_key(text)
        if key and (k == key or key.startswith(k + ".") or k.startswith(key + ".")):
            return f"override {text!r}"
    return source


def _load_mapping(p: Path):
    """The YAML file `p` as an OmegaConf mapping, or a ValueError saying what it holds instead."""
    if p.is_dir():
        raise ValueError(f"config file {str(p)!r} is a folder; expected a YAML file.")
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text())
        loaded = OmegaConf.load(p) if isinstance(raw, dict) else None
    except Exception as err:  # noqa: BLE001 - yaml's own errors: a syntax error in the file
        text = " ".join(str(err).split())
        raise ValueError(f"config file {str(p)!r} is not valid YAML: {text[:300]}") from None
    if raw is None:
        raise ValueError(f"config file {str(p)!r} is empty; expected a YAML mapping of config keys.")
    if loaded is None or not OmegaConf.is_dict(loaded):
        raise ValueError(f"config file {str(p)!r} holds {str(raw)[:60]!r}; expected a YAML mapping of "
                         "config keys at the top level.")
    return loaded


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> T:
    """A `cls` instance from its defaults <- the YAML file <- the dotted overrides. An override sets
    its key's value: a mapping given for a free mapping (a study's `variants`) replaces the file's
    rather than merging into it (`key.entry=value` sets one entry); given for a section
    (`optim={lr: 1e-3}`) it sets those fields."""
    layers, source, overrides = [OmegaConf.structured(cls)], "config", list(overrides)
    if path is not None:
        source = f"config file {str(path)!r}"
        layers.append(_load_mapping(Path(path)))
    layers.append(_overrides(overrides))
    for layer, where in zip(layers[1:], [source, "override"][-len(layers) + 1:]):
        _check_shapes(cls, OmegaConf.to_container(layer), where)
    try:
        merged = OmegaConf.merge(*layers[:-1])
        for text in overrides:  # in order, each as its own layer
            key, value = override_key(text), _overrides([text])
            node = OmegaConf.select(merged, key, default=None)
            if OmegaConf.is_dict(node) and OmegaConf.get_type(node) is dict:  # a free mapping: replaced
                OmegaConf.update(merged, key, OmegaConf.select(value, key), merge=False)
            else:  # a value, a list, or some fields of a section
                merged = OmegaConf.merge(merged, value)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _clear(err, _blame(err, source, overrides)) from None


def config_from_dict(cls: type[T], values: dict, source: str = "config") -> T:
    """A `cls` instance from a plain nested dict (e.g. read back from a run folder)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(values)))
    except OmegaConfBaseException as err:
        raise _clear(err, source) from None


def to_dict(instance) -> dict:
    """Dataclass -> plain dict of YAML-safe values (tuples become lists)."""
    return OmegaConf.to_container(OmegaConf.structured(instance))


def save_config(instance, path: str | os.PathLike) -> Path:
    """Write a dataclass instance as YAML that `load_config` reads back to an equal instance."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(OmegaConf.to_yaml(OmegaConf.structured(instance), sort_keys=False))
    return p

