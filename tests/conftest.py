"""Shared fixtures: a tiny crops directory in the contract's format, written directly."""

from __future__ import annotations

from pathlib import Path

import pytest

from psma_lib.testing import write_tiny_crops


@pytest.fixture(scope="session")
def tiny_crops(tmp_path_factory) -> Path:
    """24 patients, 16^3 crops (read-only: tests copy it if they modify it)."""
    return write_tiny_crops(tmp_path_factory.mktemp("tiny") / "crops")
