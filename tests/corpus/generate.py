"""The header-mutation conformance corpus: real chest images, headers as real archives send them.

Bases are real radiographs: the Kermany JPEGs made into DX/CR/SC files the way hospitals send
them (16/12/8-bit, MONOCHROME1/2, with and without VOI windows or VOI LUT sequences, a few at
clinical sizes such as 2500x2048 portrait and 2048x2500 landscape) and the real DX files of
``chest-real``. Every variant is one base with one systematic mutation, in its own study:

- every Type 2 attribute of the CR, DX and SC image IODs present but empty (PS3.3 A.2, A.26,
  A.8.1; PS3.5 7.4.5), and every Type 3 (and commonly missing Type 1/2) attribute absent;
- invalid values for each date, time, date-time, person name, age and code string the SR/SC
  copy (PS3.5 6.2), broken numbers (DS/IS), a broken UID;
- over-long strings, odd or wrong character sets, private tags;
- the grayscale zoo (PS3.4 N.2): rescale, Modality LUT Sequence, VOI LUT Sequence, several
  windows, SIGMOID, LINEAR_EXACT, INVERSE, signed pixels, junk high bits, pixel padding;
- SOP classes that carry chest radiographs (CR, DX presentation/processing, Secondary
  Capture single/multi-frame, grey/true colour) and inputs that are not frontal human chest
  radiographs (lateral, veterinary, hand, multi-frame, another vendor's SR and AI picture);
- the transfer syntaxes of the zoo (implicit/explicit/big endian, deflate, RLE, JPEG
  baseline/extended/lossless, JPEG-LS, JPEG 2000), written by pydicom or DCMTK;
- files that cannot be decoded (the corrupt JPEG 2000 of chest-real, truncated pixel data).

Each :class:`Variant` knows its expected outcome. To add a bug report: add a mutation to the
right family (or a new family) and its expectation; the corpus test picks it up.
"""

from __future__ import annotations

import copy
import hashlib
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tests.peers.dicomgen import build_dx_dataset, kermany_images, load_grayscale

DONE = "DONE"
NOT_APPLICABLE = "NOT_APPLICABLE"
FAILED = "FAILED"


@dataclass(frozen=True)
class Expected:
    """The outcome a variant must end in: a study state and, if not DONE, the reason.

    ``reason`` is the selection reason (NOT_APPLICABLE) or a substring of the failure reason
    (FAILED).
    """

    state: str = DONE
    reason: str | None = None


@dataclass(frozen=True)
class Variant:
    """One corpus file."""

    name: str
    family: str
    path: Path
    study_uid: str
    sop_uid: str
    expected: Expected


Mutation = Callable[[Dataset], None]


@dataclass(frozen=True)
class Case:
    """A mutation of a base, before it is written."""

    name: str
    family: str
    base: str
    mutate: Mutation
    expected: Expected = Expected()
    transfer_syntax: str = ExplicitVRLittleEndian


# ---------------------------------------------------------------------------------------
# bases


def _resized(grey: npt.NDArray[np.float32], rows: int, cols: int) -> npt.NDArray[np.float32]:
    image = Image.fromarray(grey, mode="F").resize((cols, rows), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 255.0)


def _stored(grey: npt.NDArray[np.float32], bits: int, photometric: str) -> npt.NDArray[np.uint16]:
    top = (1 << bits) - 1
    stored = np.rint(grey / 255.0 * top)
    if photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint8 if bits <= 8 else np.uint16)


