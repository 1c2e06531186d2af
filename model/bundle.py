"""The model bundle: ``model.safetensors`` (weights) + ``model.json`` (the model card).

The card carries everything needed to rebuild the network (timm architecture name,
preprocessing spec), interpret its output (classes, positive class, threshold, coded
finding for the SR, e.g. SNOMED CT in PS3.16) and to know how it was made and measured.
The sha256 of the weights file is the model's identity (with name and version) and
travels with every result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.applicability import GATE_FILE, ApplicabilityGate, load_gate
from model.preprocess import PreprocessSpec

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"


class BundleError(Exception):
    """A bundle is missing, malformed or does not match its card."""


class CodedFinding(BaseModel):
    """A coded concept (scheme designator, code value, code meaning; PS3.3 8.8).

    Supports ``finding["value"]`` as well as ``finding.value``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheme: str = Field(min_length=1)
    value: str = Field(min_length=1)
    # Code Meaning (0008,0104) is LO: at most 64 characters (PS3.5 6.2)
    meaning: str = Field(min_length=1, max_length=64)

    def __getitem__(self, key: str) -> str:
        """Dict-style access to ``scheme``, ``value`` and ``meaning``."""
        if key not in ("scheme", "value", "meaning"):
            raise KeyError(key)
        return str(getattr(self, key))


