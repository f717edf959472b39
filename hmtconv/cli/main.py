"""``hmtconv`` entry point: one argparse parser with a subparser per registered command."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from .. import distributed
from ..allocator import keep_freed_memory
from ..errors import UserError
from ..models.user_code import import_code
from .registry import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1]


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
    parser.commands = {}  # name -> its parser, which reports options it does not know (main)
    for command in COMMANDS.values():
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
        parser.commands[command.name] = sub
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a timeout, a job scheduler, torchrun stopping its ranks), handled as Ctrl-C
    is: what is finished is kept and reported (a sweep's table), half-written files removed."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run a command. Problems the user can fix print one ``hmtconv: error: ...`` line to stderr and
    return 2: UserErrors, OSErrors (unwritable path, full disk) and the ValueErrors/TypeErrors that
    hmtconv raises itself on bad arguments or data. Anything else is a bug and keeps its traceback;
    HMTCONV_DEBUG=1 prints the traceback of the one-line errors too. Under torchrun a failure on
    any rank ends every rank at its next collective and is reported once (``_ranks_failed``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own (argparse would name the top level, whose help lists no command's options)
        before = argv.index(unknown[0]) < argv.index(args.command)
        (parser if before else parser.commands[args.command]).error(f"unrecognized arguments: {' '.join(unknown)}")
    keep_freed_memory()  # our own process: trade its peak memory for no page faults per tensor
    main_thread = threading.current_thread() is threading.main_thread()  # (only it may set handlers)
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            with distributed.failing_together(lambda error: _describe(error)[0]):
                import_code(getattr(args, "code", ()))  # before any model is unpickled
                return args.run(args) or 0
        except distributed.RanksFailed as failed:
            return _ranks_failed(failed)
        except KeyboardInterrupt as interrupt:
            terminated = isinstance(interrupt, Terminated)
            print(f"{_speaker()}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
            return 143 if terminated else 130
        except Exception as error:
            report, status = _describe(error)
            if status == 1:  # a bug: the traceback as Python prints it
                raise
            print(report, file=sys.stderr)
            return status
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            distributed.shutdown()


def _speaker() -> str:
    return f"hmtconv (rank {distributed.rank()})" if distributed.active() else "hmtconv"


def _describe(error: Exception) -> tuple[str, int]:
    """What a failed command prints, and its exit status: one line for a problem the user can fix
    (2), the traceback for a bug (1)."""
    fixable = isinstance(error, (UserError, OSError)) or \
        (isinstance(error, (ValueError, TypeError)) and _raised_by_hmtconv(error))
    trace = "".join(traceback.format_exception(error))
    if not fixable:
        return f"{_speaker()}: error (a bug):\n{trace.rstrip()}", 1
    line = f"{_speaker()}: error: {' '.join(str(error).split())}"
    return (trace + line if os.environ.get("HMTCONV_DEBUG") == "1" else line), 2


def _ranks_failed(failed: distributed.RanksFailed) -> int:
    """Under torchrun: the lowest failed rank prints its report, the others stay quiet, so it shows
    once; no rank leaves before it is printed (torchrun stops every rank when one exits). Returns
    this rank's status: its own error's, or 1 where another rank failed."""
    first = min(failed.failures)
    if distributed.rank() == first:
        others = ", ".join(map(str, sorted(set(failed.failures) - {first})))
        print(failed.failures[first] + (f"\n{_speaker()}: rank(s) {others} failed too" if others else ""),
              file=sys.stderr)
    distributed.barrier()
    return 1 if failed.__cause__ is None else _describe(failed.__cause__)[1]


def _raised_by_hmtconv(error: BaseException) -> bool:
    """Whether the innermost frame is hmtconv's own code: a deliberate ``raise`` with a message for
    the user, not a TypeError deep inside torch from a bug."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``hmtconv: warning: ...`` line, from rank 0 only."""
    if distributed.is_main():
        text = " ".join(str(message).split()).removeprefix("hmtconv: ")  # (the library's own say so)
        print(f"hmtconv: warning: {text}", file=sys.stderr)
