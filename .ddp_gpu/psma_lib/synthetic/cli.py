"""``psma-pfs generate``: write a synthetic cohort from the command line."""

from __future__ import annotations

import argparse

from .cohort import generate_cohort
from .spec import SIGNALS, count_free, load_spec


def _cli_generate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.lesions_per_patient is not None:
        spec = count_free(spec, args.lesions_per_patient)
    manifest = generate_cohort(args.out, n_patients=args.patients, seed=args.seed, signal=args.signal,
                               spec=spec, workers=args.workers,
                               progress=not args.no_progress)
    print(manifest)
    return 0


def register_cli(subparsers) -> None:
    """Add ``psma-pfs generate``."""
    from .. import synthetic  # the package: its docstring's first paragraph describes the command

    p = subparsers.add_parser("generate", help="write a synthetic PSMA PET/CT cohort (NIfTI + tables)",
                              description=synthetic.__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="cohort directory to create (replaced if it exists)")
    p.add_argument("--patients", type=int, default=99, help="number of patients (default 99)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--signal", choices=SIGNALS, default="both",
                   help="what drives the outcome: both (default), imaging, clinical, none")
    p.add_argument("--spec", default=None, help="spec YAML (default: built-in = data_manifest/synthetic_default.yaml)")
    p.add_argument("--lesions-per-patient", type=int, default=None, metavar="N",
                   help="every patient gets exactly N lesions: a count-free control cohort")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_generate)
