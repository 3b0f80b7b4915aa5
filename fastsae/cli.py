"""The ``fastsae`` command line."""
from __future__ import annotations

import argparse
import sys

from fastsae._version import __version__

# Subcommands live in their own modules; each registers a parser and a handler.
_SUBCOMMAND_MODULES = [
    "fastsae.cli_info",
    "fastsae.cli_eval", "fastsae.cli_viz",
    "fastsae.cli_train",
    "fastsae.cli_demo",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="fastsae", description="Sparse autoencoders with fused Triton kernels")
    parser.add_argument("--version", action="version", version=f"fastsae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
