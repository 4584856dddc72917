"""Typed config dataclasses: defaults in code, then a YAML file, then `--key value` flags; strict.

    cfg = parse_config(TrainLDMConfig, ["--config", "configs/sd15.yaml", "--learning_rate", "5e-5"])

One way from a config dataclass to command-line flags, used by every command that has one (`ldm train`,
`ldm train-vae`, `ldm finetune`, `ldm demo`, through ldm.cli.train.config_command) and by the train/*.py scripts:

    add_config_arguments(parser, cls)   # --config FILE.yaml, and one option per field of cls
    cfg = config_from_args(cls, args)   # defaults, then the YAML file, then the flags given; then cfg.validate()

`parse_config(cls, argv)` is those two on a parser of its own whose errors raise ValueError instead of exiting.

Flag conventions (ldm/flags.py, the same for every command):
  * each field `name` is `--name-with-dashes VALUE` (`--name_with_underscores` and `--name=VALUE` work too), or
    the flag its `setting(flag=...)` names where the field's name is not the concept's (output_dir is `--out`;
    the field's own spelling is then a deprecated alias). Unknown flags and abbreviations are errors. `--help`
    lists every flag with its default and its comment in the source (the shared ones: base_config.py).
  * bool fields: `--flag` alone means true; `--flag false` (or true/yes/no/on/off/1/0) sets it either way.
  * list fields (e.g. validation_prompts): the items space-separated after the flag, each taken verbatim, so an
    item may hold commas: `--validation-prompts "a red, round thing" "a blue square"` (repeating the flag adds
    items). The flags replace the list of the YAML file or the default as a whole; `--validation-prompts []`
    (the text `[]` alone) empties it.
  * optional fields: the text none (or null, ~) means None.
  * numbers: typed here, then range-checked by the class's `validate()` (below), before any work starts.

Unknown keys and values of the wrong type, from the YAML file or from a flag, raise ValueError naming the key.

Every int/float field has an allowed range, declared next to it with ldm.ranges.setting.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing

import yaml

from ldm.flags import FlagParser, dashed
from ldm.ranges import field_metadata


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
    """Returns a flag's text parsed for a scalar field of type `hint` (then checked by _coerce)."""
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
    raise TypeError(f"config key {key!r} has an unsupported type {hint} for a flag")


def load_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def parse_config(cls, argv: list[str] | None = None):
    """Returns cls() updated by the YAML file of `--config PATH` and then by the other `--key value` flags
    (the conventions are in this module's docstring), validated. Bad flags raise ValueError naming the flag;
    `--help` prints every field with its default and exits."""
    module = sys.modules.get(cls.__module__)
    parser = ConfigArgumentParser(description=_first_line(getattr(module, "__doc__", None)), allow_abbrev=False)
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(list(argv or [])))


def config_to_dict(cfg) -> dict:
    """Returns the config as plain YAML-safe data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)


def format_config(cfg) -> str:
    """Returns the resolved config as YAML text, for printing at start."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip()


class ConfigArgumentParser(FlagParser):
    """An ArgumentParser whose errors raise ValueError naming the flag, instead of printing usage and exiting
    (for parse_config: scripts and tests get an exception, as from a bad YAML key)."""

    def error(self, message: str):
        missing = re.match(r"argument (-[^/:\s]+)\S*: expected (?:at least )?one argument", message)
        if missing:
            raise ValueError(f"flag {missing.group(1)} needs a value")
        unrecognized = re.match(r"unrecognized arguments: (.*)", message)
        if unrecognized:
            first = unrecognized.group(1).split()[0]
            if not first.startswith("-"):
                raise ValueError(f"unexpected argument {first!r}; write --key value")
            flag = first.partition("=")[0]
            close = difflib.get_close_matches(dashed(flag), self.visible_flags(), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"unknown flag {flag}{hint} (--help lists every flag)")
        raise ValueError(message)


def _first_line(text: str | None) -> str | None:
    return text.strip().splitlines()[0] if text and text.strip() else None


def _unwrap_optional(hint):
    """Returns `hint` without its None option (int | None -> int)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _list_item(hint):
    """Returns the item type of a list/tuple field (optional ones too), or None for a scalar field."""
    hint = _unwrap_optional(hint)
    if typing.get_origin(hint) in (list, tuple) or hint in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return args[0] if args else str
    return None


def _flag_text_type(key: str, hint):
    """Returns an argparse `type=`: the text parsed by _from_text, or the text itself where it does not parse,
    for config_from_args to refuse with the key's name (a ValueError: `ldm` prints it and exits with 2)."""
    def convert(text: str):
        try:
            return _from_text(key, text, hint)
        except ValueError:
            return text

    convert.__name__ = getattr(_unwrap_optional(hint), "__name__", "value")
    return convert


class _ListItemsAction(argparse.Action):
    """Adds the items after the flag (each occurrence adds more); the text `[]` alone empties the list."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, [] if list(values) == ["[]"] else items + list(values))


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """Returns {field: its trailing `# comment` in the source of the class or, where the class does not comment
    it, of the base class that declares it (base_config.py), continuation lines joined}; {} where the source
    cannot be read (a frozen install, a class made at run time)."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_class_comments(klass))
    return comments


