"""Entry point of the ``maxmin-inspect`` console script."""

from __future__ import annotations

import argparse

from app import cli as service_cli
from inspectlib.commands import run_command
from training import cli as training_cli


def get_args_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="maxmin-inspect",
        description="Is the MaxMin CNN worth its cost on your part images? Train, compare, serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers = training_cli.add_commands(sub) | service_cli.add_commands(sub)
    train = sub.choices["train"]
    train.add_argument(
        "--no-register",
        action="store_true",
        help="do not register the finished run in the service's database",
    )
    train.set_defaults(after_train=service_cli.register_after_train)
    parser.set_defaults(handlers=handlers)
    return parser


def _database_error(exc: Exception) -> tuple[str, int]:
    return f"database error: {getattr(exc, 'orig', None) or exc}", 1


def main(argv: list[str] | None = None) -> int:
    """Clear messages and a non-zero exit on bad input, never a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    args = get_args_parser().parse_args(argv)
    handler = args.handlers[args.command]
    return run_command("maxmin-inspect", handler, args, {SQLAlchemyError: _database_error})
