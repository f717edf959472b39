"""Registry of subcommands (a plain dict filled by a decorator), so later commands plug in."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]  # None means success (exit status 0)


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorate ``run(args)``; ``add_arguments(parser)`` declares the command's options."""

    def decorator(run):
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run

    return decorator
