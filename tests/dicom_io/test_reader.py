"""Reader: header reads, pixel decoding across transfer syntaxes, clean decode failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import JPEG2000Lossless

from dicom_io.reader import DecodeError, read_dataset, read_header, read_image
from tests.conftest import shared_path
from tests.dicom_io.conftest import make_dx, save

CHEST = ("dicom", "chest-real", "files")
ZOO = ("dicom", "transfer-syntax-zoo", "files")


@pytest.mark.shared
def test_decode_chest_jpeg2000() -> None:
    path = shared_path(*CHEST, "JPEG2KLossless_1s_1f_u_16_16.dcm")

    header = read_header(path)
    image = read_image(path)

    assert header.modality == "DX"
    assert header.transfer_syntax_uid == JPEG2000Lossless
    assert (header.rows, header.columns) == (1416, 1420)
    assert image.pixels.shape == (1416, 1420)
    assert image.pixels.dtype == np.uint16
    assert image.photometric == "MONOCHROME2"
    assert image.bits_stored == 16
    assert int(image.pixels.max()) > int(image.pixels.min())


@pytest.mark.shared
def test_malformed_jpeg2000_raises_decode_error() -> None:
    path = shared_path(*CHEST, "966_malformed.dcm")

    header = read_header(path)  # the header itself is fine
    with pytest.raises(DecodeError) as info:
        read_image(path)

    assert header.photometric == "MONOCHROME1"
    assert "decode" in info.value.reason.lower()
    assert info.value.path == path


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "photometric"),
    [
        ("SC_rgb_jpeg_baseline.dcm", "RGB"),
        ("MR_small_explicitBE.dcm", "MONOCHROME2"),
        ("MR_small_jpegls_lossless.dcm", "MONOCHROME2"),
        ("MR_small_rle.dcm", "MONOCHROME2"),
        ("image_deflated.dcm", "MONOCHROME2"),
        ("MR_multiframe10_j2k_lossless.dcm", "MONOCHROME2"),
    ],
)
def test_transfer_syntax_zoo(name: str, photometric: str) -> None:
    path = shared_path(*ZOO, name)
    image = read_image(path)
    ds = dcmread(path)
    assert image.photometric == photometric
    assert image.pixels.shape[:2] == (ds.Rows, ds.Columns)
    assert image.pixels.dtype.isnative
    if photometric == "RGB":
        assert image.pixels.shape[2] == 3


def test_monochrome1_window_rescale_and_spacing(tmp_path: Path) -> None:
    ds = make_dx(photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-10)
    ds.WindowCenter = [1000, 1500]
    ds.WindowWidth = [400, 800]
    ds.VOILUTFunction = "SIGMOID"
    path = save(ds, tmp_path / "m1.dcm")

    image = read_image(path)

    assert image.photometric == "MONOCHROME1"
    assert (image.window_center, image.window_width) == (1000.0, 400.0)
    assert image.voi_lut_function == "SIGMOID"
    assert (image.rescale_slope, image.rescale_intercept) == (2.0, -10.0)
    assert image.pixel_spacing_mm == (0.2, 0.2)
    assert image.bits_stored == 12
    np.testing.assert_array_equal(image.pixels, ds.pixel_array)  # stored values, no rescale


def test_defaults_when_optional_attributes_absent(tmp_path: Path) -> None:
    ds = make_dx()
    for keyword in (
        "WindowCenter",
        "WindowWidth",
        "RescaleSlope",
        "RescaleIntercept",
        "ImagerPixelSpacing",
    ):
        delattr(ds, keyword)
    image = read_image(save(ds, tmp_path / "x.dcm"))
    assert (image.window_center, image.window_width) == (None, None)
    assert (image.rescale_slope, image.rescale_intercept) == (1.0, 0.0)
    assert image.voi_lut_function == "LINEAR"
    assert image.pixel_spacing_mm is None


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_header_fields(tmp_path: Path) -> None:
    ds = make_dx(ViewPosition="ll", ImageType=["DERIVED", "SECONDARY"], BodyPartExamined="chest")
    header = read_header(save(ds, tmp_path / "h.dcm"))
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.view_position == "LL"
    assert header.body_part == "CHEST"
    assert header.image_type == ("DERIVED", "SECONDARY")
    assert header.number_of_frames == 1
    assert header.laterality == "U"
    assert header.path == tmp_path / "h.dcm"


def test_not_dicom_raises_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"\x00" * 10 + b"hello")
    with pytest.raises(DecodeError):
        read_header(path)
    with pytest.raises(DecodeError):
        read_image(path)
    with pytest.raises(DecodeError):
        read_dataset(path)


def test_missing_uid_raises_decode_error(tmp_path: Path) -> None:
    ds = make_dx()
    del ds.SeriesInstanceUID
    with pytest.raises(DecodeError, match="SeriesInstanceUID"):
        read_header(save(ds, tmp_path / "nouid.dcm"))


def test_truncated_pixel_data_raises_decode_error(tmp_path: Path) -> None:
    path = save(make_dx(rows=256, columns=256), tmp_path / "full.dcm")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(DecodeError):
        read_image(truncated)


def test_image_without_pixels_raises_decode_error(tmp_path: Path) -> None:
    ds = make_dx()
    del ds.PixelData
    with pytest.raises(DecodeError):
        read_image(save(ds, tmp_path / "nopix.dcm"))


def test_read_dataset_without_pixels(tmp_path: Path) -> None:
    path = save(make_dx(), tmp_path / "d.dcm")
    assert "PixelData" in read_dataset(path)
    assert "PixelData" not in read_dataset(path, with_pixels=False)


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian", "syntax"),
    [
        (True, True, "1.2.840.10008.1.2"),
        (False, True, "1.2.840.10008.1.2.1"),
        (False, False, "1.2.840.10008.1.2.2"),
    ],
)
def test_acr_nema_style_data_set_without_file_meta(
    tmp_path: Path, implicit_vr: bool, little_endian: bool, syntax: str
) -> None:
    ds = make_dx(rows=8, columns=6)
    expected = ds.pixel_array.copy()
    del ds.file_meta
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit_vr, little_endian
    if not little_endian:
        ds.PixelData = expected.astype(">u2").tobytes()
    write_dataset(buffer, ds)
    path = tmp_path / "raw.dcm"
    path.write_bytes(buffer.getvalue())  # no preamble, no DICM, no group 0002

    header = read_header(path)
    image = read_image(path)

    assert header.transfer_syntax_uid == syntax
    assert header.sop_instance_uid == ds.SOPInstanceUID
    np.testing.assert_array_equal(image.pixels, expected)


def test_random_bytes_are_not_taken_for_a_data_set(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DecodeError):
        read_header(path)


def test_species_and_descriptions_in_header(tmp_path: Path) -> None:
    ds = make_dx(PatientSpeciesDescription="Canis lupus familiaris", ProtocolName="Thorax lat")
    header = read_header(save(ds, tmp_path / "vet.dcm"))
    assert header.species == "CANIS LUPUS FAMILIARIS"
    assert "THORAX LAT" in header.descriptions
