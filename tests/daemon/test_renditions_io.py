"""Renditions written as real DX files and read back through dicom_io give what was rendered."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.renditions import read_through_dicom, to_dataset
from model.preprocess import PreprocessSpec, preprocess
from model.renditions import RENDITIONS, RenditionSpec, direct_reader, render


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:120, 0:100]
    image: np.ndarray = ((yy * 2 + xx) % 256).astype(np.uint8)
    return image


@pytest.mark.parametrize("spec", RENDITIONS, ids=lambda s: s.name)
def test_dicom_round_trip_equals_the_rendered_attributes(spec: RenditionSpec) -> None:
    small = RenditionSpec(**{**spec.__dict__, "shape": (150, 90) if spec.shape else None})
    rendition = render(_image(), small)
    pixels, meta = read_through_dicom(rendition)
    direct_pixels, direct_meta = direct_reader(rendition)
    # The daemon's path applies the Modality LUT and fills Pixel Padding in dicom_io, the
    # direct reader leaves both to the model: the model input must be the same either way.
    model_spec = PreprocessSpec(input_size=64, channels=1)
    np.testing.assert_allclose(
        preprocess(pixels, meta, model_spec),
        preprocess(direct_pixels, direct_meta, model_spec),
        atol=2e-3,
    )
    if not spec.padding_px:
        np.testing.assert_allclose(
            pixels, direct_pixels * direct_meta.rescale_slope + direct_meta.rescale_intercept
        )
    assert meta.voi_lut_function == direct_meta.voi_lut_function
    assert meta.bits_stored == spec.bits_stored
    for got, want in (
        (meta.window_center, direct_meta.window_center),
        (meta.window_width, direct_meta.window_width),
    ):
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert got == pytest.approx(want, abs=0.01)


def test_dataset_carries_voi_lut_sequence_and_padding() -> None:
    lut = next(s for s in RENDITIONS if s.window == "lut")
    rendition = render(_image(), lut)
    assert rendition.voi_lut_data is not None
    item = to_dataset(rendition).VOILUTSequence[0]
    assert int(item.LUTDescriptor[0]) == len(rendition.voi_lut_data)
    padded = next(s for s in RENDITIONS if s.padding_px)
    ds = to_dataset(render(_image(), padded))
    assert ds.PixelPaddingValue == 0 and ds.Modality == "DX"