class Aggregation(BaseModel):
    """How per-image probabilities of one study become the study's probability.

    ``max`` (radiographs: the most suspicious image decides), ``mean``, or ``topk_mean``
    (CT slice models: mean of the ``k`` highest slice probabilities, robust to a single
    noisy slice; fewer than ``k`` images average all of them).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["max", "mean", "topk_mean"] = "max"
    k: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_k(self) -> Aggregation:
        if self.method == "topk_mean" and self.k is None:
            raise ValueError("aggregation topk_mean needs k")
        if self.method != "topk_mean" and self.k is not None:
            raise ValueError(f"aggregation {self.method} takes no k")
        return self


PNEUMONIA_FINDING = CodedFinding(scheme="SCT", value="233604007", meaning="Pneumonia")


class ModelCard(BaseModel):
    """Model card, stored as ``model.json`` next to the weights.

    The network has a single output logit; ``sigmoid(logit)`` is P(``positive_class``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    architecture: str = Field(min_length=1)
    classes: list[str]
    positive_class: str
    preprocessing: dict[str, Any]
    threshold: float = Field(ge=0.0, le=1.0)
    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    finding: CodedFinding = PNEUMONIA_FINDING
    aggregation: Aggregation = Aggregation()
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    weights_sha256: str = ""
    weights_dtype: str = "float32"
    manufacturer: str = "radflag"
    description: str = ""
    limitations: str = ""
    temperature: float = Field(default=1.0, gt=0.0)
    logit_bias: float = 0.0
    applicability: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preprocessing")
    @classmethod
    def _check_preprocessing(cls, value: dict[str, Any]) -> dict[str, Any]:
        return PreprocessSpec.from_dict(value).to_dict()

    @field_validator("weights_dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in ("float32", "float16"):
            raise ValueError(f"weights_dtype must be float32 or float16, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_classes(self) -> ModelCard:
        if len(self.classes) != 2 or len(set(self.classes)) != 2:
            raise ValueError(f"classes must be two distinct names, got {self.classes}")
        if self.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.positive_class!r} not in {self.classes}")
        return self

    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """The preprocessing spec as a typed object."""
        return PreprocessSpec.from_dict(self.preprocessing)

    def to_json(self) -> str:
        """Serialise as pretty JSON."""
        return self.model_dump_json(indent=2) + "\n"


@dataclass(frozen=True)
class ModelIdentity:
    """Identity that travels with every result (name, version, weights sha256)."""

    name: str
    version: str
    weights_sha256: str


@dataclass
class Bundle:
    """A loaded bundle: card, network in eval mode on the CPU, optional applicability gate."""

    path: Path
    card: ModelCard
    model: torch.nn.Module
    gate: ApplicabilityGate | None = None

    @property
    def identity(self) -> ModelIdentity:
        """Name, version and weights sha256 of this model."""
        return ModelIdentity(self.card.name, self.card.version, self.card.weights_sha256)


def default_bundle_path() -> Path:
    """Return the shipped bundle folder ``model/bundles/pneumonia/``."""
    return Path(__file__).resolve().parent / "bundles" / "pneumonia"


def build_network(architecture: str, spec: PreprocessSpec) -> torch.nn.Module:
    """Create a timm network with one output logit (never pretrained weights).

    Parameters
    ----------
    architecture
        timm model name, e.g. ``resnet18``.
    spec
        Preprocessing spec (gives the number of input channels).
    """
    try:
        net: torch.nn.Module = timm.create_model(
            architecture, pretrained=False, num_classes=1, in_chans=spec.channels
        )
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise BundleError(f"unknown timm architecture {architecture!r}: {exc}") from exc
    return net


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(path: Path) -> ModelCard:
    """Read and validate ``model.json`` from a bundle folder.

    Parameters
    ----------
    path
        Bundle folder.
    """
    card_path = Path(path) / CARD_FILE
    try:
        return ModelCard.model_validate(json.loads(card_path.read_text(encoding="utf-8")))
    except FileNotFoundError as exc:
        raise BundleError(f"bundle {path} has no {CARD_FILE}") from exc
    except (json.JSONDecodeError, ValidationError) as exc:
        raise BundleError(f"invalid {card_path}: {exc}") from exc


def load_bundle(path: Path) -> Bundle:
    """Load a bundle, verifying the weights sha256 against the card.

    Parameters
    ----------
    path
        Bundle folder holding ``model.json`` and ``model.safetensors``.

    Raises
    ------
    BundleError
        Missing files, invalid card, sha256 mismatch or weights that do not fit the
        architecture.
    """
    path = Path(path)
    card = read_card(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"bundle {path} has no {WEIGHTS_FILE}")
    actual = file_sha256(weights)
    if actual != card.weights_sha256:
        raise BundleError(
            f"sha256 mismatch for {weights}: card says {card.weights_sha256 or '<empty>'}, "
            f"file is {actual}; refusing to load"
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"cannot read {weights}: {exc}") from exc
    net = build_network(card.architecture, card.preprocess_spec)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"weights in {weights} do not fit {card.architecture}: {exc}") from exc
    net.eval()
    gate = _load_gate(path, card)
    logger.info(
        "loaded model bundle",
        extra={
            "bundle": str(path),
            "model_name": card.name,
            "model_version": card.version,
            "weights_sha256": actual,
        },
    )
    return Bundle(path=path, card=card, model=net, gate=gate)


def _load_gate(path: Path, card: ModelCard) -> ApplicabilityGate | None:
    """Load the applicability gate the card names, verifying its sha256; None without one."""
    expected = card.applicability.get("sha256")
    if not expected:
        return None
    gate_path = path / GATE_FILE
    if not gate_path.is_file():
        raise BundleError(f"card of {path} names an applicability gate but {GATE_FILE} is missing")
    actual = file_sha256(gate_path)
    if actual != expected:
        raise BundleError(f"sha256 mismatch for {gate_path}: card {expected}, file {actual}")
    try:
        return load_gate(gate_path)
    except (SafetensorError, OSError, KeyError) as exc:
        raise BundleError(f"cannot read {gate_path}: {exc}") from exc


def _atomic_write(target: Path, write: Any) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def save_bundle(path: Path, model: torch.nn.Module, card: ModelCard) -> Bundle:
    """Write weights and card atomically; the card's sha256 is computed here.

    Parameters
    ----------
    path
        Bundle folder (created if needed).
    model
        Network whose ``state_dict`` fits ``card.architecture``.
    card
        Card; ``weights_sha256`` is replaced, ``weights_dtype`` selects float32/float16.

    Returns
    -------
    Bundle
        The bundle as written (with the saved weights loaded back into a fresh network).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if card.weights_dtype == "float16" else torch.float32
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
        .contiguous()
        .clone()
        for k, v in model.state_dict().items()
    }
    weights = path / WEIGHTS_FILE
    _atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    final = card.model_copy(update={"weights_sha256": file_sha256(weights)})
    _atomic_write(path / CARD_FILE, lambda tmp: tmp.write_text(final.to_json(), encoding="utf-8"))
    return load_bundle(path)


def write_card(path: Path, card: ModelCard) -> Bundle:
    """Replace a bundle's card (e.g. a new threshold) without touching its weights.

    The weights' sha256 must still match the card: the identity of the model does not
    change, only its operating point and the record of that change.

    Parameters
    ----------
    path
        Bundle folder.
    card
        New card.

    Raises
    ------
    BundleError
        When the card's sha256 does not match the weights on disk.
    """
    path = Path(path)
    actual = file_sha256(path / WEIGHTS_FILE)
    if card.weights_sha256 != actual:
        raise BundleError(f"card sha256 {card.weights_sha256} does not match weights {actual}")
    _atomic_write(path / CARD_FILE, lambda tmp: tmp.write_text(card.to_json(), encoding="utf-8"))
    return load_bundle(path)