def _dx(
    grey: npt.NDArray[np.float32],
    *,
    bits: int = 16,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    sop_class: str = DigitalXRayImageStorageForPresentation,
    window: bool = True,
) -> Dataset:
    ds = build_dx_dataset(
        _stored(grey, bits, photometric),
        bits=bits,
        photometric=photometric,  # type: ignore[arg-type]
        modality=modality,
        sop_class=sop_class,
        patient_id="CORPUS-0001",
        patient_name="CORPUS^PATIENT",
    )
    if not window:
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _as_sc(ds: Dataset, *, modality: str = "CR", rgb: bool = False) -> Dataset:
    """Turn a radiograph into a Secondary Capture Image (PS3.3 A.8.1), as digitised films come."""
    sc = Dataset()
    keep = [
        "SpecificCharacterSet",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "BodyPartExamined",
        "InstanceNumber",
        "PatientOrientation",
        "ContentDate",
        "ContentTime",
        "Manufacturer",
    ]
    for keyword in keep:
        if keyword in ds:
            sc[keyword] = copy.deepcopy(ds[keyword])
    sc.SOPClassUID = SecondaryCaptureImageStorage
    sc.SOPInstanceUID = ds.SOPInstanceUID
    sc.Modality = modality
    sc.ConversionType = "DF"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    grey = ds.pixel_array.astype(np.float64)
    top = float((1 << int(ds.BitsStored)) - 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        grey = top - grey
    eight = np.rint(grey / top * 255.0).astype(np.uint8)
    sc.SamplesPerPixel = 3 if rgb else 1
    sc.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        sc.PlanarConfiguration = 0
        eight = np.repeat(eight[..., None], 3, axis=2)
    sc.Rows, sc.Columns = int(ds.Rows), int(ds.Columns)
    sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation = 8, 8, 7, 0
    sc.PixelData = np.ascontiguousarray(eight).tobytes()
    sc.file_meta = FileMetaDataset()
    sc.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return sc


def make_bases(kermany: Path, chest_real: Path) -> dict[str, Dataset]:
    """Build the base datasets (fresh UIDs are given per variant)."""
    images = kermany_images(kermany, 4, label="pneumonia") + kermany_images(
        kermany, 2, label="normal"
    )
    greys = [load_grayscale(p) for p in images]
    small = [_resized(g, 320, 288) for g in greys]
    bases = {
        "dx16": _dx(small[0]),
        "dx16_m1": _dx(small[1], photometric="MONOCHROME1"),
        "cr12": _dx(small[2], bits=12, modality="CR", sop_class=ComputedRadiographyImageStorage),
        "cr12_m1_nowin": _dx(
            small[3],
            bits=12,
            photometric="MONOCHROME1",
            modality="CR",
            sop_class=ComputedRadiographyImageStorage,
            window=False,
        ),
        "dx8": _dx(small[4], bits=8),
        "dx_processing": _dx(
            small[5], sop_class=DigitalXRayImageStorageForProcessing, window=False
        ),
        "dx_portrait_2500x2048": _dx(_resized(greys[0], 2500, 2048), photometric="MONOCHROME1"),
        "cr_landscape_2048x2500": _dx(
            _resized(greys[1], 2048, 2500),
            bits=12,
            modality="CR",
            sop_class=ComputedRadiographyImageStorage,
        ),
    }
    bases["sc_cr"] = _as_sc(bases["dx16"])
    for name in ("JPEG2KLossless_1s_1f_u_16_16.dcm", "966_malformed.dcm", "highdicom_dx_image.dcm"):
        bases[f"real:{name}"] = dcmread(chest_real / name)
    return bases


# ---------------------------------------------------------------------------------------
# mutations


def _set(**values: object) -> Mutation:
    def mutate(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return mutate


def _empty(keyword: str) -> Mutation:
    def mutate(ds: Dataset) -> None:
        setattr(ds, keyword, None)

    return mutate


def _absent(*keywords: str) -> Mutation:
    def mutate(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return mutate


def _raw(keyword: str, raw: bytes) -> Mutation:
    """Write raw bytes as the value (bypasses pydicom's validation, as a broken device would)."""

    def mutate(ds: Dataset) -> None:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        _put_raw(ds, tag, dictionary_VR(tag), raw)

    return mutate


def _put_raw(ds: Dataset, tag: int, vr: str, raw: bytes) -> None:
    padded = raw + (b" " if len(raw) % 2 else b"")
    ds[tag] = RawDataElement(Tag(tag), vr, len(padded), padded, 0, False, True)


def _nothing(ds: Dataset) -> None:
    return None


TYPE2_EMPTY = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "InstanceNumber",
    "PatientOrientation",
    "ContentDate",
    "ContentTime",
    "Manufacturer",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "DetectorType",
    "ImagerPixelSpacing",
    "PixelSpacing",
    "AcquisitionDateTime",
    "Laterality",
    "KVP",
]
"""Type 2 attributes of the CR (A.2), DX (A.26) and SC (A.8.1) IODs, plus Type 1 values
archives are known to leave empty (Image Laterality, Imager Pixel Spacing)."""

TYPE3_ABSENT = [
    "PixelSpacing",
    "ImagerPixelSpacing",
    "PatientOrientation",
    "BodyPartExamined",
    "ViewPosition",
    "StudyDescription",
    "SeriesDescription",
    "InstitutionName",
    "AcquisitionDateTime",
    "ContentDate",
    "ContentTime",
    "ImageType",
    "BurnedInAnnotation",
    "LossyImageCompression",
    "PresentationIntentType",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "PresentationLUTShape",
    "AnatomicRegionSequence",
    "ViewCodeSequence",
    "SpecificCharacterSet",
    "PatientSex",
    "PatientBirthDate",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "Manufacturer",
    "DetectorType",
    "PixelIntensityRelationship",
    "StudyDate",
    "StudyTime",
    "PatientName",
    "ImageLaterality",
    "InstanceCreationDate",
    "SeriesDate",
    "SeriesTime",
    "ManufacturerModelName",
]
"""Type 3 attributes (and Type 1/2 ones real archives omit) removed one at a time."""

HASH = hashlib.sha256(b"anonymised").hexdigest()

INVALID: dict[str, list[str]] = {
    # DA (PS3.5 6.2: YYYYMMDD)
    "PatientBirthDate": [HASH, "1970.01.31", "19701331", "1970-01-01", "unknown"],
    "StudyDate": [HASH, "2020.01.31", "20201301", "yesterday"],
    "SeriesDate": ["2020/01/31", "00000000"],
    "ContentDate": ["31.01.2020", "2O2OO131"],
    # TM (HHMMSS.FFFFFF)
    "StudyTime": ["25:61:00", "10:20:30", "2pm", "246060"],
    "ContentTime": ["12:00", "99"],
    "SeriesTime": ["1020304050607080"],
    # DT
    "AcquisitionDateTime": ["garbage", "2020-01-01T10:00", "20201301"],
    # PN
    "PatientName": ["A\nB^C", "A^B^C^D^E^F^G", "A=B=C=D=E", "X" * 200, "Doe^John^^^^^"],
    "ReferringPhysicianName": ["Dr.\tWho", "^" * 70],
    # AS (nnnD/W/M/Y)
    "PatientAge": ["45", "45Y", "045years", "abc", "045y"],
    # CS
    "PatientSex": ["male", "X", "f", "Female"],
    "BodyPartExamined": ["chest", "Chest PA", "THORAX_AP_SUPINE"],
    "ViewPosition": ["pa", "P-A"],
    "Laterality": ["x"],
    "ImageLaterality": ["both sides"],
    "Modality": ["dx"],
    "PatientOrientation": ["left\\foot", "A\\"],
    "BurnedInAnnotation": ["maybe"],
    # IS / DS / UI
    "SeriesNumber": ["abc", "1.5"],
    "InstanceNumber": ["99999999999999"],
    "PixelSpacing": ["0\\0", "0.1mm\\0.1mm", "0.2"],
    "ImagerPixelSpacing": ["abc\\def", "-0.1\\-0.1"],
    "PatientWeight": ["70kg"],
    "FrameOfReferenceUID": ["not.a.uid", "1.2.3.04"],
}
"""Invalid values per attribute, written as raw bytes."""

OVER_LONG: dict[str, int] = {
    "InstitutionName": 200,
    "StudyDescription": 300,
    "SeriesDescription": 100,
    "AccessionNumber": 40,
    "StudyID": 30,
    "PatientID": 100,
    "Manufacturer": 100,
    "OperatorsName": 300,
    "ReferringPhysicianName": 150,
    "ProtocolName": 90,
}

CHARSETS: dict[str, tuple[str | list[str], bytes]] = {
    "latin1": ("ISO_IR 100", "Müller^Jürgen".encode("latin-1")),
    "utf8": ("ISO_IR 192", "Ærøskøbing^李^小龍".encode()),
    "jis": (
        ["", "ISO 2022 IR 87"],
        b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
    ),
    "cyrillic": ("ISO_IR 144", "Иванов^Иван".encode("iso8859-5")),
    "greek": ("ISO_IR 126", "Παπαδόπουλος^Νίκος".encode("iso8859-7")),
    "gb18030": ("GB18030", "王^小明".encode("gb18030")),
    "unknown_charset": ("ISO_IR 999", b"Smith^Anna"),
    "latin1_declared_utf8": ("ISO_IR 192", "Müller^Jürgen".encode("latin-1")),
    "no_declaration_8bit": ("", "Müller^Jürgen".encode("latin-1")),
}


def _charset(declared: str | list[str], name: bytes) -> Mutation:
    def mutate(ds: Dataset) -> None:
        ds.SpecificCharacterSet = declared
        _put_raw(ds, 0x00100010, "PN", name)
        _put_raw(ds, 0x00080080, "LO", name.replace(b"^", b" "))

    return mutate


def _private(ds: Dataset) -> None:
    block = ds.private_block(0x0029, "ACME CORPUS 1.0", create=True)
    block.add_new(0x10, "LO", "private text")
    block.add_new(0x11, "OB", b"\x00\x01" * 64)
    block.add_new(0x12, "UN", b"\xff" * 10)


def _private_sequence(ds: Dataset) -> None:
    block = ds.private_block(0x0031, "ACME SEQ", create=True)
    item = Dataset()
    item.add_new(0x00310010, "LO", "ACME SEQ")
    item.add_new(0x00311001, "DA", "not-a-date")
    block.add_new(0x01, "SQ", [item])


def _private_big(ds: Dataset) -> None:
    block = ds.private_block(0x0019, "BIGBLOB", create=True)
    block.add_new(0x01, "OB", bytes(2 * 1024 * 1024))


# -- grayscale -----------------------------------------------------------------------------


def _voi_lut(ds: Dataset) -> None:
    """Replace the window by a VOI LUT Sequence (PS3.3 C.11.2.1.1): a gamma curve."""
    bits = int(ds.BitsStored)
    entries = 1 << bits
    lut = np.rint(((np.arange(entries) / (entries - 1)) ** 0.7) * 4095).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries if entries < 65536 else 0, 0, 12]
    item.LUTExplanation = "GAMMA 0.7"
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())  # LUT Data
    ds.VOILUTSequence = [item]
    _absent("WindowCenter", "WindowWidth")(ds)


