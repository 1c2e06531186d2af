from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import (
    BundleError,
    ModelIdentity,
    build_network,
    default_bundle_path,
    load_bundle,
    save_bundle,
)
from model.infer import Classifier
from tests.model.conftest import TINY_SPEC, tiny_card


def _inputs(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=(1, 32, 32)).astype(np.float32) for _ in range(n)]


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = build_network("resnet10t", TINY_SPEC).eval()
    saved = save_bundle(tmp_path / "b", net, tiny_card())
    loaded = load_bundle(tmp_path / "b")
    assert loaded.card == saved.card
    assert len(loaded.card.weights_sha256) == 64
    assert loaded.identity == ModelIdentity("tiny-test", "0.0.1", loaded.card.weights_sha256)
    with torch.inference_mode():
        direct = torch.sigmoid(net(torch.from_numpy(np.stack(_inputs())))).reshape(-1).double()
    np.testing.assert_array_equal(
        Classifier(loaded, torch.device("cpu")).predict(_inputs()), direct.numpy()
    )
    assert not loaded.model.training


def test_float16_bundle_loads_close_to_float32(tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = build_network("resnet10t", TINY_SPEC).eval()
    b32 = save_bundle(tmp_path / "f32", net, tiny_card())
    b16 = save_bundle(tmp_path / "f16", net, tiny_card(weights_dtype="float16"))
    assert (tmp_path / "f16" / "model.safetensors").stat().st_size < (
        tmp_path / "f32" / "model.safetensors"
    ).stat().st_size * 0.6
    p32 = Classifier(b32, torch.device("cpu")).predict(_inputs())
    p16 = Classifier(b16, torch.device("cpu")).predict(_inputs())
    np.testing.assert_allclose(p32, p16, atol=1e-2)


def test_sha256_mismatch_is_refused(tiny_bundle: object, tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(path)


def test_card_with_wrong_sha_is_refused(tiny_bundle: object, tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    card = json.loads((path / "model.json").read_text())
    card["weights_sha256"] = "0" * 64
    (path / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="refusing"):
        load_bundle(path)


def test_missing_and_malformed_bundles_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no model.json"):
        load_bundle(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(BundleError, match="invalid"):
        load_bundle(tmp_path)
    (tmp_path / "model.json").write_text(tiny_card().to_json())
    with pytest.raises(BundleError, match="no model.safetensors"):
        load_bundle(tmp_path)


def test_weights_of_other_architecture_are_refused(tiny_bundle: object, tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    card = json.loads((path / "model.json").read_text())
    card["architecture"] = "resnet18"
    (path / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(path)


def test_card_validation() -> None:
    with pytest.raises(ValueError, match="positive_class"):
        tiny_card(positive_class="covid")
    with pytest.raises(ValueError, match="two distinct"):
        tiny_card(classes=["a", "b", "c"], positive_class="a")
    card = tiny_card()
    assert card.finding["value"] == "233604007" and card.finding.scheme == "SCT"
    assert card.preprocess_spec == TINY_SPEC


def test_default_bundle_path_is_inside_package() -> None:
    path = default_bundle_path()
    assert path.parts[-3:] == ("model", "bundles", "pneumonia")
