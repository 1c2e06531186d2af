"""One preprocessing for every source: a JPEG and the same image as 16-bit DX DICOM
(MONOCHROME1 and MONOCHROME2) give the same model input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.pipeline import model_pixels, to_pixel_meta
from dicom_io.reader import read_image
from model.preprocess import PreprocessSpec, load_image_file, preprocess
from tests.peers.dicomgen import make_dx_from_image

SPEC = PreprocessSpec(input_size=96, channels=3)


def _radiograph_like_jpeg(path: Path) -> Path:
    """A smooth 'chest' with a black border and a white marker, like a real film.

    More than 0.5 % of the pixels are exactly 0 and exactly 255, so the percentile range
    used for a JPEG (no VOI window) is the full 0..255 range the DICOM window spans.
    """
    yy, xx = np.mgrid[0:240, 0:200]
    img = 90 + 60 * np.exp(-((yy - 120) ** 2 / 5000 + (xx - 100) ** 2 / 3000))
    img += 25 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    img[:, :12] = 0
    img[200:230, 150:190] = 255
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)
    return path


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_jpeg_and_dx_dicom_give_the_same_model_input(tmp_path: Path, photometric: str) -> None:
    jpeg = _radiograph_like_jpeg(tmp_path / "cxr.jpg")
    pixels, meta = load_image_file(jpeg)
    from_jpeg = preprocess(pixels, meta, SPEC)

    dcm = tmp_path / f"{photometric}.dcm"
    make_dx_from_image(jpeg, dcm, photometric=photometric, bits=16)  # type: ignore[arg-type]
    image = read_image(dcm)
    dicom_meta = to_pixel_meta(image)
    assert image.photometric == photometric and image.pixels.dtype.itemsize == 2
    # the grey levels come from dicom_io's grayscale pipeline (VOI window applied: P-values)
    assert dicom_meta.photometric == "MONOCHROME2" and dicom_meta.voi_lut_function == "LINEAR_EXACT"
    from_dicom = preprocess(model_pixels(image), dicom_meta, SPEC)

    assert from_dicom.shape == from_jpeg.shape == (3, 96, 96)
    # normalised units (std 0.25): 0.02 is half an 8-bit grey level
    np.testing.assert_allclose(from_dicom, from_jpeg, atol=0.02)
    assert float(np.abs(from_dicom - from_jpeg).mean()) < 0.005
