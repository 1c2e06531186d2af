"""The shipped bundle's applicability gate on real images: chest radiographs of the
training source and adult frontal radiographs of held-out ieee8023 patients pass, as does the
real adult JPEG 2000 DX turned upright; every non-chest image of the DICOM zoo, the dog
thorax, lateral views, the J2K DX as served (upside down, inverted grey scale) and heavily
corrupted chest radiographs are refused with a reason."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.pipeline import model_input
from dicom_io.reader import read_image
from model.bundle import Bundle, default_bundle_path, load_bundle
from model.evaluate import card_split
from model.finalize import gate_part
from model.infer import Classifier
from model.pixels import PixelMeta
from model.preprocess import load_image_file, preprocess
from model.train import stratified_limit
from tests.conftest import SHARED_DATA, shared_path

pytestmark = pytest.mark.slow

Item = tuple[np.ndarray, Any]

LATERAL_MIN_REFUSED = 0.7  # measured 0.77 (30 of 39) with the shipped bundle
HELD_OUT_ADULT_MAX_REFUSED = 0.02  # measured 0.007 (1 of 136)
ZOO = ("dicom/transfer-syntax-zoo/files", "*.dcm")
J2K = ("dicom", "chest-real", "files", "JPEG2KLossless_1s_1f_u_16_16.dcm")
# every file of the zoo is a non-chest image (22 files; a missing zoo skips or fails below)
ZOO_FILES = sorted(p.name for p in (SHARED_DATA / ZOO[0]).glob(ZOO[1])) or ["<zoo missing>"]


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    b = load_bundle(default_bundle_path())
    assert b.gate is not None, "the shipped bundle has no applicability gate"
    return b


@pytest.fixture(scope="module")
def classifier(bundle: Bundle) -> Classifier:
    return Classifier(bundle, batch_size=16)


def _dicom(path: Path) -> tuple[np.ndarray, PixelMeta]:
    image = read_image(path)
    return model_input(image)


def _ieee(keep: Callable[[dict[str, str]], bool]) -> list[Path]:
    folder = shared_path("cxr", "ieee8023-covid-train")
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return [folder / row["filename"] for row in csv.DictReader(fh) if keep(row)]


def _reasons(bundle: Bundle, classifier: Classifier, items: list[Item]) -> list[str | None]:
    """The gate's specific reasons (the decisions equal Classifier.classify's)."""
    assert bundle.gate is not None
    rows = classifier.features([preprocess(p, m, classifier.spec) for p, m in items])
    reasons = bundle.gate.assess(rows)
    served = [p.not_applicable is not None for p in classifier.classify(items)]
    assert served == [r is not None for r in reasons]
    return reasons


def test_card_records_false_rejections(bundle: Bundle) -> None:
    frr = bundle.card.applicability["false_rejection"]
    assert frr["validation"]["false_rejection_rate"] == 0.0
    assert frr["test"]["false_rejection_rate"] <= 0.01
    assert frr["extra held-out"]["false_rejection_rate"] <= HELD_OUT_ADULT_MAX_REFUSED
    assert "/work/" not in json.dumps(bundle.card.applicability)


def test_validation_radiographs_pass(bundle: Bundle, classifier: Classifier) -> None:
    data = shared_path("cxr", "kermany-pneumonia-train")
    sample = stratified_limit(card_split(bundle.card, "validation", data), 96, seed=1)
    preds = classifier.classify([load_image_file(r.path) for r in sample])
    refused = [r.path.name for r, p in zip(sample, preds, strict=True) if p.not_applicable]
    assert refused == []


def test_held_out_adult_frontal_radiographs_pass(classifier: Classifier) -> None:
    paths = _ieee(lambda r: r["view"] != "L" and gate_part(r["patient_id"]) == "held-out")
    assert len(paths) >= 100
    preds = classifier.classify([load_image_file(p) for p in paths])
    refused = float(np.mean([p.not_applicable is not None for p in preds]))
    assert refused <= HELD_OUT_ADULT_MAX_REFUSED, refused


def test_adult_j2k_dx_upright_passes_and_as_served_is_named_mis_oriented(
    bundle: Bundle, classifier: Classifier
) -> None:
    pixels, meta = _dicom(shared_path(*J2K))
    flipped = pixels[::-1].astype(np.int64)
    upright = (int(pixels.max()) + int(pixels.min()) - flipped).astype(pixels.dtype)
    as_served, turned = _reasons(bundle, classifier, [(pixels, meta), (upright, meta)])
    assert turned is None
    assert as_served is not None
    assert "upside down and with inverted grey scale" in as_served


@pytest.mark.parametrize("name", ZOO_FILES)
def test_non_chest_zoo_images_are_refused(classifier: Classifier, name: str) -> None:
    pred = classifier.classify([_dicom(shared_path("dicom", "transfer-syntax-zoo", "files", name))])
    assert pred[0].not_applicable is not None
    assert "frontal chest radiograph" in pred[0].not_applicable


def test_dog_thorax_is_refused(classifier: Classifier) -> None:
    dog = shared_path("dicom", "chest-real", "files", "highdicom_dx_image.dcm")
    assert classifier.classify([_dicom(dog)])[0].not_applicable is not None


def test_most_lateral_views_are_refused(classifier: Classifier) -> None:
    laterals = _ieee(lambda r: r["view"] == "L")
    assert len(laterals) >= 30
    preds = classifier.classify([load_image_file(path) for path in laterals])
    refused = float(np.mean([p.not_applicable is not None for p in preds]))
    assert refused >= LATERAL_MIN_REFUSED, refused


def _corruptions(image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    salt = image.copy()
    mask = rng.random(image.shape) < 0.5
    salt[mask] = rng.choice(np.array([0, 255], dtype=np.uint8), size=int(mask.sum()))
    return {
        "pixels shuffled": rng.permutation(image.ravel()).reshape(image.shape),
        "half salt and pepper": salt,
        "uniform noise": rng.integers(0, 256, image.shape).astype(np.uint8),
        "tiled 4x4": np.tile(image[::4, ::4], (4, 4)),
    }


def test_heavily_corrupted_chest_radiographs_are_refused(
    bundle: Bundle, classifier: Classifier
) -> None:
    data = shared_path("cxr", "kermany-pneumonia-train")
    sample = stratified_limit(card_split(bundle.card, "validation", data), 6, seed=2)
    rng = np.random.default_rng(0)
    for rec in sample:
        image = load_image_file(rec.path)[0]
        for what, bad in _corruptions(image, rng).items():
            pred = classifier.classify([(bad, PixelMeta(bits_stored=8))])[0]
            assert pred.not_applicable is not None, (rec.path.name, what)
