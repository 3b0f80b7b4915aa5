"""One command-line vocabulary for every fastsae command.

Every option is accepted with underscores (the seed's spelling) and with hyphens, plus any
older or shorter names it has had (aliases). Numbers are checked as they are parsed, so a bad
value is a one-line argparse error naming the option and the expected value, before any model
is loaded. Help pages show each default.
"""
from __future__ import annotations

import argparse
import math
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default (as the help text words it, where it does)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def say(args, line: str) -> None:
    """A status line on stderr (which model, which text), unless --quiet."""
    if not args.quiet:
        print(line, file=sys.stderr)


def add_option(parser, name: str, *aliases: str, **kwargs):
    """``--name`` in both spellings, and each alias in both, all filling ``args.name``."""
    spellings = []
    for n in (name, *aliases):
        for s in (f"--{n}", f"--{n.replace('_', '-')}"):
            if s not in spellings:
                spellings.append(s)
    return parser.add_argument(*spellings, dest=kwargs.pop("dest", name), **kwargs)


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"int>={minimum}"
    return parse


def float_above(minimum: float, inclusive: bool = False):
    """An argparse type: a finite number > minimum (>= with inclusive)."""
    def parse(text: str) -> float:
        value = _number(float, text)
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if inclusive else '>'} {minimum}, "
                                             f"got {text!r}")
        return value
    parse.__name__ = f"float>{minimum}"
    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
positive_float = float_above(0.0)
nonnegative_float = float_above(0.0, inclusive=True)