def _modality_lut(ds: Dataset) -> None:
    bits = int(ds.BitsStored)
    entries = 1 << bits
    lut = np.rint(np.sqrt(np.arange(entries) / (entries - 1)) * 4095).astype(np.uint16)
    item = Dataset()
    item.LUTDescriptor = [entries if entries < 65536 else 0, 0, 12]
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "OW", lut.astype("<u2").tobytes())  # LUT Data
    ds.ModalityLUTSequence = [item]
    _absent("RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth")(ds)


def _pixels(ds: Dataset, arr: npt.NDArray[np.integer]) -> None:
    ds.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


def _signed(ds: Dataset) -> None:
    """Signed stored values with a negative intercept, as some DR detectors write."""
    arr = ds.pixel_array.astype(np.int32) - (1 << (int(ds.BitsStored) - 1))
    ds.PixelRepresentation = 1
    _pixels(ds, arr.astype(np.int16))
    ds.RescaleIntercept = 1 << (int(ds.BitsStored) - 1)
    _absent("WindowCenter", "WindowWidth")(ds)


def _junk_high_bits(ds: Dataset) -> None:
    """12 bits stored in 16 allocated with random junk in the top 4 bits (PS3.5 8.1.1)."""
    arr = ds.pixel_array.astype(np.uint16)
    junk = np.random.default_rng(0).integers(0, 16, size=arr.shape, dtype=np.uint16) << 12
    _pixels(ds, arr | junk)


