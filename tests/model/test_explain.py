"""Grad-CAM explanations (``Classifier.explain``) and the display image (``to_display``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import Bundle, build_network, default_bundle_path, load_bundle, save_bundle
from model.explain import Explanation, cam_to_source, grad_cam
from model.infer import Classifier
from model.pixels import PixelMeta
from model.preprocess import (
    CropBox,
    PreprocessSpec,
    letterbox_geometry,
    preprocess,
    to_display,
    unit_intensity,
)
from tests.model.conftest import tiny_card

# letterbox: a non-square source inside a square input, so the padding must be undone
BLOB_SPEC = PreprocessSpec(
    input_size=96, channels=1, geometry="letterbox", intensity="voi", crop_borders=False
)
BLOB_SHAPE = (120, 90)  # (H, W): not square, so the letterbox must be undone
BLOB_SIGMA_PX = 7.0
# resnet10t has output stride 32: a 3x3 last stage, one cell = 40 source pixels here
CELL_PX = 32 * BLOB_SHAPE[0] / BLOB_SPEC.input_size


def _blob_image(rng: np.random.Generator, centre: tuple[int, int] | None) -> np.ndarray:
    """Noise on a mid-grey background, plus a bright Gaussian blob at ``centre`` (row, col)."""
    yy, xx = np.mgrid[0 : BLOB_SHAPE[0], 0 : BLOB_SHAPE[1]]
    img = rng.normal(900.0, 60.0, size=BLOB_SHAPE)
    if centre is not None:
        cy, cx = centre
        img += 1400.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * BLOB_SIGMA_PX**2))
    # fixed intensity range so the blob never rescales the background away
    out: np.ndarray = np.clip(img, 0, 4095).astype(np.uint16)
    return out


def _blob_meta() -> PixelMeta:
    return PixelMeta(window_center=1500.0, window_width=2400.0, bits_stored=12)


def _random_centre(rng: np.random.Generator) -> tuple[int, int]:
    margin = int(2 * BLOB_SIGMA_PX)
    return (
        int(rng.integers(margin, BLOB_SHAPE[0] - margin)),
        int(rng.integers(margin, BLOB_SHAPE[1] - margin)),
    )


@pytest.fixture(scope="module")
def blob_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A resnet10t trained for a few dozen steps to say 'blob present'."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_network("resnet10t", BLOB_SPEC)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    labels = np.arange(8) % 2

    def batch() -> torch.Tensor:
        return torch.from_numpy(
            np.stack(
                [
                    preprocess(
                        _blob_image(rng, _random_centre(rng) if y else None),
                        _blob_meta(),
                        BLOB_SPEC,
                    )
                    for y in labels
                ]
            )
        )

    net.train()
    losses = []
    for _ in range(40):
        loss = loss_fn(net(batch()).reshape(-1), torch.from_numpy(labels.astype(np.float32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5]), losses
    # so few steps leave BatchNorm running statistics behind the weights: re-estimate them
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        for _ in range(4):
            net(batch())
    return save_bundle(
        tmp_path_factory.mktemp("blob"), net, tiny_card(preprocessing=BLOB_SPEC.to_dict())
    )


def test_heatmap_peak_lies_on_the_blob(blob_bundle: Bundle) -> None:
    clf = Classifier(blob_bundle, torch.device("cpu"), batch_size=4)
    rng = np.random.default_rng(123)
    centres = [(20, 20), (100, 70), (25, 68), (96, 18), (60, 45), (50, 22)]
    items = [(_blob_image(rng, c), _blob_meta()) for c in centres]
    explanations = clf.explain(items)
    blank = clf.classify([(_blob_image(rng, None), _blob_meta())])[0].probability
    yy, xx = np.mgrid[0 : BLOB_SHAPE[0], 0 : BLOB_SHAPE[1]]
    for centre, exp in zip(centres, explanations, strict=True):
        assert exp.probability > 0.9 > blank
        heat = exp.heatmap
        # the blob sits on the heatmap's peak plateau ...
        assert heat[centre] >= 0.6, (centre, float(heat[centre]))
        peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
        assert np.hypot(peak[0] - centre[0], peak[1] - centre[1]) <= CELL_PX, (centre, peak)
        # ... and the blob is far hotter than the rest of the image
        radius = np.hypot(yy - centre[0], xx - centre[1])
        on_blob = float(heat[radius < 2 * BLOB_SIGMA_PX].mean())
        far = float(heat[radius > 5 * BLOB_SIGMA_PX].mean())
        assert on_blob > 3 * far, (centre, on_blob, far)


def test_explain_agrees_with_classify(blob_bundle: Bundle) -> None:
    rng = np.random.default_rng(9)
    items = [
        (_blob_image(rng, _random_centre(rng) if k % 2 else None), _blob_meta()) for k in range(5)
    ]
    items.append((rng.integers(0, 255, (90, 200)).astype(np.uint8), PixelMeta()))
    for batch_size in (1, 4):
        clf = Classifier(blob_bundle, torch.device("cpu"), batch_size=batch_size)
        probs = [p.probability for p in clf.classify(items)]
        explained = [e.probability for e in clf.explain(items)]
        np.testing.assert_allclose(explained, probs, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "photometric"),
    [((50, 40), "MONOCHROME2"), ((37, 91), "MONOCHROME1"), ((64, 64), "MONOCHROME2")],
)
def test_heatmap_on_source_grid(
    tiny_bundle: Bundle, shape: tuple[int, int], photometric: str
) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, shape).astype(np.uint16)
    (exp,) = Classifier(tiny_bundle, torch.device("cpu")).explain(
        [(pixels, PixelMeta(photometric=photometric))]
    )
    assert isinstance(exp, Explanation)
    assert exp.heatmap.shape == shape
    assert exp.heatmap.dtype == np.float32
    assert float(exp.heatmap.min()) >= 0.0 and float(exp.heatmap.max()) <= 1.0
    assert 0.0 <= exp.probability <= 1.0


def test_heatmap_of_rgb_source_has_its_height_and_width(tiny_bundle: Bundle) -> None:
    rgb = np.random.default_rng(2).integers(0, 255, (45, 70, 3)).astype(np.uint8)
    (exp,) = Classifier(tiny_bundle, torch.device("cpu")).explain(
        [(rgb, PixelMeta(photometric="RGB"))]
    )
    assert exp.heatmap.shape == (45, 70)


def test_explain_of_nothing_is_empty(tiny_bundle: Bundle) -> None:
    assert Classifier(tiny_bundle, torch.device("cpu")).explain([]) == []


LETTERBOX_64 = PreprocessSpec(input_size=64, channels=1, geometry="letterbox")


def test_cam_to_source_undoes_the_squash_and_the_border_crop() -> None:
    # a 100 x 50 source whose rows 0..19 were cropped as a border: the whole 64 x 64
    # input maps onto rows 20..99; a hot spot at the input centre lands at the centre of
    # the kept part, and nothing lands on the cropped border.
    spec = PreprocessSpec(input_size=64, channels=1)
    cam = np.zeros((8, 8), dtype=np.float32)
    cam[3:5, 3:5] = 1.0
    heat = cam_to_source(cam, (100, 50), spec, CropBox(20, 100, 0, 50))
    assert heat.shape == (100, 50)
    assert float(heat[:20].max()) == 0.0
    yy, xx = np.mgrid[0:100, 0:50]
    centroid = (float((heat * yy).sum() / heat.sum()), float((heat * xx).sum() / heat.sum()))
    np.testing.assert_allclose(centroid, (59.5, 24.5), atol=0.5)


def test_cam_to_source_undoes_the_letterbox() -> None:
    # a source 100 high, 50 wide sits in columns 16..47 of a 64 input; a map that is hot
    # only in the left padding must not leak into the source image, one hot in the
    # middle must peak in the middle of the source.
    box = letterbox_geometry((100, 50), 64)
    assert (box.resized_h, box.resized_w, box.pad_top, box.pad_left) == (64, 32, 0, 16)
    cam = np.zeros((8, 8), dtype=np.float32)
    cam[3:5, 3:5] = 1.0
    heat = cam_to_source(cam, (100, 50), LETTERBOX_64)
    assert heat.shape == (100, 50)
    yy, xx = np.mgrid[0:100, 0:50]
    centroid = (float((heat * yy).sum() / heat.sum()), float((heat * xx).sum() / heat.sum()))
    np.testing.assert_allclose(centroid, (49.5, 24.5), atol=0.5)
    assert float(heat.max()) == 1.0
    padding_only = np.zeros((8, 8), dtype=np.float32)
    padding_only[:, 0] = 1.0
    assert float(cam_to_source(padding_only, (100, 50), LETTERBOX_64).max()) == 0.0
    assert float(cam_to_source(np.zeros((8, 8), np.float32), (10, 10), LETTERBOX_64).max()) == 0.0


@pytest.mark.parametrize("shape", [(100, 50), (50, 100), (33, 71), (64, 64), (7, 300)])
def test_letterbox_geometry_matches_preprocess(shape: tuple[int, int]) -> None:
    spec = PreprocessSpec(
        input_size=64, channels=1, mean=-1.0, std=1.0, geometry="letterbox", intensity="voi"
    )
    # constant white image: after normalisation the image is 2 and the padding 1
    pixels = np.full(shape, 100, dtype=np.uint16)
    out = preprocess(pixels, PixelMeta(window_center=50.0, window_width=20.0), spec)[0]
    box = letterbox_geometry(shape, 64)
    inside = np.zeros_like(out, dtype=bool)
    inside[
        box.pad_top : box.pad_top + box.resized_h, box.pad_left : box.pad_left + box.resized_w
    ] = True
    np.testing.assert_allclose(out[inside], 2.0, atol=1e-5)
    np.testing.assert_allclose(out[~inside], 1.0, atol=1e-5)


def test_grad_cam_refuses_a_network_without_feature_api() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.Flatten())
    with pytest.raises(TypeError, match="forward_features"):
        grad_cam(net, torch.zeros(1, 1, 8, 8))


def test_to_display_uses_the_model_intensity_path() -> None:
    rng = np.random.default_rng(3)
    stored = rng.integers(0, 4096, (70, 90)).astype(np.uint16)
    meta = PixelMeta(
        rescale_slope=2.0, rescale_intercept=-1024.0, window_center=2000.0, window_width=3000.0
    )
    shown = to_display(stored, meta)
    assert shown.dtype == np.uint8 and shown.shape == (70, 90)
    np.testing.assert_array_equal(
        shown, np.rint(unit_intensity(stored, meta) * 255).astype(np.uint8)
    )
    # MONOCHROME1 shows the inverted image
    inverted = to_display(stored, PixelMeta(photometric="MONOCHROME1", **_window_of(meta)))
    assert np.abs(inverted.astype(int) - (255 - shown.astype(int))).max() <= 1
    # without a window: percentile stretch (0.5 / 99.5) to the full 8-bit range
    stretched = to_display(stored, PixelMeta())
    assert stretched.min() == 0 and stretched.max() == 255
    assert np.mean(stretched == 0) < 0.01


def _window_of(meta: PixelMeta) -> dict[str, float | None]:
    return {
        "rescale_slope": meta.rescale_slope,
        "rescale_intercept": meta.rescale_intercept,
        "window_center": meta.window_center,
        "window_width": meta.window_width,
    }


def test_to_display_refuses_bad_pixels(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        to_display(np.zeros((4, 4, 2), dtype=np.uint8), PixelMeta())
    bad = np.full((4, 4), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        to_display(bad, PixelMeta())


def _assert_single_pass_equals_two_pass(clf: Classifier, tensors: list[np.ndarray]) -> None:
    plain = clf.classify_prepared(tensors)
    single = clf.classify_with_cams(tensors)
    two_pass = clf.heatmaps_prepared(tensors)
    # the classify results are those of the path without maps, exactly
    assert [(p.probability, p.positive, p.not_applicable) for p in single] == [
        (p.probability, p.positive, p.not_applicable) for p in plain
    ]
    assert all(p.cam is None for p in plain)
    for pred, (prob, cam) in zip(single, two_pass, strict=True):
        assert pred.cam is not None and pred.cam.dtype == np.float32
        assert pred.probability == pytest.approx(prob, abs=1e-6)
        np.testing.assert_allclose(pred.cam, cam, rtol=1e-5, atol=1e-6 * float(cam.max() + 1))
        assert float(cam.max()) > 0.0  # a real map is compared, not two zero arrays


def test_single_pass_cams_equal_the_two_pass_grad_cam(blob_bundle: Bundle) -> None:
    # 5 images, batch 2: several batches and a partial one
    rng = np.random.default_rng(11)
    clf = Classifier(blob_bundle, device=torch.device("cpu"), batch_size=2)
    tensors = [
        preprocess(_blob_image(rng, _random_centre(rng)), _blob_meta(), BLOB_SPEC) for _ in range(5)
    ]
    _assert_single_pass_equals_two_pass(clf, tensors)


def test_single_pass_cams_with_the_default_bundle_and_its_gate() -> None:
    bundle = load_bundle(default_bundle_path())
    assert bundle.gate is not None  # the gate's verdicts come from the same pass
    clf = Classifier(bundle, device=torch.device("cpu"), batch_size=4)
    rng = np.random.default_rng(5)
    meta = PixelMeta(window_center=2048.0, window_width=4096.0, bits_stored=12)
    images = [rng.integers(0, 4096, (300, 260)).astype(np.uint16) for _ in range(3)]
    images[1][100:200, 80:180] += 1500  # not all alike
    tensors = [preprocess(img, meta, bundle.card.preprocess_spec) for img in images]
    _assert_single_pass_equals_two_pass(clf, tensors)
