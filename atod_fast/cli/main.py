"""The ``atod-fast`` command line."""

from __future__ import annotations

import argparse
import sys

from .._version import __version__
from .commands import add_train_commands
from .export import add_export_command
from .serve_teacher import add_serve_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atod-fast",
        description="Train small language models into multi-turn agents with ATOD "
        "(Annealed Turn-aware On-policy Distillation).",
    )
    parser.add_argument("--version", action="version", version=f"atod-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("envs", help="list the environments env.name can name",
                       description="Built-in environments, adapters of third-party games (with the package they "
                       "need) and environments installed under the entry-point group atod_fast.envs. Any "
                       "importable class or factory also works as env.name=package.module:ClassOrFactory.")
    p.set_defaults(func=_cmd_envs)
    add_train_commands(sub)
    add_serve_command(sub)
    add_export_command(sub)
    return parser


def _cmd_envs(args) -> int:
    from ..envs import available

    rows = available()
    width = max(len(name) for name, _, _ in rows)
    kind_width = max(len(kind) for _, kind, _ in rows)
    for name, kind, desc in rows:
        print(f"{name:<{width}}  {kind:<{kind_width}}  {desc}")
    print("\nAlso: env.name=package.module:ClassOrFactory (any importable environment), with env.kwargs.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Config overrides (key=value) may sit before and after options: argparse hands the later ones back.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
