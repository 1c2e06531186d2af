"""Applicability gate: bounded false rejections in distribution, far inputs refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.applicability import GATE_FILE, ApplicabilityGate, fit_gate, load_gate, save_gate
from model.bundle import Bundle, BundleError, file_sha256, load_bundle, write_card
from model.infer import Classifier
from model.pixels import PixelMeta


def _features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(16, 16))
    return rng.normal(size=(n, 16)) @ mixing + shift


def test_gate_rejects_about_the_quantile_in_distribution_and_far_points() -> None:
    gate = fit_gate(_features(3000, 0), _features(1000, 1), quantile=0.99)
    fresh = gate.distances(_features(2000, 2)) > gate.threshold
    assert fresh.mean() < 0.025
    far = gate.distances(_features(200, 3, shift=6.0)) > gate.threshold
    assert far.mean() > 0.99
    assert gate.reason(float(gate.threshold) * 0.5) is None
    assert "unlike the frontal chest radiographs" in (gate.reason(gate.threshold + 1.0) or "")
    assert gate.reason(float("nan")) is not None


def test_gate_round_trips_through_safetensors(tmp_path: Path) -> None:
    gate = fit_gate(_features(500, 0), _features(200, 1))
    save_gate(tmp_path / GATE_FILE, gate)
    back = load_gate(tmp_path / GATE_FILE)
    x = _features(50, 4)
    np.testing.assert_allclose(back.distances(x), gate.distances(x), rtol=1e-4)
    assert back.threshold == gate.threshold


def test_gate_needs_two_training_rows() -> None:
    with pytest.raises(ValueError, match="training features"):
        fit_gate(np.zeros((1, 4)), np.zeros((3, 4)))


def _gated_copy(tiny_bundle: Bundle, tmp_path: Path, threshold: float) -> Path:
    """Copy the tiny bundle and attach a gate fitted on its own features of noise images."""
    target = tmp_path / "gated"
    target.mkdir()
    for name in ("model.json", "model.safetensors"):
        (target / name).write_bytes((tiny_bundle.path / name).read_bytes())
    clf = Classifier(load_bundle(target), torch.device("cpu"))
    rng = np.random.default_rng(0)
    feats = clf.features([rng.normal(size=(1, 32, 32)).astype(np.float32) for _ in range(64)])
    gate = fit_gate(feats, feats)
    save_gate(target / GATE_FILE, ApplicabilityGate(gate.mean, gate.precision, threshold))
    card = load_bundle(target).card
    section = {"sha256": file_sha256(target / GATE_FILE), "threshold": threshold}
    write_card(target, card.model_copy(update={"applicability": section}))
    return target


def test_classifier_reports_gate_rejections(tiny_bundle: Bundle, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    items = [(rng.integers(0, 4096, (40, 30)).astype(np.uint16), PixelMeta()) for _ in range(3)]
    refuse_all = Classifier(load_bundle(_gated_copy(tiny_bundle, tmp_path, -1.0)))
    preds = refuse_all.classify(items)
    assert all(p.not_applicable for p in preds)
    ungated = Classifier(tiny_bundle, torch.device("cpu")).classify(items)
    assert [p.probability for p in preds] == pytest.approx([p.probability for p in ungated])
    assert all(p.not_applicable is None for p in ungated)


def test_tampered_gate_file_is_refused(tiny_bundle: Bundle, tmp_path: Path) -> None:
    path = _gated_copy(tiny_bundle, tmp_path, 1.0)
    gate_file = path / GATE_FILE
    gate_file.write_bytes(gate_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(path)
    gate_file.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(path)
    card = json.loads((path / "model.json").read_text())
    assert card["applicability"]["threshold"] == 1.0