def _padding(ds: Dataset) -> None:
    """A collimated border of Pixel Padding Value (PS3.3 C.7.5.1.1.2)."""
    arr = ds.pixel_array.copy()
    pad = int(arr.max()) if ds.PhotometricInterpretation == "MONOCHROME1" else 0
    arr[:, :20] = pad
    arr[:, -20:] = pad
    ds.PixelPaddingValue = pad
    _pixels(ds, arr)


def _windows(ds: Dataset) -> None:
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    ds.WindowCenter = [center, center * 0.8, center * 1.2]
    ds.WindowWidth = [width, width * 0.5, width * 0.7]
    ds.WindowCenterWidthExplanation = ["NORMAL", "HARD", "SOFT"]


def _rescale(ds: Dataset) -> None:
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    ds.WindowCenter, ds.WindowWidth = center * 0.5 - 1024, width * 0.5


def _inverse_m2(ds: Dataset) -> None:
    """The same picture as stored values inverted plus Presentation LUT Shape INVERSE."""
    ds.PresentationLUTShape = "INVERSE"
    arr = ds.pixel_array
    top = (1 << int(ds.BitsStored)) - 1
    _pixels(ds, (top - arr.astype(np.int64)).astype(arr.dtype))
    if "WindowCenter" in ds:  # the window mirrored with the values (PS3.3 C.11.2.1.2.1)
        ds.WindowCenter = top + 1 - float(ds.WindowCenter)


