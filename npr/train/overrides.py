"""Config resolution: defaults < preset < YAML file < command-line flags, with clear errors.

Flags are generated from the dataclass fields (``--learning-rate`` and ``--learning_rate``
both work) and carry the field's help text. A YAML file is a flat mapping of field names to
values (the layout of ``RUN/config.yaml``). An unknown field, a value of the wrong type or
shape (a list where a float belongs), a field set twice, or a value the config refuses (a
negative learning rate) is an error that names where it was set (``file.yaml:LINE``, ``--flag``
or the preset), the field, and the closest valid name or an example of a valid value.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import yaml

from npr.train.config import ConfigError
from npr.train.presets import PRESETS

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


def _field_type(cls: type, name: str) -> tuple[type, bool]:
    """(base type, accepts None) of a config field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_field(cls: type, name: str, where: str) -> None:
    """Raise ``ConfigError`` when ``name`` is not a field of ``cls``; ``where`` says where it was found."""
    valid = [f.name for f in fields(cls)]
    if name not in valid:
        raise ConfigError(
            f"{where}: unknown config field {name!r} for {cls.__name__}{_suggest(name, valid)}; "
            f"valid fields: {', '.join(valid)}"
        )


def _example(cls: type, name: str, base: type) -> str:
    default = next((f.default for f in fields(cls) if f.name == name), MISSING)
    if default is not MISSING and default is not None and not isinstance(default, (dict, list)):
        return f"{name}: {json.dumps(default) if isinstance(default, (bool, str)) else default}"
    return f"{name}: " + {bool: "true", int: "8", float: "0.5", str: "text"}.get(base, "value")


