from __future__ import annotations

import numpy as np
import pytest
import torch

from model.bundle import Bundle, default_bundle_path, load_bundle
from model.infer import Classifier, aggregate_study, select_device
from model.pixels import PixelMeta
from model.preprocess import load_image_file
from tests.conftest import shared_path


def test_select_device_auto_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    assert select_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device() == torch.device("cpu")
    assert select_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match="not available"):
        select_device("cuda")
    with pytest.raises(ValueError, match="unknown"):
        select_device("tpu")


def test_aggregate_study_is_max() -> None:
    assert aggregate_study([0.1, 0.7, 0.3]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        aggregate_study([])


def test_predict_independent_of_batch_size(tiny_bundle: Bundle) -> None:
    rng = np.random.default_rng(5)
    images = [rng.normal(size=(1, 32, 32)).astype(np.float32) for _ in range(7)]
    p1 = Classifier(tiny_bundle, torch.device("cpu"), batch_size=1).predict(images)
    p4 = Classifier(tiny_bundle, torch.device("cpu"), batch_size=4).predict(images)
    assert p1.dtype == np.float64 and p1.shape == (7,)
    np.testing.assert_allclose(p1, p4, atol=1e-5)
    assert Classifier(tiny_bundle, torch.device("cpu")).predict([]).shape == (0,)


def test_predict_rejects_wrong_shape(tiny_bundle: Bundle) -> None:
    clf = Classifier(tiny_bundle, torch.device("cpu"))
    with pytest.raises(ValueError, match="expected"):
        clf.predict([np.zeros((1, 16, 16), dtype=np.float32)])


def test_classify_thresholds_with_card(tiny_bundle: Bundle) -> None:
    rng = np.random.default_rng(6)
    items = [(rng.integers(0, 4096, (50, 40)).astype(np.uint16), PixelMeta()) for _ in range(3)]
    clf = Classifier(tiny_bundle, torch.device("cpu"))
    preds = clf.classify(items)
    assert len(preds) == 3
    for pred in preds:
        assert 0.0 <= pred.probability <= 1.0
        assert pred.positive == (pred.probability >= tiny_bundle.card.threshold)


def _default_bundle() -> Bundle:
    path = default_bundle_path()
    if not (path / "model.json").exists():
        pytest.skip(f"default bundle not trained yet ({path}/model.json missing)")
    return load_bundle(path)


def test_default_bundle_gives_probabilities() -> None:
    bundle = _default_bundle()
    assert bundle.card.positive_class == "pneumonia"
    assert bundle.card.finding.value == "233604007"
    for split in ("validation", "test"):
        metrics = bundle.card.metrics[split]
        assert metrics["n"] > 0 and 0.0 <= metrics["auc"] <= 1.0
    assert bundle.card.training["split"]["test"]["patients"] > 0
    assert "CC BY 4.0" in bundle.card.training["data_attribution"]
    size = (default_bundle_path() / "model.safetensors").stat().st_size
    assert size <= 25 * 1024 * 1024
    rng = np.random.default_rng(7)
    items = [(rng.integers(0, 1024, (300, 260)).astype(np.uint16), PixelMeta()) for _ in range(2)]
    preds = Classifier(bundle, torch.device("cpu")).classify(items)
    assert all(0.0 <= p.probability <= 1.0 for p in preds)


@pytest.mark.shared
def test_default_bundle_separates_real_images() -> None:
    bundle = _default_bundle()
    root = shared_path("cxr", "kermany-pneumonia-train", "images")
    normal = sorted((root / "NORMAL").glob("*.jpeg"))[:8]
    pneumonia = sorted((root / "PNEUMONIA").glob("*.jpeg"))[:8]
    clf = Classifier(bundle, torch.device("cpu"))
    p_norm = [p.probability for p in clf.classify([load_image_file(f) for f in normal])]
    p_pneu = [p.probability for p in clf.classify([load_image_file(f) for f in pneumonia])]
    assert np.mean(p_pneu) > np.mean(p_norm)
