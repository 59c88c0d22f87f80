"""Configs as the project reads them: one YAML dialect, strict loading of dataclass trees, `--section.key=value`.

Every config of the project goes through here: run configs (pretraining, fine-tuning: dataclass trees built with
`load_config`) and model presets (`bigbird_ja.configuration.build_model_config` reads them with `load_yaml_text`).
Loading is strict: an unknown section or key is an error that lists the valid ones, and a value of the wrong type is
an error naming the key, the expected type and the value. Command-line overrides (values parsed as YAML) are merged
into the same mapping and go through the same code, so an override can do nothing a file cannot.

Nothing here knows of pretraining or fine-tuning; any dataclass tree works.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config that cannot be loaded or is inconsistent; the message names the key, the rule and the fix."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers where YAML 1.1 surprises: "3:4" stays the text "3:4" instead of
    the base-60 number 184, and a leading zero is decimal (0010 is ten, not the octal 8; 09 is nine, not the text
    "09"), so slices, times and numbers written in a preset or an override mean what they say."""


def _number_or_text(constructor):
    def construct(loader, node):
        text = loader.construct_scalar(node)
        if ":" in text:
            return text
        try:
            return constructor(loader, node)
        except ValueError as err:  # e.g. more digits than Python reads (4,300): an error of the YAML, with its place
            raise yaml.constructor.ConstructorError(None, None, f"cannot read the number {text[:12]}... "
                                                    f"({len(text):,} characters): {err}", node.start_mark) from None
    return construct


def _construct_int(loader, node):
    text = loader.construct_scalar(node).replace("_", "")
    digits = text.lstrip("+-")
    if len(digits) > 1 and digits[0] == "0" and all(c in "0123456789" for c in digits):  # not 0x.., 0b..
        return int(text)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _number_or_text(_construct_int))
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _number_or_text(yaml.SafeLoader.construct_yaml_float))
# YAML 1.1 has no integer with a leading zero and a digit above 7 (09 is text there): read it as the number
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0[0-9_]+$"), list("-+0"))


def load_yaml_text(text: str):
    """YAML as every config of the project reads it (safe, no base-60 numbers)."""
    return yaml.load(text, Loader=_ConfigLoader)


# ----------------------------------------------------------------------------------------------------------------
# Generic strict loading of dataclass trees


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """``value`` as type ``tp`` (a resolved annotation), or a `ConfigError` naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        # YAML 1.1 reads 5e8 as a string and 5.0e8 as a float: accept both when the number is a whole one.
        try:
            number = float(str(value).replace("_", ""))
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:  # PyYAML reads 1e-4 (no dot) as a string
            number = float(value) if isinstance(value, (int, float)) else float(str(value))
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        except OverflowError:  # an integer beyond a float's range
            number = math.inf
        if not math.isfinite(number):  # .inf / .nan in YAML: no setting of the project means that
            raise ConfigError(f"{where}: {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, (bool, int, float, datetime.date)):  # text YAML took for a number, a date, yes / no
            raise ConfigError(f"{where}: expected a string, got {value!r} (YAML reads that as a "
                              f"{type(value).__name__}; put it in quotes to keep it text)")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")  # pragma: no cover - a config bug


def from_dict(cls, data, where: str = "config"):
    """Build dataclass ``cls`` from a mapping, strictly: unknown keys and wrong types raise `ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {sorted(f.name for f in dataclasses.fields(cls))}, got "
                          f"{data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {names}")
    values = {name: _coerce(data[name], hints[name], f"{where}.{name}") for name in names if name in data}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(obj) -> dict:
    """A dataclass tree as plain YAML/JSON-ready data (tuples become lists)."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(obj))


class _Whole(dict):
    """A mapping given whole as an override's value (``--model.overrides={hidden_size: 64}``): `merge` puts it in
    place of the mapping there (``{}`` empties it) instead of merging it key by key, as a dotted key does."""


def parse_overrides(args: list[str] | None) -> dict:
    """``["--train.max_steps=10", "--optim.lr", "3e-4"]`` -> ``{"train": {"max_steps": 10}, "optim": {...}}``.

    Values are parsed as YAML (``10`` is an int, ``[0.9,0.98]`` a list, ``null`` None); a key may go deeper than a
    section (``--model.overrides.hidden_size=64`` sets one key; ``--model.overrides={...}`` the whole mapping).
    """
    result: dict = {}
    args = list(args or [])
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"override {arg!r}: expected --section.key=value")
        key, eq, text = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override {arg!r} has no value: write --{key}=VALUE")
            text = args[i + 1]
            i += 1
        i += 1
        parts = key.replace("-", "_").split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {arg!r}: expected --section.key=value (e.g. --train.max_steps=100)")
        try:
            value = load_yaml_text(text) if text != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {arg!r}: the value is not valid YAML ({err})") from None
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = _Whole(value) if isinstance(value, dict) else value
    return result


def merge(base: dict, overrides: dict) -> dict:
    """``overrides`` laid over ``base`` (mappings merged key by key, except a mapping given whole; everything else
    replaced). The result holds plain dicts only."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and not isinstance(value, _Whole) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, dict):
            out[key] = merge({}, value)
        else:
            out[key] = value
    return out


def read_yaml(path, what: str = "config", presets: str | None = None) -> dict:
    """A YAML file that must hold a mapping. ``what`` / ``presets`` name the kind of file and where presets live, for
    the error when it is missing (e.g. "fine-tune config", "configs/finetune/")."""
    path = Path(path)
    if not path.is_file():
        where = f" (presets live in {presets})" if presets else ""
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{where}")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(cls, path=None, overrides: list[str] | dict | None = None, *, what: str = "config",
                presets: str | None = None):
    """Read ``path`` (YAML; None: the defaults), lay ``overrides`` over it, build ``cls`` strictly."""
    data = read_yaml(path, what, presets) if path is not None else {}
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    return from_dict(cls, data, where=str(path) if path is not None else "config")