GRAYSCALE: dict[str, tuple[str, Mutation]] = {
    "voi_lut_m2": ("dx16", _voi_lut),
    "voi_lut_m1": ("dx16_m1", _voi_lut),
    "voi_lut_12bit_cr": ("cr12", _voi_lut),
    "modality_lut": ("cr12", _modality_lut),
    "several_windows": ("dx16", _windows),
    "sigmoid": ("dx16", _set(VOILUTFunction="SIGMOID")),
    "linear_exact": ("dx16_m1", _set(VOILUTFunction="LINEAR_EXACT")),
    "voi_function_lower_case": ("dx16", _set(VOILUTFunction="sigmoid")),
    "voi_function_unknown": ("dx16", _set(VOILUTFunction="GAMMA")),
    "window_width_zero": ("dx16", _set(WindowWidth=0)),
    "window_center_only": ("dx16", _absent("WindowWidth")),
    "rescale": ("dx16", _rescale),
    "rescale_slope_zero": ("dx16", _set(RescaleSlope=0)),
    "signed_pixels": ("cr12", _signed),
    "junk_high_bits": ("cr12", _junk_high_bits),
    "padding_m2": ("dx16", _padding),
    "padding_m1": ("dx16_m1", _padding),
    "presentation_inverse_m2": ("dx16", _inverse_m2),
    "m1_no_window": ("cr12_m1_nowin", _nothing),
    "eight_bit": ("dx8", _nothing),
}


# -- recognition: SOP classes, content, identity -------------------------------------------


def _sc_ot_chest(ds: Dataset) -> None:
    ds.Modality = "OT"
    ds.BodyPartExamined = "CHEST"


