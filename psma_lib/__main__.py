"""``python -m psma_lib`` = ``psma-pfs`` (what ``torchrun ... -m psma_lib cv ...`` starts)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
