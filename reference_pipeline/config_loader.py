"""A small YAML-to-dataclass loader: nested dataclasses from YAML plus ``key.sub=value`` overrides.

No registries and no magic: a config is a dataclass whose fields have defaults; a YAML file
(read with :func:`yaml.safe_load`) overrides some of them, and command-line overrides such as
``--set train.steps=200 --set train.milestones=[0.8,0.9]`` override those. Every value is checked
against the field's type annotation and coerced where it is unambiguous (a YAML list to a tuple,
an integer to a float, ``"1e-4"`` — which YAML 1.1 reads as a string — to a float). Unknown keys are
rejected with the list of valid keys at that level and a "did you mean" suggestion; a bad value is
rejected naming the key, the value and the expected type::

    cfg = load_config(TrainConfig, "train.yaml", ["steps=50", "amp=bf16"])
    save_config(cfg, run_dir / "train_config.yaml")      # atomic; load_config reads it back equal

The pipeline's own configs live in :mod:`reference_pipeline.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .atomic import atomic_write_text
from .errors import UserError

__all__ = ["ConfigError", "apply_overrides", "config_from_dict", "config_to_dict", "load_config", "save_config"]

ConfigT = TypeVar("ConfigT")

_NULL_WORDS = {"null", "~", "none", "None", "NULL", ""}


class ConfigError(UserError):
    """A configuration file or override is invalid (the message names the key and what was expected)."""


# ----------------------------------------------------------------------------- type coercion


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _bad(key: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}){extra}")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it where unambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _bad(key, value, tp, " (a mapping of its fields)")
        return _build(tp, value, key)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise _bad(key, value, tp)
    if origin is Literal:
        for option in args:
            if value == option and type(value) is type(option):
                return option
        raise ConfigError(f"config key {key!r}: expected one of {list(args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, value, tp, " (write true or false)")
    if tp is int:
        if isinstance(value, bool):
            raise _bad(key, value, tp)
        if isinstance(value, int):
            return value
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
        raise _bad(key, value, tp)
    if tp is float:
        if isinstance(value, bool):
            raise _bad(key, value, tp)
        number = _as_number(value)
        if number is None:
            raise _bad(key, value, tp)
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, value, tp, " (quote it in YAML)")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _bad(key, value, tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, tp, " (a list)")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _bad(key, value, tp, f" (a list of exactly {len(args)} items)")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(key, value, tp, " (a list)")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(key, value, tp, " (a mapping)")
        if not args:
            return dict(value)
        return {_coerce(k, args[0], f"{key}.<key>"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _bad(key, value, tp)
    raise ConfigError(f"config key {key!r}: unsupported field type {_type_name(tp)}")


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _unknown_key(key: str, prefix: str, valid: Sequence[str]) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {full!r}. Valid keys at this level: {', '.join(valid)}.{hint}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _build(cls: type[ConfigT], data: Mapping[str, Any], prefix: str = "") -> ConfigT:
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            raise _unknown_key(str(key), prefix, list(types_))
    kwargs = {key: _coerce(value, types_[key], f"{prefix}.{key}" if prefix else key) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from error
    except ValueError as error:
        raise ConfigError(f"{prefix or cls.__name__}: {error}") from error


def config_from_dict(cls: type[ConfigT], data: Mapping[str, Any]) -> ConfigT:
    """Build a (nested) dataclass config from a mapping, checking every key and value.

    Args:
        cls: the dataclass type.
        data: field values (nested mappings for nested dataclasses); missing fields keep defaults.

    Returns:
        The config.

    Raises:
        ConfigError: on an unknown key, a value of the wrong type or a value the dataclass rejects.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"a {cls.__name__} config must be a mapping of keys to values, got {type(data).__name__}")
    return _build(cls, data)


def _strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config mapping (before validation).

    Values are parsed with :func:`yaml.safe_load` (``3``, ``0.5``, ``true``, ``null``, ``[1, 2]``),
    except for ``str`` / ``Path`` fields, which take the text as written. Keys are checked against
    the dataclass fields level by level.

    Args:
        cls: the dataclass type the mapping describes.
        data: the raw mapping (not modified).
        overrides: strings ``"a.b.c=value"`` (a leading ``--set`` word is not part of them).

    Returns:
        A new nested mapping with the overrides applied.

    Raises:
        ConfigError: on a malformed override or an unknown key.
    """
    result = _deep_copy(data)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key.sub=value")
        dotted, text = override.split("=", 1)
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {override!r}: empty key component in {dotted!r}")
        node, node_cls, prefix = result, cls, ""
        for depth, part in enumerate(parts):
            types_ = _field_types(node_cls)
            if part not in types_:
                raise _unknown_key(part, prefix, list(types_))
            field_type = _strip_optional(types_[part])
            prefix = f"{prefix}.{part}" if prefix else part
            if depth == len(parts) - 1:
                if field_type in (str, Path) and text.strip() not in _NULL_WORDS:
                    node[part] = text
                else:
                    try:
                        node[part] = yaml.safe_load(text)
                    except yaml.YAMLError as error:
                        raise ConfigError(f"override {override!r}: cannot parse value {text!r}: {error}") from error
            else:
                if not (dataclasses.is_dataclass(field_type) and isinstance(field_type, type)):
                    raise ConfigError(f"override {override!r}: {prefix!r} is a {_type_name(field_type)}, not a section")
                child = node.get(part)
                if not isinstance(child, dict):
                    child = config_to_dict(child) if dataclasses.is_dataclass(child) else {}
                    node[part] = child
                node, node_cls = child, field_type
    return result


def _defaults(cls: type) -> dict[str, Any]:
    """The default instance of ``cls`` as a nested mapping (``{}`` if ``cls`` has required fields).

    Starting from it keeps the defaults a parent sets for a nested section (e.g. a stage's own
    learning rates) when a file or an override changes only some keys of that section.
    """
    try:
        return config_to_dict(cls())
    except TypeError:
        return {}


def _merge(base: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` laid over ``base``, section by section (nested mappings merge, other values replace)."""
    merged = _deep_copy(base)
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = _deep_copy(value) if isinstance(value, Mapping) else value
    return merged


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(
    cls: type[ConfigT],
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
) -> ConfigT:
    """Load a dataclass config: defaults, then a YAML file, then ``key.sub=value`` overrides.

    Args:
        cls: the (possibly nested) dataclass type.
        path: a YAML file (read with :func:`yaml.safe_load`), or ``None`` for the defaults.
        overrides: ``"key.sub=value"`` strings applied after the file.

    Returns:
        The validated config.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ConfigError: on YAML syntax errors (with the file and line), unknown keys (with the valid
            keys), values of the wrong type (naming key, value and expected type) or values the
            dataclass rejects.
    """
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {error}") from error
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return config_from_dict(cls, apply_overrides(cls, _merge(_defaults(cls), data), overrides))
    except ConfigError as error:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML-safe data (tuples become lists, paths strings).

    Args:
        config: a dataclass instance.

    Returns:
        Nested dicts, lists and scalars; :func:`config_from_dict` turns it back into an equal config.

    Raises:
        TypeError: if ``config`` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return _plain(config)


def save_config(config: Any, path: str | os.PathLike[str]) -> Path:
    """Write a config as YAML atomically (temporary file, fsync, rename).

    Args:
        config: a dataclass instance.
        path: destination; parent folders are created.

    Returns:
        The destination path.

    Raises:
        OSError: if the file cannot be written (the previous file, if any, is left intact).
    """
    return atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
