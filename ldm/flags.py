"""The one flag convention of every `ldm` command and train/*.py script: ldm.flags.FlagParser.

  * Flags are spelled with dashes (`--max-steps`, `--guidance-scale`); the underscore spelling of every flag
    (`--max_steps`) is accepted too, as a hidden alias: not shown in --help, no warning.
  * One name per concept across the commands (`--out`, `--model`, `--steps`, `--guidance-scale`, ...); a former
    name is a hidden alias that prints `PROG: --old is deprecated, use --new` on stderr once.
  * A list flag takes its items space-separated after one flag (`--schedulers ddim lms`); items may hold commas.
  * A misspelt flag is refused by the command's own parser, with the command's usage and the nearest valid flag.
  * Abbreviations are off: `--learning-rat` never quietly means `--learning-rate`.

Only the standard library: every layer may use it.
"""
from __future__ import annotations

import argparse
import difflib
import sys


def underscored(flag: str) -> str:
    """Returns a long flag's underscore spelling: --max-steps -> --max_steps."""
    return "--" + flag[2:].replace("-", "_")


def dashed(flag: str) -> str:
    """Returns a long flag's dash spelling: --max_steps -> --max-steps."""
    return "--" + flag[2:].replace("_", "-")


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser with the convention above: `add_argument(..., deprecated=["--old_name"])` keeps former
    names as hidden aliases; the sub-command parsers it makes are FlagParsers too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.deprecated_aliases: dict[str, str] = {}  # former flag -> its canonical flag

    def add_argument(self, *names, deprecated=(), **kwargs):
        action = super().add_argument(*names, **kwargs)
        canonical = next((n for n in names if n.startswith("--")), None)
        for name in names:
            if name.startswith("--"):
                self._add_hidden(underscored(name), action)
        for old in deprecated:
            for spelling in dict.fromkeys((old, dashed(old), underscored(old))):
                self._add_hidden(spelling, action)
                self.deprecated_aliases[spelling] = canonical
        return action

    def _add_hidden(self, flag: str, action: argparse.Action) -> None:
        """Makes `flag` parse as `action` without listing it in --help or usage."""
        taken = self._option_string_actions.get(flag)
        if taken is action:
            return
        if taken is not None:
            raise ValueError(f"flag {flag} is already {taken.dest!r}'s; it cannot also name {action.dest!r}")
        self._option_string_actions[flag] = action

    def visible_flags(self) -> list[str]:
        """Returns the long flags --help shows, in order."""
        return [s for a in self._actions if a.help is not argparse.SUPPRESS for s in a.option_strings
                if s.startswith("--")]

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self._warn_deprecated(args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self.is_command:  # this command's error and usage, not the top level's
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._nearest(extras)}")
        return namespace, extras

    is_command = False  # set on the parsers of sub-commands by add_subparsers' parsers

    def _warn_deprecated(self, args: list[str]) -> None:
        warned = set()
        for arg in args:
            if arg == "--":
                break
            flag = arg.partition("=")[0]
            if flag in self.deprecated_aliases and flag not in warned:
                warned.add(flag)
                print(f"{self.prog}: {flag} is deprecated, use {self.deprecated_aliases[flag]}", file=sys.stderr)

    def _nearest(self, extras: list[str]) -> str:
        """Returns '; did you mean --x?' for the first unknown flag with a close valid one, else ''."""
        flag = next((e.partition("=")[0] for e in extras if e.startswith("--")), None)
        if flag is None:
            return ""
        close = difflib.get_close_matches(dashed(flag), self.visible_flags(), n=1)
        return f"; did you mean {close[0]}?" if close else ""

    def add_subparsers(self, **kwargs):
        action = super().add_subparsers(**kwargs)
        add_parser = action.add_parser

        def add_command_parser(name, **kw):
            parser = add_parser(name, **kw)
            parser.is_command = True
            return parser

        action.add_parser = add_command_parser
        return action


class SplitCommas(argparse.Action):
    """A list flag (nargs="+") that also takes its former form, one comma-separated item (`--schedulers ddim,lms`),
    with a deprecation message."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1 and isinstance(values[0], str) and "," in values[0]:
            print(f"{parser.prog}: {option_string} a,b is deprecated, write the items space-separated: "
                  f"{option_string} {' '.join(values[0].split(','))}", file=sys.stderr)
            values = [v.strip() for v in values[0].split(",") if v.strip()]
        setattr(namespace, self.dest, list(values))
