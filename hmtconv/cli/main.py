"""``hmtconv`` entry point: one argparse parser with a subparser per registered command."""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from .registry import COMMANDS


class Parser(argparse.ArgumentParser):
    """Usage mistakes print one line (no usage block) and exit 2, like UserErrors."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default; a None default is left to the help text to explain."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = any(action.default is value for value in (None, False, argparse.SUPPRESS))
        if action.option_strings and not unset and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> Parser:
    from .. import __version__

    parser = Parser(prog="hmtconv", description="ANN-to-SNN conversion with Harmony Multi-Threshold neurons.")
    parser.add_argument("--version", action="version", version=f"hmtconv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS.values():
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a UserError prints ``hmtconv: error: ...`` to stderr and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except UserError as error:
        print(f"hmtconv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hmtconv: interrupted", file=sys.stderr)
        return 130
