"""Seeds, versions and provenance recorded beside every result."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import random
import sys

import numpy as np

_PACKAGES = (
    "psma-lib", "torch", "torchvision", "numpy", "scipy", "pandas", "lifelines",
    "scikit-learn", "nibabel", "matplotlib",
)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and ask torch for deterministic kernels on CPU."""
    random.seed(seed)
    # Third-party code may still draw from NumPy's legacy global generator.
    np.random.seed(seed % (2**32))  # noqa: NPY002
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape a result, plus Python and platform."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    # Only describe the device when torch is already loaded: importing it costs seconds and
    # hundreds of MiB, which data-only stages (generate, crop) should not pay.
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch_cuda"] = str(torch.version.cuda)
        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def provenance(**params) -> dict:
    """A provenance record: UTC time, versions and the given parameters."""
    return {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "parameters": params,
    }
