"""Applicability gate: calibration images accepted, far and mis-oriented inputs refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from model.applicability import GATE_FILE, fit_gate, fit_gaussian, load_gate, save_gate
from model.bundle import Bundle, BundleError, file_sha256, load_bundle, write_card
from model.finalize import gate_part, load_for_gate_fitting, portable
from model.infer import Classifier
from model.pixels import PixelMeta

LAYOUT = 64


def _rows(n: int, seed: int, shift: float = 0.0, layout_shift: float = 0.0) -> np.ndarray:
    """Gate rows: 16 correlated 'network features', then an 8x8 layout (upright, not odd)."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(16, 16))
    feats = rng.normal(size=(n, 16)) @ mixing + shift
    rows = np.linspace(0.0, 1.0, 8)[:, None] ** 2  # bright bottom rows
    centre = np.exp(-(((np.arange(8) - 3.5) / 1.5) ** 2))[None, :]  # bright middle columns
    layout = (rows + centre).ravel() + 0.2 * rng.normal(size=(n, LAYOUT)) + layout_shift
    return np.concatenate([feats, layout], axis=1)


def test_gaussian_threshold_is_the_largest_calibration_distance() -> None:
    fit_rows, cal = _rows(3000, 0)[:, :16], _rows(500, 1)[:, :16]
    part = fit_gaussian(fit_rows, cal, margin=0.0)
    assert part.ratios(cal).max() == pytest.approx(1.0)
    assert (part.ratios(_rows(2000, 2)[:, :16]) > 1).mean() < 0.01
    assert (part.ratios(_rows(200, 3, shift=6.0)[:, :16]) > 1).mean() > 0.99
    assert fit_gaussian(fit_rows, cal, margin=0.1).threshold == pytest.approx(1.1 * part.threshold)


def test_gate_accepts_calibration_rows_and_refuses_far_ones_with_a_reason() -> None:
    gate = fit_gate(_rows(3000, 0), _rows(500, 1))
    assert all(r is None for r in gate.assess(_rows(500, 1)))
    assert (gate.distances(_rows(2000, 2)) > gate.threshold).mean() < 0.02
    far_features = gate.assess(_rows(20, 3, shift=6.0))
    assert all(r is not None and "unlike the frontal chest" in r for r in far_features)
    far_layout = gate.assess(_rows(20, 4, layout_shift=3.0))
    assert all(r is not None and "layout" in r for r in far_layout)
    assert gate.reason(0.5) is None
    assert gate.reason(float("nan")) is not None
    assert "frontal chest radiograph" in (gate.reason(1.5) or "")


def test_gate_names_upside_down_and_inverted_images() -> None:
    gate = fit_gate(_rows(3000, 0), _rows(500, 1))
    rows = _rows(20, 5)
    grid = rows[:, 16:].reshape(-1, 8, 8)
    upside_down = np.concatenate([rows[:, :16], grid[:, ::-1].reshape(-1, LAYOUT)], axis=1)
    inverted = np.concatenate([rows[:, :16], -rows[:, 16:]], axis=1)
    for what, bad in (("upside down", upside_down), ("inverted grey scale", inverted)):
        reasons = gate.assess(bad)
        assert all(r is not None and what in r for r in reasons), (what, reasons[:2])


def test_gate_rows_need_features_and_layout() -> None:
    gate = fit_gate(_rows(100, 0), _rows(50, 1))
    with pytest.raises(ValueError, match="gate rows"):
        gate.distances(np.zeros((2, 16)))


def test_gate_round_trips_through_safetensors(tmp_path: Path) -> None:
    gate = fit_gate(_rows(500, 0), _rows(200, 1))
    save_gate(tmp_path / GATE_FILE, gate)
    back = load_gate(tmp_path / GATE_FILE)
    x = _rows(50, 4, layout_shift=0.5)
    np.testing.assert_allclose(back.distances(x), gate.distances(x), rtol=1e-4)
    assert back.features.threshold == gate.features.threshold
    assert back.orientation_slack == gate.orientation_slack


def test_gate_needs_two_training_rows() -> None:
    with pytest.raises(ValueError, match="rows to fit"):
        fit_gate(np.zeros((1, 80)), np.zeros((3, 80)))


def _gated_copy(tiny_bundle: Bundle, tmp_path: Path, scale: float) -> Path:
    """Copy the tiny bundle and attach a gate fitted on its own rows of noise images.

    ``scale`` multiplies both thresholds (tiny: every image is refused).
    """
    target = tmp_path / "gated"
    target.mkdir()
    for name in ("model.json", "model.safetensors"):
        (target / name).write_bytes((tiny_bundle.path / name).read_bytes())
    clf = Classifier(load_bundle(target), torch.device("cpu"))
    rng = np.random.default_rng(0)
    rows = clf.features([rng.normal(size=(1, 32, 32)).astype(np.float32) for _ in range(96)])
    gate = fit_gate(rows, rows)
    gate = dataclasses.replace(
        gate,
        features=dataclasses.replace(gate.features, threshold=gate.features.threshold * scale),
        layout=dataclasses.replace(gate.layout, threshold=gate.layout.threshold * scale),
    )
    save_gate(target / GATE_FILE, gate)
    card = load_bundle(target).card
    section = {"sha256": file_sha256(target / GATE_FILE), "threshold": scale}
    write_card(target, card.model_copy(update={"applicability": section}))
    return target


def test_classifier_reports_gate_rejections(tiny_bundle: Bundle, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    items = [(rng.integers(0, 4096, (40, 30)).astype(np.uint16), PixelMeta()) for _ in range(3)]
    refuse_all = Classifier(load_bundle(_gated_copy(tiny_bundle, tmp_path, 1e-6)))
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


def test_extra_data_is_split_by_patient_in_stable_proportions() -> None:
    parts = [gate_part(str(i)) for i in range(3000)]
    shares = {p: parts.count(p) / len(parts) for p in ("fit", "calibration", "held-out")}
    assert shares == pytest.approx({"fit": 0.5, "calibration": 0.2, "held-out": 0.3}, abs=0.03)
    assert [gate_part(str(i)) for i in range(50)] == parts[:50]


def test_card_paths_are_never_absolute(tmp_path: Path) -> None:
    assert portable("../shared/data/cxr/x") == "../shared/data/cxr/x"
    assert not Path(portable(tmp_path / "data")).is_absolute()


def test_a_gate_file_of_an_older_format_does_not_block_refitting(
    tiny_bundle: Bundle, tmp_path: Path
) -> None:
    path = _gated_copy(tiny_bundle, tmp_path, 1.0)
    save_file({"mean": np.zeros(4, np.float32)}, str(path / GATE_FILE))  # former layout
    card = json.loads((path / "model.json").read_text())
    card["applicability"]["sha256"] = file_sha256(path / GATE_FILE)
    (path / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(path)
    bundle = load_for_gate_fitting(path)
    assert bundle.gate is None
    assert bundle.path == path
    assert bundle.card.applicability["sha256"] == card["applicability"]["sha256"]
