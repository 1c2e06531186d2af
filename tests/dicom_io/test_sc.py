"""Heatmap Secondary Capture: validity (dciodvfy), references, pixels, and a real chest PNG."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from daemon.pipeline import model_pixels, to_pixel_meta
from dicom_io.grayscale import presentation_values
from dicom_io.reader import read_image
from dicom_io.render import blend_heatmap
from dicom_io.sc import WARNING_LINE, banner_lines, build_heatmap_sc, encode_in
from dicom_io.sr import AlgorithmInfo, FindingResult, result_uids
from model.pixels import PixelMeta
from model.preprocess import PreprocessSpec, to_display
from tests.conftest import shared_path
from tests.dicom_io.conftest import make_dx, require_tool

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
ALGORITHM = AlgorithmInfo(
    name="radflag-pneumonia",
    version="1.2.0",
    manufacturer="radflag project",
    weights_sha256="ab" * 32,
    threshold=0.5,
)
POSITIVE = FindingResult("233604007", "SCT", "Pneumonia", probability=0.87, present=True)


def _blob(shape: tuple[int, int], centre: tuple[float, float]) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = centre
    return np.exp(-(((yy - cy * h) / (h * 0.12)) ** 2 + ((xx - cx * w) / (w * 0.12)) ** 2)).astype(
        np.float32
    )


def _build(source: Dataset, display: np.ndarray, heatmap: np.ndarray | None) -> Dataset:
    series_uid, sop_uid = result_uids(
        str(source.StudyInstanceUID), ALGORITHM.name, ALGORITHM.version, "SC"
    )
    return build_heatmap_sc(
        source,
        display,
        heatmap,
        POSITIVE,
        ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
    )


def _display(source: Dataset) -> np.ndarray:
    """The source as a viewer shows it: the one grayscale pipeline, then the model's range."""
    grey = presentation_values(source, source.pixel_array)
    window = grey.window
    meta = PixelMeta(
        photometric=grey.photometric,
        window_center=None if window is None else window[0],
        window_width=None if window is None else window[1],
        voi_lut_function="LINEAR" if window is None else window[2],
    )
    return np.asarray(
        to_display(grey.values, meta, PreprocessSpec(input_size=224, channels=1)), dtype=np.uint8
    )


