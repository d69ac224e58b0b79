"""``psma-pfs``: one command-line entry point, one subcommand per pipeline stage.

Each stage module exposes ``register_cli(subparsers)``, which adds its subparser and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Only the module of the command being run is imported, so data-only commands (``validate``,
``crop``) do not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import InputError

# command -> stage module, in pipeline order (the order of --help).
COMMANDS = {
    "generate": "synthetic",
    "validate": "manifest",
    "import-nnunet": "nnunet",
    "crop": "crop",
    "pretrain": "pretrain",
    "cv": "cv",
    "grid": "grid",
    "book": "runner",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or only ``command``'s when it is given."""
    parser = argparse.ArgumentParser(
        prog="psma-pfs",
        description="PSMA PET/CT deep-learning survival study: data, crops, cross-validation, book.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for name in modules:
        importlib.import_module(f"psma_lib.{name}").register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(first).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"psma-pfs {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
