"""psma_lib: a thin library behind the PSMA PET/CT deep-learning survival book.

Data flows one way::

    manifest  ->  crops  ->  cross-validated predictions  ->  tables and figures
    (manifest)    (crop)     (cv, models, cox)                (evaluation, analysis, report)

Every stage is a library function with a ``psma-pfs`` subcommand (see ``psma_lib.cli``), and a
cached call of :mod:`psma_lib.pipeline`; docs/ARCHITECTURE.md has the module map.
"""

import warnings

with warnings.catch_warnings():
    # tqdm.auto (the stages' progress bars) warns once at import in a kernel without ipywidgets;
    # its text bars work and the chapters disable them anyway. Importing it here, before any
    # stage, keeps that environment note out of the chapter pages (the HTML check treats stderr
    # as a failure).
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

__version__ = "0.1.0"