def _dciodvfy(path: Path) -> tuple[str, list[str]]:
    proc = subprocess.run(
        [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60
    )
    out = proc.stdout + proc.stderr
    return out, [line for line in out.splitlines() if line.startswith("Error")]


@pytest.mark.dcmtk
def test_sc_is_a_valid_secondary_capture(tmp_path: Path) -> None:
    source = make_dx(rows=96, columns=80)
    sc = _build(source, _display(source), _blob((96, 80), (0.5, 0.3)))
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    output, errors = _dciodvfy(path)
    assert "SCImage" in output
    assert errors == []


def test_sc_references_source_and_stays_in_the_study() -> None:
    source = make_dx()
    sc = _build(source, _display(source), _blob((64, 48), (0.5, 0.5)))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.BurnedInAnnotation == "YES"
    assert (sc.StudyInstanceUID, sc.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    (ref,) = sc.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert WARNING_LINE in sc.ImageComments and "0.87" in sc.ImageComments
    assert "radflag-pneumonia 1.2.0" in sc.ImageComments
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == result_uids(
        str(source.StudyInstanceUID), ALGORITHM.name, ALGORITHM.version, "SC"
    )


def test_heatmap_colours_hot_region_only() -> None:
    display = np.full((100, 100), 128, dtype=np.uint8)
    heat = np.zeros((100, 100), dtype=np.float32)
    heat[40:60, 40:60] = 1.0
    rgb = blend_heatmap(display, heat)
    assert rgb.shape == (100, 100, 3)
    assert (rgb[5, 5] == 128).all()  # cold: the image unchanged
    r, g, b = (int(c) for c in rgb[50, 50])
    assert r > b + 60 and r > g + 60  # hot: red dominates
    with pytest.raises(ValueError, match="heatmap shape"):
        blend_heatmap(display, heat[:50])
    with pytest.raises(ValueError, match="display"):
        blend_heatmap(display.astype(np.float32), heat)  # type: ignore[arg-type]


def test_blend_equals_the_alpha_formula_with_jet_colours() -> None:
    """The channel-by-channel blend gives round(255 * (g (1 - a) + jet(h) a)) exactly."""
    rng = np.random.default_rng(7)
    display = rng.integers(0, 256, (120, 90), dtype=np.uint8)
    heat = (rng.random((120, 90)) * 1.4 - 0.2).astype(np.float32)
    heat[0, 0] = np.nan
    h = np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0)
    alpha = (np.clip((h - 0.2) / 0.8, 0.0, 1.0) * 0.55)[..., None]
    jet = np.clip(1.5 - np.abs(4.0 * h[..., None] - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    grey = display.astype(np.float64)[..., None] / 255.0
    expected = np.round((grey * (1.0 - alpha) + jet * alpha) * 255.0)
    got = blend_heatmap(display, heat).astype(np.float64)
    assert np.abs(got - expected).max() <= 1.0  # float32 arithmetic: at most one grey level
    assert np.mean(got != expected) < 0.01


def test_banner_is_burned_in_above_the_image() -> None:
    source = make_dx(rows=64, columns=64)
    display = np.zeros((64, 64), dtype=np.uint8)
    sc = _build(source, display, None)
    pixels = sc.pixel_array
    # 64 px are enlarged 8x to 512; the banner strip sits on top.
    assert pixels.shape[1] == 512 and pixels.shape[0] > 512
    banner = pixels[: pixels.shape[0] - 512]
    assert banner.max() > 200  # text was drawn
    assert pixels[-512:].max() == 0  # the image itself stays black
    assert banner_lines(POSITIVE, ALGORITHM, heatmap=False)[-1].endswith("no heatmap available")


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_encode_in_is_lossless(tmp_path: Path, syntax: str) -> None:
    source = make_dx()
    sc = _build(source, _display(source), _blob((64, 48), (0.4, 0.6)))
    encoded = encode_in(sc, syntax)
    path = tmp_path / "enc.dcm"
    encoded.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(back.pixel_array, sc.pixel_array)
    assert back.SOPInstanceUID == sc.SOPInstanceUID  # same object, only re-encoded
    assert sc.file_meta.TransferSyntaxUID != syntax  # original untouched


def test_bad_inputs_are_named() -> None:
    source = make_dx()
    with pytest.raises(ValueError, match="sop_instance_uid"):
        build_heatmap_sc(
            source,
            _display(source),
            None,
            POSITIVE,
            ALGORITHM,
            series_instance_uid="1.2",
            sop_instance_uid="not-a-uid",
        )
    with pytest.raises(ValueError, match="not a transfer syntax"):
        encode_in(source, "1.2.3")


@pytest.mark.shared
@pytest.mark.dcmtk
def test_real_chest_image_rendered_to_png(tmp_path: Path) -> None:
    from tests.peers.dicomgen import kermany_images, make_study

    kermany = shared_path("cxr", "kermany-pneumonia-train")
    study = make_study(1, tmp_path / "study", images=kermany_images(kermany, 1, label="pneumonia"))
    source = dcmread(study.paths[0])
    image = read_image(study.paths[0])
    display = np.asarray(
        to_display(
            model_pixels(image), to_pixel_meta(image), PreprocessSpec(input_size=224, channels=1)
        ),
        dtype=np.uint8,
    )
    heat = _blob(display.shape, (0.6, 0.3))  # synthetic: right lower lobe (image left)
    sc = _build(source, display, heat)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert _dciodvfy(path)[1] == []
    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "heatmap_sc_kermany.png"
    Image.fromarray(sc.pixel_array).save(png)
    print(f"SC rendered to {png}")
    rgb = sc.pixel_array
    banner_rows = rgb.shape[0] - rgb.shape[1] * display.shape[0] // display.shape[1]
    body = rgb[banner_rows:]
    scale = body.shape[0] / display.shape[0]
    hot = body[int(0.6 * display.shape[0] * scale), int(0.3 * display.shape[1] * scale)]
    assert int(hot[0]) > int(hot[2]) + 60  # the hot spot is red, where the heatmap peaks
