"""``python -m psma_lib COMMAND ...``: the ``psma-pfs`` command without its console script, so a
process (a grid unit, a SLURM task) runs the very interpreter and library that launched it."""

import sys

from .cli import main

sys.exit(main())
