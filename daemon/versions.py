"""Validated versions: the packages a model card was validated with vs. the running ones.

A bundle's card records, under ``training.validated_versions``, the exact versions of the
packages that shape its outputs (``scripts/freeze_constraints.py --stamp-card`` writes them
from the environment CI tested; older cards have ``training.software``). ``radflag serve``
logs a warning per differing package at start-up: a new torch, timm or MONAI can shift a
validated model's outputs without any error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from packaging.version import InvalidVersion, Version

log = logging.getLogger(__name__)

VALIDATED_KEY = "validated_versions"
"""Key of ``ModelCard.training`` holding ``{package: version}``."""

MODEL_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "monai",
    "numpy",
    "pillow",
    "safetensors",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "highdicom",
)
"""Packages whose version can change what a model computes from a DICOM file."""


@dataclass(frozen=True)
class VersionDrift:
    """One package whose running version differs from the validated one."""

    package: str
    validated: str
    running: str | None
    """None when the package is not installed."""


def running_versions(packages: Iterable[str] = MODEL_PACKAGES) -> dict[str, str]:
    """Return ``{package: installed version}`` of the installed ``packages``."""
    found: dict[str, str] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def validated_versions(training: Mapping[str, Any]) -> dict[str, str]:
    """Return the versions a card's ``training`` section says the model was validated with."""
    recorded = training.get(VALIDATED_KEY) or training.get("software") or {}
    return {str(k): str(v) for k, v in recorded.items() if k != "python"}


def _public(version: str) -> str:
    """``2.14.1+cu130`` -> ``2.14.1``: a build label (CPU/CUDA wheel) is not a new release."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version


def version_drift(
    validated: Mapping[str, str], running: Mapping[str, str] | None = None
) -> list[VersionDrift]:
    """Compare validated with running versions (release numbers, build labels ignored).

    Parameters
    ----------
    validated
        ``{package: version}`` from a model card.
    running
        ``{package: version}`` installed; read from the environment when None.
    """
    if running is None:
        running = running_versions(validated)
    drift = []
    for package, want in sorted(validated.items()):
        have = running.get(package)
        if have is None or _public(have) != _public(want):
            drift.append(VersionDrift(package, want, have))
    return drift


def warn_version_drift(model_name: str, training: Mapping[str, Any]) -> list[VersionDrift]:
    """Log one warning per package that differs from the card's validated versions.

    Returns the differences (empty when the card records no versions or all match).
    """
    validated = validated_versions(training)
    if not validated:
        log.warning("model card records no validated versions", extra={"model_name": model_name})
        return []
    drift = version_drift(validated)
    for d in drift:
        log.warning(
            "running %s %s, model %s was validated with %s",
            d.package,
            d.running or "(not installed)",
            model_name,
            d.validated,
            extra={
                "model_name": model_name,
                "package": d.package,
                "validated_version": d.validated,
                "running_version": d.running,
            },
        )
    return drift
