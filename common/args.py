"""Typed dataclass arguments, read once: from a YAML mapping, from the command line, or both.

    args = parse_args(PretrainArgs)  # --config FILE.yaml gives values, --field value flags override them
    recipe = load_dataclass(Recipe, mapping, error=RecipeError)

`load_dataclass` builds a (nested) dataclass from a mapping and checks every value against its type:
nested dataclasses, ``X | None``, ``list[...]``, ``dict[...]``, bool, int, float, str, Path and
``Literal[...]`` choices. An unknown or misspelt key, a missing required field, a wrong type or a value
outside the choices is one error that names the field's path (``sources[0].filters.quality.rules``).
Checks on values belong in each dataclass's ``__post_init__``; an error raised there (of the loader's
error class) is raised again with the path of the nested dataclass in front.

`parse_args` is transformers' HfArgumentParser (``--help`` prints each field's ``metadata["help"]``,
``--field-name`` is accepted for ``--field_name``, ``Literal`` fields take ``choices``, bool fields take
``--flag``, ``--flag false`` and ``--no_flag``, list fields take several values) with ``--config`` in
front of it: the YAML values and the flags given are merged and go through `load_dataclass`, so both
are checked the same way and ``__post_init__`` runs once.
"""

import argparse
import copy
import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
CONFIG_FLAG = "--config"
_UNSET = object()  # marks the fields not given on the command line


def did_you_mean(name: object, valid: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or an empty string."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_fields(
    names: Sequence[str], valid: Sequence[str], where: str, error: type[Exception] = ValueError
) -> Exception:
    """The error for unknown field names in a config file or on the command line."""
    hints = ", ".join(f"{name!r}{did_you_mean(name, valid)}" for name in names)
    fields = f"Valid fields: {', '.join(sorted(valid))}." if valid else "It takes no fields."
    return error(f"Unknown field(s) {hints} in {where}. {fields}")


