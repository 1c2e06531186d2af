from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.pixels import PixelMeta
from model.preprocess import (
    PreprocessSpec,
    apply_voi_window,
    load_image_file,
    preprocess,
    to_unit_range,
    unit_intensity,
)
from tests.conftest import shared_path

# the VOI-window and letterbox behaviour of legacy bundles (intensity="voi")
SPEC = PreprocessSpec(
    input_size=64, channels=1, geometry="letterbox", intensity="voi", crop_borders=False
)


def _synthetic_16bit(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:120, 0:100]
    img = 2000 + 30 * yy + 10 * xx + rng.normal(0, 300, size=yy.shape)
    out: np.ndarray = np.clip(img, 0, 65535).astype(np.uint16)
    return out


def test_monochrome1_equals_inverted_monochrome2_without_window() -> None:
    img = _synthetic_16bit()
    inverted = (65535 - img.astype(np.int64)).astype(np.uint16)
    out1 = preprocess(inverted, PixelMeta(photometric="MONOCHROME1", bits_stored=16), SPEC)
    out2 = preprocess(img, PixelMeta(photometric="MONOCHROME2", bits_stored=16), SPEC)
    np.testing.assert_allclose(out1, out2, atol=1e-5)


def test_monochrome1_equals_inverted_monochrome2_with_window() -> None:
    img = _synthetic_16bit(1)
    inverted = (65535 - img.astype(np.int64)).astype(np.uint16)
    # MONOCHROME1 window mirrored around the inversion: c' = 65535 - c  (+1 for the LINEAR
    # half-pixel offset of PS3.3 C.11.2.1.2.1).
    m1 = PixelMeta(photometric="MONOCHROME1", window_center=65535 - 5000 + 1, window_width=4000)
    m2 = PixelMeta(photometric="MONOCHROME2", window_center=5000, window_width=4000)
    np.testing.assert_allclose(preprocess(inverted, m1, SPEC), preprocess(img, m2, SPEC), atol=1e-5)


def test_rescale_slope_intercept_applied_before_window() -> None:
    stored = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    meta = PixelMeta(
        rescale_slope=2.0, rescale_intercept=-100.0, window_center=200.5, window_width=201
    )
    unit = to_unit_range(stored, meta, SPEC)
    # rescaled: -100, 100, 300, 500; LINEAR window [100, 300] -> 0 .. 1
    expected = np.array([[0.0, 0.0], [1.0, 1.0]])
    expected[0, 1] = (100 - 200.0) / 200.0 + 0.5
    np.testing.assert_allclose(unit, expected, atol=1e-6)
    # same as feeding modality values directly
    direct = to_unit_range(
        stored.astype(np.float64) * 2 - 100, PixelMeta(window_center=200.5, window_width=201), SPEC
    )
    np.testing.assert_allclose(unit, direct, atol=1e-6)


def test_linear_window_matches_standard_formula() -> None:
    c, w = 40.0, 400.0
    x = np.array([c - 0.5 - (w - 1) / 2, c - 0.5, c - 0.5 + (w - 1) / 2, c - 0.5 + (w - 1) / 2 + 1])
    y = apply_voi_window(x, c, w, "LINEAR")
    np.testing.assert_allclose(y, [0.0, 0.5, 1.0, 1.0], atol=1e-9)
    exact = apply_voi_window(np.array([c - w / 2, c, c + w / 2]), c, w, "LINEAR_EXACT")
    np.testing.assert_allclose(exact, [0.0, 0.5, 1.0])
    sig = apply_voi_window(np.array([c - 1e6, c, c + 1e6]), c, w, "SIGMOID")
    np.testing.assert_allclose(sig, [0.0, 0.5, 1.0], atol=1e-9)


def test_window_changes_output() -> None:
    img = _synthetic_16bit(2)
    a = preprocess(img, PixelMeta(window_center=4000, window_width=2000), SPEC)
    b = preprocess(img, PixelMeta(), SPEC)
    assert np.abs(a - b).max() > 0.1


