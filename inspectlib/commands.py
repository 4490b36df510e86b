"""What every command line of the product shares: argument types and how errors are reported."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from inspectlib.checkpoint import CheckpointError
from inspectlib.datasets import DataError

# Bad input a user can fix: reported in one line that names the file or option, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    CheckpointError,
    ValueError,
    FileNotFoundError,
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argument type for a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        value = positive_int(text) if low >= 1 else int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    parse.__name__ = "whole number"  # what argparse names in its message
    return parse


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be between 0 and 0.5, got {value}")
    return value


def keep_fraction(text: str) -> float:
    """A share of something kept: above 0, at most 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {value}")
    return value


def run_command(
    prog: str,
    handler: Callable[[argparse.Namespace], int],
    args: argparse.Namespace,
    more_errors: dict[type[Exception], Callable[[Exception], tuple[str, int]]] | None = None,
) -> int:
    """Run one subcommand: a user's error becomes a message on stderr and a non-zero exit status,
    never a traceback. ``more_errors`` maps further exception types to (message, status)."""
    try:
        return handler(args)
    except USER_ERRORS as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        for kind, describe in (more_errors or {}).items():
            if isinstance(exc, kind):
                message, status = describe(exc)
                print(f"{prog} {args.command}: {message}", file=sys.stderr)
                return status
        raise