# loading a mapping


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _union_members(tp) -> tuple | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _convert(tp, value, where: str, error: type[Exception]):
    members = _union_members(tp)
    if members is not None:
        optional = type(None) in members
        rest = [m for m in members if m is not type(None)]
        if value is None:
            if optional:
                return None
            raise error(f"{where}: must not be null")
        if len(rest) == 1:
            inner = rest[0]
            if optional and value is False and dataclasses.is_dataclass(inner):
                return None  # `language: false` switches a section off like `language: null`
            return _convert(inner, value, where, error)
        for member in rest:
            try:
                return _convert(member, value, where, error)
            except error:
                continue
        raise error(f"{where}: expected {' or '.join(_type_name(m) for m in rest)}, got {value!r}")
    if value is None:
        raise error(f"{where}: must not be null")
    if dataclasses.is_dataclass(tp):
        if value is True:
            return _build(tp, {}, where, error)
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where, error)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):
            names = [str(c) for c in choices]
            raise error(f"{where}: {value!r} is not one of {', '.join(names)}{did_you_mean(value, names)}")
        return value
    if origin is list or tp is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and item in (str, Any):
            value = [value]  # `files: a.txt` for `files: [a.txt]`
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: expected a list, got {value!r}")
        return [_convert(item, v, f"{where}[{i}]", error) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        key_t, val_t = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise error(f"{where}: expected a mapping, got {value!r}")
        return {_convert(key_t, k, where, error): _convert(val_t, v, f"{where}.{k}", error) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise error(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise error(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 3e-4, without a dot, as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise error(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, Path):
        if not isinstance(value, (str, Path)):
            raise error(f"{where}: expected a path, got {value!r}")
        return tp(value)
    raise TypeError(f"unsupported field type {_type_name(tp)} at {where}")


def _build(cls: type[T], data: dict, where: str, error: type[Exception]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise error(
                f"{where + ': ' if where else ''}unknown field '{key}'{did_you_mean(key, list(fields))}. "
                f"Valid fields: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name), error)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"{where + ': ' if where else ''}missing required field '{name}'")
    try:
        return cls(**kwargs)
    except error as e:  # from __post_init__: its message starts with a field name, or is about the whole
        if not where:
            raise
        msg = str(e)
        head = re.match(r"[A-Za-z_]\w*", msg)
        sep = "." if head and head.group() in fields and msg[head.end() : head.end() + 1] in (":", ".", "[") else ": "
        raise error(f"{where}{sep}{msg}") from None


def load_dataclass(cls: type[T], data: dict, where: str = "", error: type[Exception] = ValueError) -> T:
    """Build `cls` from a mapping (as read from YAML), checking every key and value; errors are `error`s naming the field."""
    if not isinstance(data, dict):
        raise error(f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields, got {data!r}")
    return _build(cls, data, where, error)


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file holding a mapping (empty file: an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of field: value.")
    return data


# the command line


def _yaml_mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{hidden_size: 64}}', got {text!r}")
    return value


def _take_config(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove `--config FILE` / `--config=FILE` from argv."""
    for i, arg in enumerate(argv):
        if arg == CONFIG_FLAG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"{CONFIG_FLAG} needs a YAML file path.")
            return argv[:i] + argv[i + 2 :], argv[i + 1]
        if arg.startswith(CONFIG_FLAG + "="):
            return argv[:i] + argv[i + 1 :], arg.split("=", 1)[1]
    return argv, None


def build_parser(*classes: type, config: bool = True, **kwargs) -> argparse.ArgumentParser:
    """The HfArgumentParser of `classes`, with `--config` (unless `config` is false) and dict fields read as YAML mappings."""
    from transformers import HfArgumentParser  # late: transformers is a heavy import

    doc = classes[0].__doc__ if len(classes) == 1 else None
    kwargs.setdefault("description", doc if doc and not doc.startswith(classes[0].__name__ + "(") else None)
    parser = HfArgumentParser(list(classes), allow_abbrev=False, **kwargs)
    hints = {name: tp for cls in classes for name, tp in typing.get_type_hints(cls).items()}
    for action in parser._actions:
        tp = hints.get(action.dest)
        if tp is dict or typing.get_origin(tp) is dict:
            action.type = _yaml_mapping
            action.metavar = "YAML_MAPPING"
    if config:
        parser.add_argument(
            CONFIG_FLAG, metavar="FILE.yaml", help="YAML file of field: value; flags given override it."
        )
    return parser


def _given(namespace: argparse.Namespace, names: list[str]) -> dict:
    return {name: value for name, value in vars(namespace).items() if name in names and value is not _UNSET}


def parse_args_into(classes: Sequence[type], argv: list[str] | None = None) -> tuple:
    """Several dataclasses from one command line (and one `--config` file holding all their fields)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [f.name for cls in classes for f in dataclasses.fields(cls) if f.init]
    if CONFIG_FLAG[2:] in names:
        raise TypeError(f"a field may not be called {CONFIG_FLAG[2:]!r}: {CONFIG_FLAG} names the YAML file")
    argv, config_path = _take_config(argv)
    parser = build_parser(*classes)
    wants_help = "-h" in argv or "--help" in argv
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("--") and a != "--"]
    if not wants_help and (bad := [f[2:].replace("-", "_") for f in flags if f not in parser._option_string_actions]):
        raise unknown_fields(bad, names, "the command line")
    config = {}
    if config_path is not None and not wants_help:
        config = read_yaml_mapping(config_path)
        if bad := [k for k in config if k not in names]:
            raise unknown_fields(bad, names, str(config_path))
    for action in parser._actions:
        if action.dest in config:
            action.required = False
    namespace = argparse.Namespace(**{name: _UNSET for name in names})
    parser.parse_args(argv, namespace=namespace)  # usage errors exit 2; --help prints and exits 0
    given = _given(namespace, names)
    values = {**config, **given}
    out = []
    for cls in classes:
        own = {f.name for f in dataclasses.fields(cls) if f.init}
        try:
            out.append(load_dataclass(cls, {k: v for k, v in values.items() if k in own}))
        except ValueError as e:  # a bad value from the file: name the file too
            head = re.match(r"[A-Za-z_]\w*", str(e))
            if type(e) is ValueError and head and head.group() in config and head.group() not in given:
                raise ValueError(f"{config_path}: {e}") from None
            raise
    return tuple(out)


def parse_args(cls: type[T], argv: list[str] | None = None) -> T:
    """`cls` from the command line: `--config FILE.yaml` gives values, other `--field value` flags override them."""
    (args,) = parse_args_into([cls], argv)
    return args


def parse_known_args(cls: type[T], argv: list[str] | None = None) -> tuple[T, list[str]]:
    """`cls` from the flags it knows, and the other arguments, for a command that passes them on (a sweep
    hands them to every run, which checks them). No `--config` file of its own: `config` may be a field."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, config=False)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    namespace = argparse.Namespace(**{name: _UNSET for name in names})
    _, rest = parser.parse_known_args(argv, namespace=namespace)
    return load_dataclass(cls, _given(namespace, names)), rest


def deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over`'s keys replacing its own; mappings are merged key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
