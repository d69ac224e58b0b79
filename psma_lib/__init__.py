"""psma_lib: a thin library behind the PSMA PET/CT deep-learning survival book.

Data flows one way::

    manifest  ->  crops  ->  cross-validated predictions  ->  tables and figures
    (manifest)    (crop)     (cv, models, cox)                (evaluation, book)

Every stage is a library function with a ``psma-pfs`` subcommand (see ``psma_lib.cli``).
"""

__version__ = "0.1.0"