def _sc_ot_described(ds: Dataset) -> None:
    ds.Modality = "OT"
    _absent("BodyPartExamined")(ds)
    ds.SeriesDescription = "CXR PA digitised film"


def _to_multiframe(sop_class: str, frames: int, rgb: bool = False) -> Mutation:
    def mutate(ds: Dataset) -> None:
        arr = ds.pixel_array
        if rgb:
            arr = np.repeat(arr[..., None], 3, axis=2)
            ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        stack = np.stack([arr] * frames)
        ds.SOPClassUID = sop_class
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = 100
        _pixels(ds, stack)

    return mutate


def _sc_rgb(ds: Dataset) -> None:
    arr = ds.pixel_array
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    _pixels(ds, np.repeat(arr[..., None], 3, axis=2))


def _vendor_ai_picture(ds: Dataset) -> None:
    ds.Modality = "OT"
    ds.BurnedInAnnotation = "YES"
    ds.SeriesDescription = "ACME AI Heatmap"
    ds.Manufacturer = "ACME AI"


def _veterinary(ds: Dataset) -> None:
    ds.PatientSpeciesDescription = "Canis lupus familiaris"
    ds.PatientBreedDescription = "Beagle"
    ds.ResponsiblePerson = "Owner^Jane"


RECOGNITION: dict[str, tuple[str, Mutation, Expected]] = {
    "cr": ("cr12", _nothing, Expected()),
    "dx_for_processing_alone": ("dx_processing", _nothing, Expected()),
    "sc_modality_cr": ("sc_cr", _nothing, Expected()),
    "sc_modality_dx": ("sc_cr", _set(Modality="DX"), Expected()),
    "sc_ot_body_part_chest": ("sc_cr", _sc_ot_chest, Expected()),
    "sc_ot_description_cxr": ("sc_cr", _sc_ot_described, Expected()),
    "sc_true_colour": ("sc_cr", _sc_rgb, Expected()),
    "sc_multiframe_grey_byte_1_frame": (
        "sc_cr",
        _to_multiframe("1.2.840.10008.5.1.4.1.1.7.2", 1),
        Expected(),
    ),
    "sc_multiframe_true_colour_1_frame": (
        "sc_cr",
        _to_multiframe("1.2.840.10008.5.1.4.1.1.7.4", 1, rgb=True),
        Expected(),
    ),
    "sc_multiframe_grey_byte_3_frames": (
        "sc_cr",
        _to_multiframe("1.2.840.10008.5.1.4.1.1.7.2", 3),
        Expected(NOT_APPLICABLE, "multi_frame"),
    ),
    "sc_ot_no_chest_hint": (
        "sc_cr",
        _set(Modality="OT", BodyPartExamined="HAND"),
        Expected(NOT_APPLICABLE, "modality_not_supported"),
    ),
    "vendor_ai_picture": (
        "sc_cr",
        _vendor_ai_picture,
        Expected(NOT_APPLICABLE, "ai_result"),
    ),
    "lateral_ll": ("dx16", _set(ViewPosition="LL"), Expected(NOT_APPLICABLE, "view_not_frontal")),
    "lateral_by_description": (
        "cr12",
        _set(ViewPosition="", ProtocolName="CHEST LAT"),
        Expected(NOT_APPLICABLE, "view_not_frontal"),
    ),
    "veterinary": ("dx16", _veterinary, Expected(NOT_APPLICABLE, "not_human")),
    "hand": (
        "cr12",
        _set(BodyPartExamined="HAND"),
        Expected(NOT_APPLICABLE, "body_part_not_chest"),
    ),
    "derived_secondary_dx": (
        "dx16",
        _set(ImageType=["DERIVED", "SECONDARY"]),
        Expected(NOT_APPLICABLE, "derived_image"),
    ),
}


# -- transfer syntaxes ---------------------------------------------------------------------

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"

