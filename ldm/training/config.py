"""Typed config dataclasses: defaults in code, then a YAML file, then `--key value` flags; strict.

    cfg = parse_config(TrainLDMConfig, ["--config", "configs/sd15.yaml", "--learning_rate", "5e-5"])

Unknown keys and values of the wrong type raise ValueError naming the key. Flags accept `--key value`,
`--key=value`, and dashes for underscores (`--learning-rate`). A bool flag given alone means true.

Every int/float field has an allowed range, declared in the class's RANGES dict ("[1, 1e6]", "(0, 1]", "[0, inf]";
brackets include the bound, parentheses exclude it); `check_ranges` (called first by each `validate`) refuses a
value outside it, naming the field and the range. Argparse commands use `number_in(int, lo, hi)` as `type=`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing

import yaml


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value, hint):
    """Returns `value` as type `hint` (int, float, bool, str, optional, tuple/list of those), or raises."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} wants a list, got {value!r}")
        item = args[0] if args else str
        return origin(_coerce(key, v, item) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} wants true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} wants an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config key {key!r} wants a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key {key!r} wants a string, got {value!r}")
    raise TypeError(f"config key {key!r} has an unsupported type {hint}")


def apply_overrides(cfg, overrides: dict, source: str = "overrides"):
    """Returns a copy of `cfg` with `overrides` applied; unknown keys and wrong types raise ValueError."""
    types_ = _field_types(type(cfg))
    unknown = sorted(set(overrides) - set(types_))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {source}; valid keys: {sorted(types_)}")
    values = {k: _coerce(k, v, types_[k]) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **values)


def _from_text(key: str, text: str, hint):
    """Returns a flag's text parsed for a field of type `hint` (then checked by _coerce)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", "~"):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is str:
        return text
    if hint is bool:
        lowered = text.lower()
        if lowered in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return lowered in ("true", "yes", "1", "on")
        raise ValueError(f"config key {key!r} wants true/false, got {text!r}")
    if hint in (int, float):
        try:
            return int(text) if hint is int else float(text)
        except ValueError:
            raise ValueError(f"config key {key!r} wants {'an integer' if hint is int else 'a number'}, "
                             f"got {text!r}") from None
    value = yaml.safe_load(text)  # lists: "[1, 2]" or "1,2"
    return value if isinstance(value, list) else [yaml.safe_load(v) for v in text.split(",")]


def flags_to_dict(argv: list[str], cls) -> tuple[str | None, dict]:
    """Returns (yaml path from --config or None, {key: value}) parsed from `--key value` flags."""
    types_ = _field_types(cls)
    config_path, out, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; write --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if types_.get(key) is bool and not takes_value:
                value = "true"
            elif not takes_value:
                raise ValueError(f"flag --{key} needs a value")
            else:
                value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config_path = value
            continue
        if key not in types_:
            raise ValueError(f"unknown flag --{key}; valid keys: {sorted(types_)}")
        out[key] = _from_text(key, value, types_[key])
    return config_path, out


def load_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_config(cls, argv: list[str] | None = None):
    """Returns cls() updated by the YAML file of `--config PATH` and then by the other `--key value` flags."""
    config_path, flags = flags_to_dict(list(argv or []), cls)
    cfg = cls()
    if config_path:
        cfg = apply_overrides(cfg, load_yaml(config_path), source=config_path)
    cfg = apply_overrides(cfg, flags, source="command-line flags")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict:
    """Returns the config as plain YAML-safe data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def format_config(cfg) -> str:
    """Returns the resolved config as YAML text, for printing at start."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip()


def add_config_arguments(parser, cls) -> None:
    """Adds `--config` and one `--key VALUE` option per field of `cls` to an argparse parser (for the CLI)."""
    parser.add_argument("--config", default=argparse.SUPPRESS, help="a YAML file of config keys (flags override it)")
    defaults = cls()
    for name, hint in _field_types(cls).items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        extra = dict(nargs="?", const="true") if hint is bool else {}  # `--use_ema` alone means true
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"default: {getattr(defaults, name)!r}", **extra)


def argv_from_args(args, cls) -> list[str]:
    """Returns the `--key value` list of the options given on the command line, for parse_config."""
    given = vars(args)
    argv = ["--config", given["config"]] if "config" in given else []
    for name in _field_types(cls):
        if name in given:
            argv += [f"--{name}", given[name]]
    return argv


_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])$")


def parse_interval(spec: str) -> tuple[float, float, bool, bool]:
    """Returns (lo, hi, lo included, hi included) of an interval written "[0, 1)", "(0, inf]" or "[1, 1e6]"."""
    match = _INTERVAL.match(spec.strip())
    if not match:
        raise ValueError(f"range {spec!r} is not an interval like '[0, 1)' or '(0, inf]'")
    left, lo, hi, right = match.groups()
    return float(lo), float(hi), left == "[", right == "]"


def in_interval(value: float, spec: str) -> bool:
    """Returns whether `value` lies in the interval `spec` (NaN never does)."""
    lo, hi, lo_closed, hi_closed = parse_interval(spec)
    if math.isnan(value):
        return False
    return (lo <= value if lo_closed else lo < value) and (value <= hi if hi_closed else value < hi)


def numeric_fields(cls) -> list[str]:
    """Returns the names of the fields of dataclass `cls` whose type is int or float (optional ones too)."""
    names = []
    for name, hint in _field_types(cls).items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(a in (int, float) for a in args):
            names.append(name)
    return names


def check_ranges(cfg) -> None:
    """Raises ValueError naming the first int/float field of `cfg` outside its range in type(cfg).RANGES."""
    ranges = getattr(type(cfg), "RANGES", {})
    for name in numeric_fields(type(cfg)):
        value = getattr(cfg, name)
        if value is None or name not in ranges:
            continue
        if not in_interval(float(value), ranges[name]):
            raise ValueError(f"{name}={value!r} is outside the allowed range {ranges[name]}; pass --{name} within "
                             f"it ({type(cfg).__name__}'s field comments say where 0 means off)")


def every(step: int, interval: int) -> bool:
    """Returns True on the steps that are multiples of `interval`; never when interval is 0 ("off")."""
    return interval > 0 and step % interval == 0


def number_in(kind: type, spec: str):
    """Returns an argparse `type=` function: `kind(text)` (int or float) if it lies in the interval `spec`, else
    argparse.ArgumentTypeError, which argparse reports with the option's name before any work starts."""
    parse_interval(spec)

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not in_interval(float(value), spec):
            raise argparse.ArgumentTypeError(f"{value!r} is outside the allowed range {spec}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its "invalid ... value" message
    return convert


def int_in(spec: str):
    """Returns an argparse `type=` for an integer in the interval `spec`, e.g. int_in("[1, 1000]")."""
    return number_in(int, spec)


def float_in(spec: str):
    """Returns an argparse `type=` for a number in the interval `spec`, e.g. float_in("[0, 100]")."""
    return number_in(float, spec)
