"""``python -m psma_lib COMMAND ...``: the ``psma-pfs`` command without its console script, so a
process (a grid unit, a SLURM task, ``torchrun ... -m psma_lib cv ...``) runs the very interpreter
and library that launched it."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
