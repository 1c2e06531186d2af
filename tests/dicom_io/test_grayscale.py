"""The one grayscale pipeline (PS3.4 N.2): equivalent encodings of one radiograph give the
same presentation values, and the LUT steps equal the formulas of PS3.3 C.11."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from daemon.pipeline import model_pixels, to_pixel_meta
from dicom_io import grayscale
from dicom_io.grayscale import P_VALUE_MAX, presentation_values
from dicom_io.reader import read_image
from model.pixels import PixelMeta
from model.preprocess import PreprocessSpec, preprocess
from tests.conftest import shared_path
from tests.corpus import generate as corpus

SPEC = PreprocessSpec(input_size=160, channels=1)


@pytest.fixture(scope="module")
def bases() -> dict[str, Dataset]:
    return corpus.make_bases(
        shared_path("cxr", "kermany-pneumonia-train"), shared_path("dicom", "chest-real", "files")
    )


def _p(ds: Dataset) -> np.ndarray:
    grey = presentation_values(ds, ds.pixel_array)
    assert grey.voi_applied and grey.photometric == "MONOCHROME2"
    return grey.values.astype(np.int64)


def _mutated(ds: Dataset, mutate: corpus.Mutation) -> Dataset:
    out = copy.deepcopy(ds)
    mutate(out)
    return out


pytestmark = pytest.mark.shared


def test_linear_window_follows_ps3_3_c_11_2_1_2(bases: dict[str, Dataset]) -> None:
    ds = bases["dx16"]
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(np.float64)
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * P_VALUE_MAX
    np.testing.assert_allclose(_p(ds), expected, atol=1.0)


@pytest.mark.parametrize(
    ("base", "mutation"),
    [
        ("cr12", corpus._junk_high_bits),  # bits above Bits Stored are ignored
        ("cr12", corpus._signed),  # signed stored values + intercept: same modality values
        ("dx16", corpus._rescale),  # slope/intercept with the window in output units
        ("dx16", corpus._inverse_m2),  # inverted stored values + Presentation LUT INVERSE
    ],
)
def test_equivalent_encodings_give_the_same_p_values(
    bases: dict[str, Dataset], base: str, mutation: corpus.Mutation
) -> None:
    ds = bases[base]
    if mutation is corpus._signed:  # the window is dropped: compare the modality values
        signed = _mutated(ds, mutation)
        other = presentation_values(signed, signed.pixel_array)
        assert not other.voi_applied and signed.pixel_array.min() < 0
        np.testing.assert_array_equal(other.values, ds.pixel_array.astype(np.float32))
        return
    np.testing.assert_allclose(_p(_mutated(ds, mutation)), _p(ds), atol=3.0)  # of 65535


def test_monochrome1_with_inverse_shape_is_one_inversion(bases: dict[str, Dataset]) -> None:
    m1 = bases["dx16_m1"]
    assert m1.PhotometricInterpretation == "MONOCHROME1" and m1.PresentationLUTShape == "INVERSE"
    stored = m1.pixel_array.astype(np.float64)
    c, w = float(m1.WindowCenter), float(m1.WindowWidth)
    expected = (1 - np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0, 1)) * P_VALUE_MAX
    np.testing.assert_allclose(_p(m1), expected, atol=1.0)


def test_voi_lut_sequence_is_applied(bases: dict[str, Dataset]) -> None:
    ds = _mutated(bases["dx16"], corpus._voi_lut)
    lut = np.frombuffer(ds.VOILUTSequence[0].LUTData, dtype="<u2").astype(np.float64)
    expected = lut[ds.pixel_array] / lut.max() * P_VALUE_MAX
    np.testing.assert_allclose(_p(ds), expected, atol=1.0)


def test_padding_is_black_and_does_not_move_the_rest(bases: dict[str, Dataset]) -> None:
    for base in ("dx16", "dx16_m1"):
        padded = _mutated(bases[base], corpus._padding)
        out = _p(padded)
        assert (out[:, :20] == 0).all() and (out[:, -20:] == 0).all()
        np.testing.assert_allclose(out[:, 20:-20], _p(bases[base])[:, 20:-20], atol=1.0)


def test_unusable_window_is_ignored_and_named(bases: dict[str, Dataset]) -> None:
    ds = _mutated(bases["dx16"], corpus._set(WindowWidth=0))
    grey = presentation_values(ds, ds.pixel_array)
    assert not grey.voi_applied and grey.window is None
    assert any("WindowWidth" in note for note in grey.notes)


def test_model_input_is_the_same_for_m1_and_m2_files(
    bases: dict[str, Dataset], tmp_path: Path
) -> None:
    """MONOCHROME1 + INVERSE and MONOCHROME2 of one radiograph: one model input."""
    m2 = bases["dx16"]
    m1 = copy.deepcopy(m2)
    corpus._inverse_m2(m1)
    m1.PhotometricInterpretation = "MONOCHROME1"
    del m1.PresentationLUTShape  # CR style: MONOCHROME1 alone
    inputs = []
    for name, ds in (("m1", m1), ("m2", m2)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        image = read_image(path)
        inputs.append(preprocess(model_pixels(image), to_pixel_meta(image), SPEC))
    np.testing.assert_allclose(inputs[0], inputs[1], atol=0.02)


def _per_pixel(ds: Dataset, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as patch:
        patch.setattr(grayscale, "_LEVELS_MAX", 0)  # every image goes pixel by pixel
        return presentation_values(ds, ds.pixel_array)


@pytest.mark.parametrize("name", sorted(corpus.GRAYSCALE))
def test_lookup_table_path_equals_the_per_pixel_pipeline(
    bases: dict[str, Dataset], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The distinct-value table (fast path) gives the per-pixel result bit for bit."""
    base, mutation = corpus.GRAYSCALE[name]
    ds = _mutated(bases[base], mutation)
    fast = presentation_values(ds, ds.pixel_array)
    slow = _per_pixel(ds, monkeypatch)
    assert isinstance(slow, grayscale.PresentationImage)
    assert (fast.photometric, fast.voi_applied, fast.notes) == (
        slow.photometric,
        slow.voi_applied,
        slow.notes,
    )
    np.testing.assert_array_equal(fast.values, slow.values)
    before = (fast.unwindowed or fast, slow.unwindowed or slow)
    np.testing.assert_array_equal(before[0].values, before[1].values)
    meta = (to_pixel_meta_of(before[0]), to_pixel_meta_of(before[1]))
    np.testing.assert_array_equal(
        preprocess(before[0].values, meta[0], SPEC), preprocess(before[1].values, meta[1], SPEC)
    )


def to_pixel_meta_of(image: grayscale.PresentationImage) -> PixelMeta:
    """The model's view of unwindowed values: their polarity, the image's own range."""
    return PixelMeta(photometric=image.photometric)
