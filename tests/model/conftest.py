"""Fixtures for the model tests: a synthetic labelled dataset and a tiny bundle."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import Bundle, ModelCard, build_network, save_bundle
from model.preprocess import PreprocessSpec

TINY_SPEC = PreprocessSpec(input_size=32, channels=1)


def make_synthetic_dataset(root: Path, n_patients: int = 24, seed: int = 0) -> Path:
    """Write PNGs with 2 images per patient: 'pneumonia' has a bright blob, 'normal' not."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    yy, xx = np.mgrid[0:48, 0:40]
    for p in range(n_patients):
        label = "pneumonia" if p % 2 else "normal"
        for k in range(2):
            img = rng.normal(80, 20, size=(48, 40))
            img[:, :4] = 0  # dark border like a real film
            if label == "pneumonia":
                cy, cx = rng.integers(14, 34), rng.integers(12, 28)
                img += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
            name = f"images/p{p:03d}_{k}.png"
            (root / "images").mkdir(exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name)
            rows.append((name, label, f"P{p:03d}"))
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "label", "patient_id"])
        writer.writerows(rows)
    return root


def tiny_card(**overrides: object) -> ModelCard:
    values: dict[str, object] = {
        "name": "tiny-test",
        "version": "0.0.1",
        "architecture": "resnet10t",
        "classes": ["normal", "pneumonia"],
        "positive_class": "pneumonia",
        "preprocessing": TINY_SPEC.to_dict(),
        "threshold": 0.5,
    }
    values.update(overrides)
    return ModelCard.model_validate(values)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Keep model tests to one intra-op thread: the CI machine's cores are shared."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture()
def tiny_bundle(tmp_path: Path) -> Bundle:
    torch.manual_seed(0)
    net = build_network("resnet10t", TINY_SPEC)
    return save_bundle(tmp_path / "tiny", net, tiny_card())