SYNTAXES: dict[str, tuple[str, str]] = {
    "implicit_le_dx16": ("dx16_m1", ImplicitVRLittleEndian),
    "implicit_le_cr12": ("cr12", ImplicitVRLittleEndian),
    "explicit_be_dx16": ("dx16", ExplicitVRBigEndian),
    "explicit_be_cr12": ("cr12", ExplicitVRBigEndian),
    "deflated_dx16": ("dx16_m1", DeflatedExplicitVRLittleEndian),
    "deflated_cr12": ("cr12", DeflatedExplicitVRLittleEndian),
    "rle_dx16": ("dx16", RLELossless),
    "rle_cr12": ("cr12", RLELossless),
    "jpegls_dx16": ("dx16_m1", JPEGLSLossless),
    "jpegls_cr12": ("cr12", JPEGLSLossless),
    "j2k_dx16": ("dx16", JPEG2000Lossless),
    "j2k_cr12": ("cr12_m1_nowin", JPEG2000Lossless),
    "jpeg_lossless_dx16": ("dx16", JPEG_LOSSLESS_SV1),
    "jpeg_lossless_cr12": ("cr12", JPEG_LOSSLESS_SV1),
    "jpeg_extended_cr12": ("cr12", JPEG_EXTENDED),
    "jpeg_baseline_dx8": ("dx8", JPEG_BASELINE),
    "jpeg_baseline_sc": ("sc_cr", JPEG_BASELINE),
    "j2k_clinical_portrait": ("dx_portrait_2500x2048", JPEG2000Lossless),
}

DCMTK_ENCODERS = {
    JPEG_BASELINE: ["/usr/bin/dcmcjpeg", "+eb"],
    JPEG_EXTENDED: ["/usr/bin/dcmcjpeg", "+ee"],
    JPEG_LOSSLESS_SV1: ["/usr/bin/dcmcjpeg", "+e1"],
    DeflatedExplicitVRLittleEndian: ["/usr/bin/dcmconv", "+td"],
    ExplicitVRBigEndian: ["/usr/bin/dcmconv", "+tb"],
    ImplicitVRLittleEndian: ["/usr/bin/dcmconv", "+ti"],
}
"""DCMTK writes the syntaxes pydicom cannot encode (and the native ones, as a modality would)."""


# -- unreadable ----------------------------------------------------------------------------


