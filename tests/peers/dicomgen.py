"""Realistic test DICOM objects: Digital X-Ray (DX) images built from real chest radiographs.

:func:`make_dx_from_image` wraps a Kermany chest X-ray JPEG in a DX Image IOD
(PS3.3 A.26: Digital X-Ray Image Storage - For Presentation / For Processing) with the
Patient, General Study, General Series, DX Series, General Equipment, General Image,
Image Pixel, DX Anatomy Imaged, DX Image, DX Detector, DX Positioning, VOI LUT,
Acquisition Context and SOP Common modules. :func:`make_study` makes a multi-image study,
:func:`make_synthetic_dx` a DX of random 16-bit pixels (incompressible; for throughput tests).

The JPEGs must never be copied into the repository; tests write the generated files under
``tmp_path``.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

logger = logging.getLogger(__name__)

Photometric = Literal["MONOCHROME1", "MONOCHROME2"]
#: Stored pixel values (uint8 or uint16).
StoredPixels = npt.NDArray[np.unsignedinteger[Any]]

#: Lossless transfer syntaxes :func:`make_dx_from_image` can encode (PS3.5 Section 10).
LOSSLESS_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless)

SOP_CLASSES = (
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ComputedRadiographyImageStorage,
)

#: DX View (CID 4010) code and Patient Orientation (PS3.3 C.7.6.1.1.1) per View Position.
_VIEWS: dict[str, tuple[Code, tuple[str, str]]] = {
    "PA": (codes.SCT.PosteroAnterior, ("L", "F")),
    "AP": (codes.SCT.AnteroPosterior, ("L", "F")),
    "LL": (codes.SCT.LeftLateral, ("P", "F")),
    "RL": (codes.SCT.RightLateral, ("A", "F")),
}


@dataclass(frozen=True)
class GeneratedStudy:
    """Files of one generated study."""

    study_uid: str
    patient_id: str
    accession_number: str
    paths: list[Path] = field(default_factory=list)
    series_uids: list[str] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def load_grayscale(image_path: Path, *, upscale: int = 1) -> npt.NDArray[np.float32]:
    """Read an image file as float32 grey levels 0..255, optionally upscaled (bicubic).

    Raises
    ------
    ValueError
        When ``upscale`` < 1 or the file is not a readable image.
    """
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    try:
        with Image.open(image_path) as img:
            grey = img.convert("F")
            if upscale > 1:
                size = (img.width * upscale, img.height * upscale)
                grey = grey.resize(size, Image.Resampling.BICUBIC)
    except OSError as exc:
        raise ValueError(f"not a readable image: {image_path}: {exc}") from exc
    # PIL's "F" conversion from RGB uses ITU-R 601 luma weights; clip bicubic overshoot.
    return np.clip(np.asarray(grey, dtype=np.float32), 0.0, 255.0)


def _to_stored(
    grey: npt.NDArray[np.float32], *, bits: int, photometric: Photometric
) -> StoredPixels:
    """Map 0..255 grey to stored values 0..2**bits-1; invert for MONOCHROME1 (PS3.3 C.7.6.3.1.2)."""
    max_value = (1 << bits) - 1
    stored = np.rint(grey / 255.0 * max_value)
    if photometric == "MONOCHROME1":
        stored = max_value - stored
    result: StoredPixels = stored.astype(np.uint8 if bits <= 8 else np.uint16)
    return result


def build_dx_dataset(
    pixels: StoredPixels,
    *,
    bits: int,
    photometric: Photometric = "MONOCHROME2",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "TEST-0001",
    patient_name: str = "TEST^SYNTHETIC",
    accession_number: str = "ACC0001",
    view: str = "PA",
    modality: str = "DX",
    sop_class: str = DigitalXRayImageStorageForPresentation,
    pixel_spacing_mm: float = 0.15,
    series_number: int = 1,
    instance_number: int = 1,
    acquired: dt.datetime | None = None,
    window: tuple[float, float] | None = None,
) -> Dataset:
    """Build a DX Image IOD (PS3.3 A.26) dataset around stored ``pixels`` (rows x cols).

    Parameters
    ----------
    pixels
        Stored values, already inverted for MONOCHROME1.
    bits
        Bits Stored (6..16); Bits Allocated is 8 for ``bits`` <= 8, else 16.
    view
        View Position: PA, AP, LL or RL (DX View code from CID 4010).
    modality, sop_class
        "DX" with DX For Presentation/Processing, or "CR" with CR Image Storage (PS3.3 A.2).
    pixel_spacing_mm
        Imager Pixel Spacing and Pixel Spacing (square pixels, mm).
    window
        (center, width) of the VOI LUT (PS3.3 C.11.2); default spans the stored range.

    Raises
    ------
    ValueError
        On an unsupported ``bits``, ``view``, ``modality``/``sop_class`` or pixel array.
    """
    if not 6 <= bits <= 16:
        raise ValueError(f"bits must be 6..16, got {bits}")
    if view not in _VIEWS:
        raise ValueError(f"view must be one of {sorted(_VIEWS)}, got {view!r}")
    if sop_class not in SOP_CLASSES:
        raise ValueError(f"unsupported sop_class {sop_class}")
    is_cr = sop_class == ComputedRadiographyImageStorage
    if (modality == "CR") != is_cr or modality not in ("DX", "CR"):
        raise ValueError(f"modality {modality!r} does not match SOP class {UID(sop_class).name}")
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"pixels must be a 2-D uint8/uint16 array, got {pixels.dtype} {pixels.shape}"
        )
    bits_allocated = 8 if bits <= 8 else 16
    if pixels.dtype.itemsize * 8 != bits_allocated:
        raise ValueError(f"pixels dtype {pixels.dtype} does not match bits={bits}")
    if int(pixels.max(initial=0)) >= 1 << bits:
        raise ValueError(f"pixel values exceed {bits} bits")
    when = acquired or dt.datetime.now().replace(microsecond=0)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    view_code, orientation = _VIEWS[view]
    for_processing = sop_class == DigitalXRayImageStorageForProcessing

    ds = Dataset()
    # SOP Common (C.12.1)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient (C.7.1.1)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = "XR CHEST"
    # General Series (C.7.3.1) + DX Series (C.8.11.1) / CR Series (C.8.1.1)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    if not is_cr:
        ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "radflag test generator"
    ds.ManufacturerModelName = "dicomgen"
    ds.SoftwareVersions = "1"
    # General Image (C.7.6.1) + DX Image (C.8.11.3)
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = list(orientation)
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in pixels.shape)
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(f"<u{bits_allocated // 8}").tobytes()
    # Rescale + presentation (C.8.11.3.1.2, C.8.11.3.1.5)
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    # VOI LUT (C.11.2); only For Presentation images carry one (C.8.11.3.1.5)
    if not for_processing:
        if window is None:
            low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
            window = ((low + high) / 2.0, float(max(high - low, 1)))
        ds.WindowCenter = f"{window[0]:.1f}"
        ds.WindowWidth = f"{window[1]:.1f}"
    # DX Anatomy Imaged (C.8.11.2)
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = [_code_item(codes.SCT.Chest)]
    # DX Detector (C.8.11.4) and DX Positioning (C.8.11.5); CR keeps to CR Image (C.8.1.2)
    spacing = f"{pixel_spacing_mm:.6g}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "nominal magnification"
    if is_cr:
        for keyword in ("PixelIntensityRelationship", "PixelIntensityRelationshipSign"):
            delattr(ds, keyword)
        return ds
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = "COLUMN"
    ds.ViewCodeSequence = [_code_item(view_code)]
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
    # Acquisition Context (C.7.6.14)
    ds.AcquisitionContextSequence = []
    return ds


def save_dataset(
    ds: Dataset, out_path: Path, *, transfer_syntax: str = ExplicitVRLittleEndian
) -> Path:
    """Write ``ds`` as a DICOM file (PS3.10) in a lossless ``transfer_syntax``.

    Raises
    ------
    ValueError
        When ``transfer_syntax`` is not one of :data:`LOSSLESS_SYNTAXES`.
    """
    if transfer_syntax not in LOSSLESS_SYNTAXES:
        raise ValueError(f"transfer_syntax must be lossless: one of {LOSSLESS_SYNTAXES}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    return out_path


def make_dx_from_image(
    image_path: Path,
    out_path: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = "TEST-0001",
    patient_name: str = "TEST^SYNTHETIC",
    accession_number: str = "ACC0001",
    photometric: Photometric = "MONOCHROME2",
    bits: int = 16,
    view: str = "PA",
    modality: str = "DX",
    sop_class: str = DigitalXRayImageStorageForPresentation,
    upscale: int = 1,
    field_of_view_mm: float = 350.0,
    series_number: int = 1,
    instance_number: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """Make a DX (PS3.3 A.26) file from a real radiograph (e.g. a Kermany JPEG).

    Grey levels 0..255 are scaled to ``bits`` stored bits; for MONOCHROME1 the stored values
    are inverted so the image *displays* the same as the source. Window center/width span
    the stored range, pixel spacing is ``field_of_view_mm / columns``, Image Type is
    ORIGINAL\\PRIMARY.

    Parameters
    ----------
    image_path
        Source image (anything PIL reads; RGB is converted to luma).
    out_path
        Where to write the DICOM file (parents created).
    upscale
        Integer factor applied to rows and columns (bicubic), e.g. 8 turns 224x224 into
        1792x1792 for a realistic DX size.
    transfer_syntax
        Explicit VR Little Endian (default) or a lossless compressed syntax.
    (others)
        See :func:`build_dx_dataset`.

    Returns
    -------
    Dataset
        The written dataset (as encoded in the file).

    Raises
    ------
    ValueError
        On an unreadable image or invalid parameter.
    """
    grey = load_grayscale(Path(image_path), upscale=upscale)
    stored = _to_stored(grey, bits=bits, photometric=photometric)
    ds = build_dx_dataset(
        stored,
        bits=bits,
        photometric=photometric,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        patient_id=patient_id,
        patient_name=patient_name,
        accession_number=accession_number,
        view=view,
        modality=modality,
        sop_class=sop_class,
        pixel_spacing_mm=field_of_view_mm / stored.shape[1],
        series_number=series_number,
        instance_number=instance_number,
    )
    ds.DerivationDescription = f"generated from {Path(image_path).name}"
    save_dataset(ds, Path(out_path), transfer_syntax=transfer_syntax)
    return ds


def make_synthetic_dx(
    rows: int,
    cols: int,
    out_path: Path | None = None,
    *,
    seed: int = 0,
    bits: int = 16,
    photometric: Photometric = "MONOCHROME2",
    study_uid: str | None = None,
    patient_id: str = "TEST-SYNTH",
    instance_number: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """Make a DX of uniformly random ``bits``-bit pixels (for throughput/size tests).

    Writes ``out_path`` when given. Random pixels are incompressible, so sizes are honest.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows}x{cols}")
    if not 6 <= bits <= 16:
        raise ValueError(f"bits must be 6..16, got {bits}")
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if bits <= 8 else np.uint16
    pixels = cast(StoredPixels, rng.integers(0, 1 << bits, size=(rows, cols), dtype=dtype))
    ds = build_dx_dataset(
        pixels,
        bits=bits,
        photometric=photometric,
        study_uid=study_uid,
        patient_id=patient_id,
        instance_number=instance_number,
    )
    if out_path is not None:
        save_dataset(ds, Path(out_path), transfer_syntax=transfer_syntax)
    return ds


