"""The ``atod-fast`` command line: argument parsing and the subcommands (train, eval, sft, compare, plot)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
