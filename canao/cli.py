"""The `canao` command line: one entry point, a subcommand per stage.

Each stage module exposes `register(subparsers)`, which adds its subcommands with
`set_defaults(func=...)`. A command function takes the parsed arguments and
returns a dict; with --json that dict is printed as exactly one JSON object on
stdout, otherwise the function has printed a human-readable summary itself.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import CanaoError

# Stage modules that contribute subcommands, in help order.
COMMAND_MODULES = [
    "canao.apps.command",
    "canao.compiler.command",
    "canao.baselines.command",
    "canao.serve.command",
    "canao.compress.command",
    "canao.device.command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canao", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def add_common(p: argparse.ArgumentParser) -> None:
    """Options every subcommand takes."""
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if isinstance(getattr(args, "threads", None), int):  # `canao bench` takes a list and sets its own
            import torch

            torch.set_num_threads(args.threads)
        result = args.func(args)
    except CanaoError as exc:
        print(f"canao {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"canao {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
