"""``psma-pfs``: one command-line entry point, one subcommand per pipeline stage.

Each stage module exposes ``register_cli(subparsers)``, which adds its subparser and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import InputError

# Order = order in --help = order of the pipeline.
_STAGE_MODULES = ("synthetic", "manifest", "nnunet", "crop", "cv", "book")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psma-pfs",
        description="PSMA PET/CT deep-learning survival study: data, crops, cross-validation, book.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _STAGE_MODULES:
        try:  # TEMPORARY during parallel development; removed before release
            module = importlib.import_module(f"psma_lib.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"psma_lib.{name}":
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"psma-pfs {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