def _class_comments(cls) -> dict[str, str]:
    """Returns {field: its trailing comment} of the fields declared in `cls`'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
        comments = {tok.start[0]: (tok.start[1], tok.string) for tok in
                    tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, IndentationError):
        return {}
    lines = source.splitlines()
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        row = node.end_lineno
        if row not in comments:
            continue
        parts = [comments[row][1]]
        row += 1  # comment-only lines indented past the field continue its comment
        while row in comments and lines[row - 1].lstrip().startswith("#") and comments[row][0] > node.col_offset:
            parts.append(comments[row][1])
            row += 1
        out[node.target.id] = " ".join(p.lstrip("#").strip() for p in parts).strip()
    return out


def show_default(value) -> str:
    """Returns a default as --help shows it: bools as true/false (a flag's spelling), None as none, else repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return repr(list(value) if isinstance(value, tuple) else value)


_METAVARS = {bool: "BOOL", int: "INT", float: "NUM", str: "TEXT"}


def _conventions(cls) -> str:
    """Returns the --help epilog: where settings come from, and how bool and list flags are written."""
    hints = _field_types(cls)
    text = ["Settings: the defaults above, then --config FILE.yaml, then the flags given."]
    if any(_unwrap_optional(h) is bool for h in hints.values()):
        text.append("A bool flag alone means true (--flag false sets false).")
    lists = [flag_name(cls, name) for name, h in hints.items() if _list_item(h) is not None]
    if lists:
        text.append(f"A list setting takes its items space-separated, commas kept: {lists[0]} 'a red, round "
                    f"thing' 'a cat'; {lists[0]} [] empties it.")
    text.append("Every flag may be spelled with underscores too (--max_steps).")
    text.append("Numbers outside their ranges are refused before any work.")
    return " ".join(text)


def flag_name(cls, name: str) -> str:
    """Returns the flag of field `name`: `--name-with-dashes`, or the one its setting(flag=...) names."""
    return "--" + (field_metadata(cls, name, "flag") or name).replace("_", "-")


def add_config_arguments(parser: FlagParser, cls) -> None:
    """Adds `--config FILE.yaml` and one option per field of dataclass `cls` to a FlagParser, spelled
    `--name-with-dashes` (the underscore spelling a hidden alias; a renamed field's former flags deprecated
    aliases), its help the field's default and comment (conventions: module docstring).

    Options absent from the command line are absent from the Namespace (argparse.SUPPRESS), so that
    config_from_args applies only the flags given, over the YAML file. Abbreviated flags are turned off."""
    parser.allow_abbrev = False  # --learning_rat must not quietly mean --learning_rate
    if parser.usage is None:
        parser.usage = "%(prog)s [-h] [--config FILE.yaml] [--KEY VALUE ...]"
    if parser.epilog is None:
        parser.epilog = _conventions(cls)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                        help="a YAML file of settings (the flags below with underscores, or the key named in "
                             "[yaml: ...]); flags override it")
    defaults, comments = cls(), field_comments(cls)
    for name, hint in _field_types(cls).items():
        flag = flag_name(cls, name)
        old = tuple(field_metadata(cls, name, "old") or ())
        if flag != dashed(f"--{name}"):
            old += (f"--{name}",)
        item = _list_item(hint)
        scalar = _unwrap_optional(hint)
        text = f"[default: {show_default(getattr(defaults, name))}]"
        if flag != dashed(f"--{name}"):
            text += f" [yaml: {name}]"
        if comments.get(name):
            text += " " + comments[name]
        options = dict(dest=name, default=argparse.SUPPRESS, help=text.replace("%", "%%"), deprecated=old)
        if item is not None:
            options.update(action=_ListItemsAction, nargs="+", type=_flag_text_type(name, item),
                           metavar=_METAVARS.get(item, "ITEM"), help=options["help"] + " (space-separated)")
        elif scalar is bool:
            options.update(nargs="?", const=True, type=_flag_text_type(name, hint), metavar="BOOL")
        else:
            options.update(type=_flag_text_type(name, hint), metavar=_METAVARS.get(scalar, "VALUE"))
        parser.add_argument(flag, **options)


def _flag_value(key: str, value, hint):
    """Returns a Namespace value typed for `hint`: text left by _flag_text_type is parsed again, which raises."""
    item = _list_item(hint)
    if item is not None and isinstance(value, (list, str)):
        return [_from_text(key, v, item) if isinstance(v, str) else v for v in ([value] if isinstance(value, str)
                                                                                    else value)]
    return _from_text(key, value, hint) if isinstance(value, str) else value


def config_from_args(cls, args: argparse.Namespace):
    """Returns cls() updated by the YAML file of `args.config` (if any) and then by the options of
    add_config_arguments given on the command line, validated (cfg.validate(): ranges, choices). Unknown YAML
    keys and values of the wrong type raise ValueError naming the key. Other Namespace entries are ignored."""
    given = vars(args)
    cfg = cls()
    if given.get("config"):
        cfg = apply_overrides(cfg, load_yaml(given["config"]), source=given["config"])
    flags = {name: _flag_value(name, given[name], hint) for name, hint in _field_types(cls).items() if name in given}
    cfg = apply_overrides(cfg, flags, source="command-line flags")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def every(step: int, interval: int) -> bool:
    """Returns True on the steps that are multiples of `interval`; never when interval is 0 ("off")."""
    return interval > 0 and step % interval == 0