def kermany_images(root: Path, n: int, *, label: str | None = None, offset: int = 0) -> list[Path]:
    """Return ``n`` image paths from a Kermany folder's ``labels.csv`` (deterministic order).

    Parameters
    ----------
    root
        The ``kermany-pneumonia-train`` folder (holds ``labels.csv`` and ``images/``).
    label
        "normal" or "pneumonia" to filter; None for any.
    offset
        Rows to skip after filtering (to get different images in different tests).

    Raises
    ------
    ValueError
        When fewer than ``n`` images match.
    """
    with (root / "labels.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if label is None or r["label"] == label]
    picked = [root / r["filename"] for r in rows[offset : offset + n]]
    if len(picked) < n:
        raise ValueError(f"only {len(picked)} images with label={label!r} after offset {offset}")
    return picked


def make_study(
    n_images: int,
    out_dir: Path,
    *,
    images: Sequence[Path] | None = None,
    source_dir: Path | None = None,
    study_uid: str | None = None,
    patient_id: str = "TEST-0001",
    accession_number: str = "ACC0001",
    n_series: int = 1,
    views: Sequence[str] = ("PA",),
    photometric: Photometric = "MONOCHROME2",
    bits: int = 16,
    upscale: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> GeneratedStudy:
    """Make one DX study of ``n_images`` instances from real radiographs.

    Images are spread round-robin over ``n_series`` series; image ``i`` gets view
    ``views[i % len(views)]``. Files are ``out_dir/<i>.dcm``.

    Parameters
    ----------
    images
        Source images (at least ``n_images``); default: the first Kermany images of
        ``source_dir`` (default: shared data ``cxr/kermany-pneumonia-train``, which skips the
        test when absent).
    """
    if n_images < 1 or n_series < 1:
        raise ValueError("n_images and n_series must be >= 1")
    if images is None:
        if source_dir is None:
            from tests.conftest import shared_path

            source_dir = shared_path("cxr", "kermany-pneumonia-train")
        images = kermany_images(source_dir, n_images)
    if len(images) < n_images:
        raise ValueError(f"need {n_images} source images, got {len(images)}")
    study_uid = study_uid or str(generate_uid())
    series_uids = [str(generate_uid()) for _ in range(n_series)]
    study = GeneratedStudy(study_uid, patient_id, accession_number, series_uids=series_uids)
    for i in range(n_images):
        series = i % n_series
        ds = make_dx_from_image(
            images[i],
            Path(out_dir) / f"{i + 1:04d}.dcm",
            study_uid=study_uid,
            series_uid=series_uids[series],
            patient_id=patient_id,
            accession_number=accession_number,
            photometric=photometric,
            bits=bits,
            view=views[i % len(views)],
            upscale=upscale,
            series_number=series + 1,
            instance_number=i // n_series + 1,
            transfer_syntax=transfer_syntax,
        )
        study.paths.append(Path(out_dir) / f"{i + 1:04d}.dcm")
        study.sop_instance_uids.append(str(ds.SOPInstanceUID))
    return study