def _truncate_pixels(ds: Dataset) -> None:
    ds.PixelData = bytes(ds.PixelData)[: len(ds.PixelData) // 3]


def _bits_inconsistent(ds: Dataset) -> None:
    ds.BitsStored = 20


# ---------------------------------------------------------------------------------------


def cases() -> Iterator[Case]:
    """Every case of the corpus, family by family."""
    for base in ("dx16", "cr12"):
        for keyword in TYPE2_EMPTY:
            yield Case(f"type2_empty_{keyword}_{base}", "type2_empty", base, _empty(keyword))
    for base in ("dx16_m1", "cr12"):
        for keyword in TYPE3_ABSENT:
            yield Case(f"absent_{keyword}_{base}", "type3_absent", base, _absent(keyword))
    yield Case("absent_window_cr", "type3_absent", "cr12", _absent("WindowCenter", "WindowWidth"))
    for keyword, values in INVALID.items():
        for i, value in enumerate(values):
            base = "cr12" if i % 2 else "dx16"
            yield Case(
                f"invalid_{keyword}_{i}", "invalid_value", base, _raw(keyword, value.encode())
            )
    for keyword, length in OVER_LONG.items():
        value = ("Abcdefghij" * (length // 10 + 1))[:length]
        yield Case(f"over_long_{keyword}", "over_long", "dx16", _raw(keyword, value.encode()))
    for name, (declared, raw) in CHARSETS.items():
        yield Case(f"charset_{name}", "charset", "dx16_m1", _charset(declared, raw))
    yield Case("private_tags", "private", "dx16", _private)
    yield Case("private_sequence", "private", "cr12", _private_sequence)
    yield Case("private_big_blob", "private", "dx16", _private_big)
    for name, (base, mutate) in GRAYSCALE.items():
        yield Case(f"grey_{name}", "grayscale", base, mutate)
    for name, (base, mutate, expected) in RECOGNITION.items():
        yield Case(f"kind_{name}", "recognition", base, mutate, expected)
    for name, (base, syntax) in SYNTAXES.items():
        yield Case(f"ts_{name}", "transfer_syntax", base, _nothing, transfer_syntax=syntax)
    yield Case("clinical_portrait_2500x2048_m1", "clinical_size", "dx_portrait_2500x2048", _nothing)
    yield Case(
        "clinical_landscape_2048x2500_voi_lut", "clinical_size", "cr_landscape_2048x2500", _voi_lut
    )
    real = "real:JPEG2KLossless_1s_1f_u_16_16.dcm"
    yield Case("real_j2k_dx", "real", real, _nothing, transfer_syntax=JPEG2000Lossless)
    for name, mutate in (
        ("birth_date_hash", _raw("PatientBirthDate", HASH.encode())),
        ("orientation_empty", _empty("PatientOrientation")),
        ("no_imager_spacing", _absent("ImagerPixelSpacing")),
        ("jis_name", _charset(*CHARSETS["jis"])),
        ("spacing_zero", _raw("PixelSpacing", b"0\\0")),
    ):
        yield Case(f"real_j2k_dx_{name}", "real", real, mutate, transfer_syntax=JPEG2000Lossless)
    yield Case(
        "real_veterinary_dx",
        "real",
        "real:highdicom_dx_image.dcm",
        _nothing,
        Expected(NOT_APPLICABLE, "not_human"),
    )
    yield Case(
        "real_corrupt_j2k",
        "unreadable",
        "real:966_malformed.dcm",
        _nothing,
        Expected(FAILED, "pixel data"),
        transfer_syntax=JPEG2000Lossless,
    )
    yield Case(
        "truncated_pixel_data",
        "unreadable",
        "dx16",
        _truncate_pixels,
        Expected(FAILED, "pixel data"),
    )
    yield Case(
        "bits_stored_20", "unreadable", "cr12", _bits_inconsistent, Expected(FAILED, "pixel data")
    )


def _renew_uids(ds: Dataset, index: int) -> tuple[str, str]:
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = ds.get("PatientID") or ""
    ds.AccessionNumber = f"CORPUS{index:05d}"
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def _write(ds: Dataset, path: Path, syntax: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    compressed = syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless)
    already = str(getattr(ds, "file_meta", FileMetaDataset()).get("TransferSyntaxUID", ""))
    meta.TransferSyntaxUID = already if already == syntax else ExplicitVRLittleEndian
    ds.file_meta = meta
    if compressed and already != syntax:
        ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    if syntax in DCMTK_ENCODERS:
        tmp = path.with_suffix(".tmp")
        subprocess.run(
            [*DCMTK_ENCODERS[syntax], str(path), str(tmp)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        tmp.replace(path)


def generate(out_dir: Path, kermany: Path, chest_real: Path) -> list[Variant]:
    """Write every variant to ``out_dir``; return them with their expected outcomes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bases = make_bases(kermany, chest_real)
    variants: list[Variant] = []
    for index, case in enumerate(cases()):
        ds = copy.deepcopy(bases[case.base])
        study_uid, sop_uid = _renew_uids(ds, index)
        case.mutate(ds)
        path = out_dir / f"{index:04d}_{case.name}.dcm"
        _write(ds, path, case.transfer_syntax)
        variants.append(Variant(case.name, case.family, path, study_uid, sop_uid, case.expected))
    return variants


__all__ = ["DONE", "FAILED", "NOT_APPLICABLE", "Expected", "Variant", "cases", "generate"]
