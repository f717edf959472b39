"""Command-line interface: ``hmtconv <command>`` (also ``python -m hmtconv``)."""
from . import convert, demo, evaluate, sweep, train  # noqa: F401  (each registers its command)
from .main import build_parser, main
from .registry import COMMANDS, Command, register_command

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register_command"]