def test_jpeg_and_16bit_scaled_pixels_give_same_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:90, 0:70]
    img8 = np.clip(40 + yy + xx + rng.normal(0, 10, yy.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "x.jpg"
    Image.fromarray(img8).save(path, quality=95)
    decoded, meta = load_image_file(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (90, 70)
    from_jpeg = preprocess(decoded, meta, SPEC)
    as16 = decoded.astype(np.uint16) * 257
    from_16 = preprocess(as16, PixelMeta(bits_stored=16), SPEC)
    np.testing.assert_allclose(from_jpeg, from_16, atol=1e-5)


@pytest.mark.shared
def test_real_kermany_jpeg_and_16bit_agree() -> None:
    root = shared_path("cxr", "kermany-pneumonia-train")
    path = next((root / "images").rglob("*.jpeg"))
    decoded, meta = load_image_file(path)
    a = preprocess(decoded, meta, SPEC)
    b = preprocess(decoded.astype(np.uint16) * 257, PixelMeta(bits_stored=16), SPEC)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_output_shape_dtype_letterbox_and_channels() -> None:
    img = np.full((100, 50), 1000, dtype=np.int16)
    img[:, 25:] = 3000
    out = preprocess(img, PixelMeta(), SPEC)
    assert out.shape == (1, 64, 64) and out.dtype == np.float32
    black = (0.0 - SPEC.mean) / SPEC.std
    # tall image: the sides are padded with black, the whole image is kept
    assert np.allclose(out[0, :, :8], black)
    assert np.allclose(out[0, :, -8:], black)
    assert out[0, 32, 40] > out[0, 32, 20]
    spec3 = PreprocessSpec(input_size=48, channels=3)
    out3 = preprocess(img, PixelMeta(), spec3)
    assert out3.shape == (3, 48, 48)
    np.testing.assert_array_equal(out3[0], out3[2])


def test_rgb_input_and_determinism() -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
    a = preprocess(rgb, PixelMeta(photometric="RGB"), SPEC)
    b = preprocess(rgb, PixelMeta(photometric="RGB"), SPEC)
    assert a.shape == (1, 64, 64)
    np.testing.assert_array_equal(a, b)


def test_constant_image_is_not_an_error() -> None:
    out = preprocess(np.zeros((30, 30), dtype=np.uint16), PixelMeta(), SPEC)
    assert np.isfinite(out).all()


@pytest.mark.parametrize(
    "pixels",
    [np.zeros(10), np.zeros((4, 4, 4)), np.array([[np.nan, 1.0], [1.0, 1.0]]), np.zeros((1, 5))],
)
def test_bad_pixels_raise_value_error(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError):
        preprocess(pixels, PixelMeta(), SPEC)


def test_pixel_meta_validation() -> None:
    with pytest.raises(ValueError, match="photometric"):
        PixelMeta(photometric="PALETTE COLOR")
    with pytest.raises(ValueError, match="slope"):
        PixelMeta(rescale_slope=0.0)


@pytest.mark.parametrize(
    "meta",
    [
        PixelMeta(window_center=10.0),
        PixelMeta(window_center=10.0, window_width=0.5),
        PixelMeta(window_center=10.0, window_width=100.0, voi_lut_function="LOG"),
        PixelMeta(window_center=10.0, window_width=0.0, voi_lut_function="LINEAR_EXACT"),
    ],
)
def test_unusable_window_falls_back_to_image_range(
    meta: PixelMeta, caplog: pytest.LogCaptureFixture
) -> None:
    img = _synthetic_16bit(5)
    assert not meta.has_window and meta.window_problem() not in (None, "absent")
    out = preprocess(img, meta, SPEC)
    np.testing.assert_array_equal(out, preprocess(img, PixelMeta(), SPEC))
    assert "ignoring unusable VOI window" in caplog.text


def test_spec_round_trip_and_validation() -> None:
    spec = PreprocessSpec(input_size=96, channels=3, mean=0.4)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown"):
        PreprocessSpec.from_dict({"input_size": 96, "channels": 1, "colour": 1})
    with pytest.raises(ValueError, match="channels"):
        PreprocessSpec(input_size=96, channels=2)


def test_load_image_file_rejects_non_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image_file(bad)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("window", [None, (1800.0, 2400.0)])
@pytest.mark.parametrize(("slope", "intercept"), [(1.0, 0.0), (0.5, -1024.0), (-1.0, 4095.0)])
def test_lookup_table_path_equals_per_pixel_path(
    photometric: str, window: tuple[float, float] | None, slope: float, intercept: float
) -> None:
    # unit_intensity runs integer images through a lookup table and float images pixel by
    # pixel: the two implementations of the same intensity pipeline must agree.
    stored = np.random.default_rng(7).integers(0, 4096, size=(300, 260), dtype=np.uint16)
    meta = PixelMeta(
        photometric=photometric,
        rescale_slope=slope,
        rescale_intercept=intercept,
        window_center=window[0] if window else None,
        window_width=window[1] if window else None,
        bits_stored=12,
    )
    fast = unit_intensity(stored, meta)
    per_pixel = unit_intensity(stored.astype(np.float64), meta)
    np.testing.assert_allclose(fast, per_pixel, atol=1e-6)
