"""The result picture every viewer shows: a Secondary Capture with heatmap and banner.

Builds a Secondary Capture Image (PS3.3 A.8.1, SOP class 1.2.840.10008.5.1.4.1.1.7) with
highdicom: the source image as displayed, the model's heatmap blended in, and a burned-in
banner ("AI result - not for primary diagnosis", the finding, the probability, the model
name and version). Burned In Annotation (0028,0301) is YES (PS3.3 C.7.6.1.1.11), the source
image is referenced in Source Image Sequence (PS3.3 C.7.6.1.1.4) with purpose "Source image
for image processing operation" (DCM 121322), and the object belongs to the source's patient
and study in a new series with deterministic UIDs (see :func:`dicom_io.sr.result_uids`), so a
re-sent picture replaces the previous one at the PACS.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import numpy.typing as npt
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from dicom_io.headers import repair_source
from dicom_io.render import render_result_image
from dicom_io.sr import AlgorithmInfo, FindingResult
from dicom_io.uids import is_valid_uid

WARNING_LINE = "AI result - not for primary diagnosis"
"""First banner line, shown on every result picture."""

_PURPOSE_SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")


def banner_lines(finding: FindingResult, algorithm: AlgorithmInfo, *, heatmap: bool) -> list[str]:
    """Return the banner text: warning, finding with probability, model identity."""
    verdict = "PRESENT" if finding.present else "not detected"
    return [
        WARNING_LINE,
        f"{finding.code_meaning}: {verdict} - probability {finding.probability:.2f}"
        f" (threshold {algorithm.threshold:.2f})",
        f"Model {algorithm.name} {algorithm.version}"
        + ("" if heatmap else " - no heatmap available"),
    ]


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_heatmap_sc(
    source: Dataset,
    display: npt.NDArray[np.uint8],
    heatmap: npt.NDArray[np.floating[Any]] | None,
    finding: FindingResult,
    algorithm: AlgorithmInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
    institution_name: str | None = None,
) -> Dataset:
    """Build the heatmap Secondary Capture of one source image.

    Parameters
    ----------
    source
        The analysed image's header (Pixel Data not needed): patient, study and the reference.
    display
        uint8 ``(H, W)`` rendering of the source as a viewer shows it (modality LUT, VOI
        window, MONOCHROME1 inverted), on the source's pixel grid.
    heatmap
        float ``(H, W)`` in [0, 1] on the same grid, or None (the banner then says so).
    finding, algorithm
        What the banner says.
    series_instance_uid, sop_instance_uid
        UIDs of the picture (see :func:`dicom_io.sr.result_uids` with kind ``"SC"``).
    series_number
        Series Number of the result series.
    institution_name
        Optional Institution Name.

    Returns
    -------
    Dataset
        A :class:`highdicom.sc.SCImage` (RGB, 8 bit, Explicit VR Little Endian).

    Raises
    ------
    ValueError
        If the source lacks UIDs, a UID is invalid or the arrays do not fit (named).
    """
    for keyword in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        if not is_valid_uid(str(source.get(keyword, ""))):
            raise ValueError(f"source lacks a valid {keyword}")
    for name, value in (
        ("series_instance_uid", series_instance_uid),
        ("sop_instance_uid", sop_instance_uid),
    ):
        if not is_valid_uid(value):
            raise ValueError(f"{name} is not a valid UID: {value!r}")
    source = repair_source(source).dataset  # patient/study values copied must be valid
    pixels = render_result_image(
        display, heatmap, banner_lines(finding, algorithm, heatmap=heatmap is not None)
    )
    sc = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        patient_orientation=_orientation(source) or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if "Laterality" not in sc:
        # General Series (PS3.3 C.7.3.1): Type 2C for paired body parts; unknown -> empty.
        laterality = str(source.get("Laterality", "") or "")
        sc.Laterality = laterality if laterality in ("R", "L") else ""
    if _orientation(source) is None:
        sc["PatientOrientation"].value = None  # Type 2 (PS3.3 C.7.6.1): unknown -> empty
    sc.BurnedInAnnotation = "YES"
    recognizable = str(source.get("RecognizableVisualFeatures", "") or "")
    sc.RecognizableVisualFeatures = recognizable if recognizable in ("YES", "NO") else "NO"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.Modality = "OT"
    sc.SeriesDescription = f"AI heatmap {algorithm.name} {algorithm.version}"[:64]
    sc.ImageComments = " | ".join(  # the banner as text
        banner_lines(finding, algorithm, heatmap=heatmap is not None)
    )[:10240]
    sc.DerivationDescription = (
        f"{algorithm.name} {algorithm.version} heatmap blended over the displayed source image"
    )[:1024]
    sc.ManufacturerModelName = algorithm.name[:64]
    sc.SoftwareVersions = algorithm.version[:64]
    sc.LossyImageCompression = "00"
    if institution_name:
        sc.InstitutionName = institution_name
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = [_code_item(*_PURPOSE_SOURCE_FOR_PROCESSING)]
    sc.SourceImageSequence = [ref]
    if str(sc.SOPClassUID) != SecondaryCaptureImageStorage:  # pragma: no cover - highdicom bug
        raise ValueError(f"unexpected SOP class {sc.SOPClassUID}")
    return sc


def _orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is not None and len(value) == 2 and all(str(v) for v in value):
        return (str(value[0]), str(value[1]))
    return None


def encode_in(ds: Dataset, transfer_syntax_uid: str) -> Dataset:
    """Return a copy of ``ds`` whose file meta and pixel data use ``transfer_syntax_uid``.

    Native syntaxes (PS3.5 A.1, A.2) only change the file meta. Compressed syntaxes apply to
    objects with Pixel Data (lossless encoders of pydicom/pylibjpeg/pyjpegls); an object
    without pixels (an SR) stays in Explicit VR Little Endian, which every SCP supports.

    Raises
    ------
    ValueError
        If the syntax is unknown or the pixels cannot be encoded in it.
    """
    uid = UID(transfer_syntax_uid)
    if not uid.is_transfer_syntax:
        raise ValueError(f"not a transfer syntax UID: {transfer_syntax_uid!r}")
    out = copy.deepcopy(ds)
    if uid.is_compressed and "PixelData" not in out:
        uid = ExplicitVRLittleEndian
    if uid.is_compressed:
        try:
            out.compress(uid, generate_instance_uid=False)  # same object, same UID
        except Exception as exc:  # noqa: BLE001 - any encoder failure is reported by name
            raise ValueError(f"cannot encode the pixel data in {uid.name}: {exc}") from exc
    elif uid not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        raise ValueError(f"unsupported native transfer syntax {uid.name}")
    out.file_meta.TransferSyntaxUID = uid
    return out


__all__ = ["WARNING_LINE", "banner_lines", "build_heatmap_sc", "encode_in"]