def convert_value(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` (a string from the command line or a YAML scalar) as the type of field ``name``."""
    base, optional = _field_type(cls, name)
    text = value.strip().lower() if isinstance(value, str) else None
    if value is None or (optional and text in _NONE):
        if optional:
            return None
        raise ConfigError(
            f"{where}: config field {name!r} cannot be empty (null); give a {base.__name__}, "
            f"e.g. `{_example(cls, name, base)}`"
        )
    try:
        if isinstance(value, (dict, list, tuple, set)):
            raise ValueError  # a YAML mapping or list where a single value belongs
        if base is bool:
            if isinstance(value, bool):
                return value
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool) or not math.isfinite(float(value)):
                raise ValueError
            return float(value)
        if base is str:
            return str(value)
    except (ValueError, TypeError, OverflowError):
        pass
    else:
        return value
    kind = "true or false" if base is bool else "a finite number" if base is float else f"a {base.__name__}"
    shape = {dict: "a mapping", list: "a list"}.get(type(value), "")
    raise ConfigError(
        f"{where}: config field {name!r} must be {kind}{' or null' if optional else ''}, got "
        f"{shape + ' ' if shape else ''}{value!r}; write it as one value, e.g. "
        f"`{_example(cls, name, base)}`"
    )


def _yaml_items(path: Path, text: str) -> list[tuple[str, Any, int]]:
    """(key, value, 1-based line) of each entry of a flat YAML mapping, in file order."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return []
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{path}:{node.start_mark.line + 1}: expected a mapping of `field: value` lines")
        items = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{path}:{line}: a key must be a field name, not a list or mapping")
            items.append((key_node.value, loader.construct_object(value_node, deep=True), line))
        return items
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(
            f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); write one `field: value` per line"
        ) from e
    finally:
        loader.dispose()


def read_yaml_layer(path: str | Path, cls: type) -> tuple[dict[str, Any], dict[str, str]]:
    """(typed fields, field -> ``file:line`` where it was set) of a flat YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; pass --config with a YAML file of `field: value` lines")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, value, line in _yaml_items(path, text):
        where = f"{path}:{line}"
        check_field(cls, key, where)
        if key in origins:
            raise ConfigError(f"{where}: config field {key!r} is set twice (first at {origins[key]}); keep one line")
        values[key] = convert_value(cls, key, value, where)
        origins[key] = where
    return values, origins


def read_yaml_overrides(path: str | Path, cls: type) -> dict[str, Any]:
    """The fields set by a YAML file (a flat mapping), typed; errors name the file and line."""
    return read_yaml_layer(path, cls)[0]


def preset_overrides(stage: str, preset: str | None, cls: type) -> dict[str, Any]:
    if preset is None:
        return {}
    presets = PRESETS[stage]
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r} for {stage}; choose one of {', '.join(presets)}")
    for name in presets[preset]:
        check_field(cls, name, f"preset {preset!r}")
    return dict(presets[preset])


def build_config(cls: type, *layers: dict[str, Any], origins: dict[str, str] | None = None) -> Any:
    """``cls`` from its defaults with each layer of overrides applied in turn.

    A ``ConfigError`` from the config's own checks is prefixed with where its field was set
    (``origins``: field -> ``file.yaml:LINE``, ``--flag`` or ``preset 'tiny'``).
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    try:
        return cls(**merged)
    except ConfigError as e:
        names = [n for group in re.findall(r"config field '([\w/]+)'", str(e)) for n in group.split("/")]
        where = list(dict.fromkeys((origins or {})[n] for n in names if n in (origins or {})))
        if not where:
            raise
        raise ConfigError(f"{', '.join(where)}: {e}") from e


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def resolve_config(
    stage: str,
    cls: type,
    preset: str | None = None,
    config_path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    base_origins: dict[str, str] | None = None,
) -> Any:
    """The config of ``stage``: ``base`` (or defaults) < preset < YAML < flags; errors say which
    of them set the offending field."""
    preset_layer = preset_overrides(stage, preset, cls)
    origins = dict(base_origins or {})
    origins.update({k: f"preset {preset!r}" for k in preset_layer})
    layers = [base or {}, preset_layer]
    if config_path is not None:
        values, yaml_origins = read_yaml_layer(config_path, cls)
        layers.append(values)
        origins.update(yaml_origins)
    flag_layer = {k: convert_value(cls, k, v, _flag(k)) for k, v in (flags or {}).items()}
    origins.update({k: _flag(k) for k in flag_layer})
    layers.append(flag_layer)
    return build_config(cls, *layers, origins=origins)


# ----------------------------------------------------------------------------- argparse


FLAG_PREFIX = "cfg__"


def _metavar(cls: type, name: str) -> str:
    base, optional = _field_type(cls, name)
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(base, "STR") + ("|none" if optional else "")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag (alias ``--field_name``) per config field, with its help text."""
    group = parser.add_argument_group(f"{cls.__name__} fields (override the preset and --config)")
    for f in fields(cls):
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        default = f.default if f.default is not MISSING else None
        choices = f.metadata.get("choices")
        help_text = (
            f.metadata.get("help", "")
            + f" [default: {default}"
            + (f"; one of {', '.join(map(str, choices))}]" if choices else "]")
        )
        group.add_argument(
            *names,
            dest=FLAG_PREFIX + f.name,
            default=argparse.SUPPRESS,
            metavar=_metavar(cls, f.name),
            help=help_text.replace("%", "%%"),
        )


def flags_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The config fields given on the command line, as raw strings."""
    return {k[len(FLAG_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(FLAG_PREFIX)}


def unknown_flag_error(unknown: list[str], cls: type, command: str) -> ConfigError:
    """A ``ConfigError`` for flags argparse did not recognise, with the closest field name."""
    flag = next((u for u in unknown if u.startswith("--")), unknown[0])
    name = flag.lstrip("-").split("=")[0].replace("-", "_")
    valid = [f.name for f in fields(cls)]
    return ConfigError(
        f"{command}: unknown flag {flag!r}: {cls.__name__} has no field {name!r}"
        f"{_suggest(name, valid)}; see `{command} --help` for the fields"
    )


# ----------------------------------------------------------------------------- YAML out


WRITTEN_MARK = "# npr: values as written, to detect edits on --resume: "


def config_to_yaml(config: Any, header: str = "") -> str:
    """A flat ``field: value`` YAML of ``config`` (readable back by ``--config``), ending with a
    comment that records the values as written (``written_values`` reads it back)."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    values = asdict(config)
    body = yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
    return comment + body + WRITTEN_MARK + json.dumps(values, ensure_ascii=False) + "\n"


def written_values(path: str | Path) -> dict[str, Any] | None:
    """The values a run wrote into its ``config.yaml`` (None for a file without the record)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith(WRITTEN_MARK):
            try:
                return json.loads(line[len(WRITTEN_MARK) :])
            except ValueError:
                return None
    return None


def config_differences(a: Any, b: Any) -> dict[str, tuple[Any, Any]]:
    """field -> (value in a, value in b) for every field that differs."""
    da, db = asdict(a), asdict(b)
    return {k: (da[k], db.get(k)) for k in da if da[k] != db.get(k)}


# ----------------------------------------------------------------------------- --show-config


def resolve_config_with_sources(
    stage: str,
    cls: type,
    preset: str | None = None,
    config_path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    base_label: str = "run config",
) -> tuple[dict[str, Any], dict[str, str], ConfigError | None]:
    """What ``resolve_config`` resolves, as ``(values, sources, error)``: every field's value; the
    layer that set it (``default``, ``preset NAME``, ``file PATH``, ``flag``, or ``base_label`` for
    ``base``, e.g. a resumed run's config); and the error the config class raises on these
    values (None when they form a valid config). Unknown fields and bad values still raise."""
    layers = [(base_label, base or {}), (f"preset {preset}", preset_overrides(stage, preset, cls))]
    if config_path is not None:
        layers.append((f"file {config_path}", read_yaml_overrides(config_path, cls)))
    layers.append(("flag", {k: convert_value(cls, k, v, f"--{k.replace('_', '-')}") for k, v in (flags or {}).items()}))
    values = {f.name: f.default for f in fields(cls)}
    sources = dict.fromkeys(values, "default")
    for label, layer in layers:
        values.update(layer)
        sources.update(dict.fromkeys(layer, label))
    try:
        values = asdict(build_config(cls, *(layer for _, layer in layers)))
    except ConfigError as e:  # e.g. a required field the user passes on the command line
        return values, sources, e
    return values, sources, None


def config_to_annotated_yaml(values: dict[str, Any], sources: dict[str, str], header: str = "") -> str:
    """Flat ``field: value`` YAML (readable back by ``--config``) with each field's source as a
    trailing comment."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, value in values.items():
        comment = sources.get(name, "default")
        if isinstance(value, (list, dict)):  # one line: name: [a, b]
            flow = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 30)
            text = f"{name}: {flow.strip()}"
        else:
            text = yaml.safe_dump({name: value}, sort_keys=False, allow_unicode=True, width=1 << 30).rstrip("\n")
        if "\n" in text:  # a multi-line scalar cannot carry a trailing comment
            lines += [f"# {name}: {comment}", text]
        else:
            lines.append(f"{text}  # {comment}")
    return "\n".join(lines) + "\n"
