"""One exception type for bad input, so the CLI can print one clear line and exit non-zero."""

from __future__ import annotations


class InputError(Exception):
    """Bad user input: a missing/corrupt file, an inconsistent manifest, an impossible value.

    The message names the patient and/or file and says what is wrong, e.g.
    ``patient P007: file images/P007_pet.nii.gz: PET contains 12 NaN voxels``.
    """

    def __init__(self, problem: str, *, patient: str | None = None, file: str | None = None):
        self.problem = problem
        self.patient = patient
        self.file = file
        super().__init__(format_problem(problem, patient=patient, file=file))


def format_problem(problem: str, *, patient: str | None = None, file: str | None = None) -> str:
    """``patient P007: file x.nii.gz: problem`` with the parts that are known."""
    parts = []
    if patient is not None:
        parts.append(f"patient {patient}")
    if file is not None:
        parts.append(f"file {file}")
    parts.append(problem)
    return ": ".join(parts)


class ValidationFailed(InputError):
    """Several problems found at once (``psma-pfs validate`` lists them all)."""

    def __init__(self, problems: list[str], what: str = "manifest"):
        self.problems = list(problems)
        head = f"{what}: {len(self.problems)} problem(s) found"
        super().__init__("\n  - ".join([head, *self.problems]))
