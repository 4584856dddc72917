"""Allowed ranges of numbers, checked before any work starts: config fields and argparse options.

Every int/float field has an allowed range ("[1, 1e6]", "(0, 1]", "[0, inf]"; brackets include the bound,
parentheses exclude it), declared next to the field with `setting`:

    max_steps: int = setting(1000, "[1, 1e9]")  # the comment is the flag's help

(or, in classes that still have one, in a RANGES dict). `check_ranges` (called first by each `validate`) refuses
a value outside it, naming the field and the range. Argparse commands use `int_in("[1, 1e6]")` or `float_in(...)`
as `type=`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing

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


def setting(default=dataclasses.MISSING, range: str | None = None, *, flag: str | None = None,
            old: tuple[str, ...] = (), factory=None):
    """Returns a dataclass field: its default (or `factory` for a list), its allowed range, and where its flag is
    not its name (`--out` for output_dir), the flag and the former flags kept as deprecated aliases (ldm.flags)."""
    if range is not None:
        parse_interval(range)
    metadata = {k: v for k, v in (("range", range), ("flag", flag), ("old", tuple(old))) if v}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_metadata(cls, name: str, key: str):
    """Returns metadata `key` of field `name` of dataclass `cls`, from the nearest class that declares it (a
    command's config may set a shared field's default again without repeating its range), else None."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and key in f.metadata:
            return f.metadata[key]
    return None


def ranges_of(cls) -> dict[str, str]:
    """Returns {field: allowed range} of a config dataclass: the ranges declared with `setting`, and the class's
    RANGES dict where it has one."""
    ranges = dict(getattr(cls, "RANGES", {}))
    for f in dataclasses.fields(cls):
        spec = field_metadata(cls, f.name, "range")
        if spec is not None:
            ranges[f.name] = spec
    return ranges


def numeric_fields(cls) -> list[str]:
    """Returns the names of the fields of dataclass `cls` whose type is int or float (optional ones too)."""
    names = []
    hints = typing.get_type_hints(cls)
    for name, hint in ((f.name, hints[f.name]) for f in dataclasses.fields(cls)):
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(a in (int, float) for a in args):
            names.append(name)
    return names


def check_ranges(cfg) -> None:
    """Raises ValueError naming the first int/float field of `cfg` outside its range (ranges_of)."""
    ranges = ranges_of(type(cfg))
    for name in numeric_fields(type(cfg)):
        value = getattr(cfg, name)
        if value is None or name not in ranges:
            continue
        if not in_interval(float(value), ranges[name]):
            flag = (field_metadata(type(cfg), name, "flag") or name).replace("_", "-")
            raise ValueError(f"{name}={value!r} is outside the allowed range {ranges[name]}; pass --{flag} within "
                             f"it ({type(cfg).__name__}'s field comments say where 0 means off)")


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


def check_multiple(name: str, value, factor: int, of: str = "the VAE's downsampling factor") -> None:
    """Raises ValueError unless `value` is a positive integer multiple of `factor`, naming the two nearest valid
    values: an image side the VAE cannot divide would give latents of another size than asked."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % factor == 0:
        return
    below = int(value // factor * factor) if isinstance(value, (int, float)) else 0
    fix = f"use {name}={below} or {below + factor}" if below >= factor else f"use {name}={factor} or larger"
    raise ValueError(f"{name}={value} is not a positive multiple of {factor} ({of}); {fix}")
