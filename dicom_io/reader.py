"""Reading spooled instances: header-only reads and pixel decoding.

Pixel data in any transfer syntax of PS3.5 section 8 / Annex A (native, deflated, JPEG,
JPEG-LS, JPEG 2000, RLE) is decoded by pydicom's pixel backends (pylibjpeg plugins, Pillow).
Only the first frame is decoded. Values are returned as stored, and also after the grayscale
pipeline of :mod:`dicom_io.grayscale` (Modality LUT, VOI LUT, Presentation LUT; pydicom), which
is what the model and the heatmap picture use. Bits Stored smaller than Bits Allocated
and signed pixels (Pixel Representation 1) are handled by the decoder (masked and sign
extended, PS3.5 8.1.1); YBR colour is converted to RGB.

Files without the PS3.10 preamble and File Meta Information -- old ACR-NEMA style data sets,
or data sets written raw -- are read too: the transfer syntax is taken from the encoding the
parser detected (implicit/explicit VR, little/big endian; PS3.5 Annex A.1-A.3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_io.grayscale import PresentationImage, presentation_values
from dicom_io.uids import clean_uid

logger = logging.getLogger(__name__)


class _NoDecoderTracebacks(logging.Filter):
    """Drop pydicom's per-plugin decoder tracebacks (``LOGGER.exception`` in its decoders).

    Every plugin's message is part of the ``RuntimeError`` pydicom raises afterwards, which
    :func:`read_image` turns into a :class:`DecodeError` carrying the reason: an undecodable
    file is a recorded outcome, not a traceback in the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.exc_info


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_NoDecoderTracebacks())


class DecodeError(Exception):
    """An instance cannot be read or its pixels cannot be decoded.

    Parameters
    ----------
    reason
        The decoder's (or parser's) explanation; also the exception message.
    path
        The offending file, when known.
    """

    def __init__(self, reason: str, path: Path | None = None) -> None:
        super().__init__(reason if path is None else f"{path}: {reason}")
        self.reason = reason
        self.path = path


@dataclass(frozen=True)
class ImageHeader:
    """Header fields used for image selection (no pixel data read).

    Text fields are upper-cased and stripped; ``path`` is the file read (None when built
    elsewhere). ``species`` is Patient Species Description (0010,2201) or the meaning of
    Patient Species Code Sequence (0010,2202) -- absent for human patients (PS3.3 C.7.1.1);
    ``descriptions`` are the free-text acquisition descriptions (Protocol Name, Acquisition
    Device Processing Description, Series/Study Description, Performed Protocol Code
    meanings) used by the selection rules to spot veterinary or lateral acquisitions.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    image_type: tuple[str, ...]
    laterality: str | None
    presentation_intent_type: str | None
    photometric: str | None
    rows: int | None
    columns: int | None
    number_of_frames: int
    series_number: int | None
    instance_number: int | None
    transfer_syntax_uid: str | None
    path: Path | None = None
    species: str | None = None
    descriptions: tuple[str, ...] = ()
    manufacturer: str | None = None
    model_name: str | None = None
    series_description: str | None = None
    burned_in_annotation: str | None = None
    equipment: tuple[tuple[str, str], ...] = ()
    observer_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class DecodedImage:
    """The first frame of an image and the parameters needed to display/normalise it.

    Attributes
    ----------
    pixels
        ``(H, W)`` stored values (native byte order, no rescale) or ``(H, W, 3)`` RGB.
    photometric
        Photometric Interpretation of ``pixels`` (``MONOCHROME1``, ``MONOCHROME2`` or
        ``RGB`` after colour conversion).
    rescale_slope, rescale_intercept
        Modality LUT linear transform (PS3.3 C.11.1.1.2); 1 and 0 when absent.
    window_center, window_width
        First VOI window (PS3.3 C.11.2.1.2), or None.
    voi_lut_function
        ``LINEAR`` (default), ``LINEAR_EXACT`` or ``SIGMOID``.
    bits_stored
        Bits Stored, or None.
    pixel_spacing_mm
        (row, column) spacing from Pixel Spacing, else Imager Pixel Spacing, or None.
    presentation
        The grey levels after the grayscale pipeline (:mod:`dicom_io.grayscale`): what the
        model and the heatmap picture use.
    """

    pixels: np.ndarray[Any, Any]
    photometric: str
    rescale_slope: float
    rescale_intercept: float
    window_center: float | None
    window_width: float | None
    voi_lut_function: str
    bits_stored: int | None
    pixel_spacing_mm: tuple[float, float] | None
    presentation: PresentationImage | None = None


def _first_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if np.isfinite(result) else None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and isinstance(value, (MultiValue, list, tuple)) and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return (row, col)
    return None


_DESCRIPTION_KEYWORDS = (
    "ProtocolName",
    "AcquisitionDeviceProcessingDescription",
    "SeriesDescription",
    "StudyDescription",
)


def _encoding_transfer_syntax(ds: Dataset) -> str | None:
    """Transfer syntax of a data set read without File Meta Information (PS3.5 A.1-A.3)."""
    encoding = getattr(ds, "original_encoding", None)
    if not encoding or encoding[0] is None:
        return None
    implicit_vr, little_endian = encoding
    if implicit_vr:
        return str(ImplicitVRLittleEndian) if little_endian else None
    return str(ExplicitVRLittleEndian) if little_endian else str(ExplicitVRBigEndian)


def _read(path: Path, *, stop_before_pixels: bool) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=stop_before_pixels)
    except OSError:
        raise
    except InvalidDicomError:
        return _read_without_meta(path, stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # EOFError, struct/value errors...
        raise DecodeError(f"not a readable DICOM file: {exc}", path) from exc


def _read_without_meta(path: Path, *, stop_before_pixels: bool) -> Dataset:
    """Read an ACR-NEMA style data set (no preamble, no File Meta Information)."""
    try:
        ds = dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
            raise DecodeError("not DICOM: no preamble, no File Meta and no SOP UIDs", path)
    except (DecodeError, OSError):
        raise
    except Exception as exc:
        raise DecodeError(f"not a readable DICOM file: {exc}", path) from exc
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        syntax = _encoding_transfer_syntax(ds)
        if syntax is None:
            raise DecodeError("data set without File Meta in an unknown encoding", path)
        meta.TransferSyntaxUID = syntax
    logger.debug("read a data set without File Meta Information", extra={"path": str(path)})
    return ds


def _species(ds: Dataset) -> str | None:
    text = _text(ds, "PatientSpeciesDescription")
    if text:
        return text
    for item in ds.get("PatientSpeciesCodeSequence") or []:
        meaning = _text(item, "CodeMeaning")
        if meaning:
            return meaning
    return None


def _descriptions(ds: Dataset) -> tuple[str, ...]:
    texts = [_text(ds, keyword) for keyword in _DESCRIPTION_KEYWORDS]
    for item in ds.get("PerformedProtocolCodeSequence") or []:
        texts.append(_text(item, "CodeMeaning"))
    return tuple(t for t in texts if t)


_DEVICE_OBSERVER_UID = "121012"
"""DCM code of the Device Observer UID content item (PS3.16 TID 1004)."""


def _equipment(ds: Dataset) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in ds.get("ContributingEquipmentSequence") or []:
        pairs.append(
            (_text(item, "Manufacturer") or "", _text(item, "ManufacturerModelName") or "")
        )
    return tuple(pairs)


def _observer_uids(ds: Dataset, depth: int = 0) -> tuple[str, ...]:
    """Device Observer UIDs in the first levels of an SR content tree (TID 1001/1004)."""
    found: list[str] = []
    if depth > 3:
        return ()
    for item in ds.get("ContentSequence") or []:
        concept = item.get("ConceptNameCodeSequence") or []
        if concept and str(concept[0].get("CodeValue", "")) == _DEVICE_OBSERVER_UID:
            uid = clean_uid(item.get("UID"))
            if uid:
                found.append(str(uid))
        elif item.get("ValueType") == "CONTAINER":
            found.extend(_observer_uids(item, depth + 1))
    return tuple(found)


def read_header(path: Path) -> ImageHeader:
    """Read the header of a PS3.10 file without its pixel data.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    ImageHeader
        Selection-relevant header fields; text values upper-cased and stripped.

    Raises
    ------
    DecodeError
        If the file is not DICOM or lacks valid SOP Class/Instance, Study or Series UIDs.
    OSError
        If the file cannot be opened.
    """
    ds = _read(path, stop_before_pixels=True)
    try:
        uids = {
            keyword: clean_uid(ds.get(keyword))
            for keyword in (
                "SOPInstanceUID",
                "SOPClassUID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
            )
        }
        missing = [keyword for keyword, value in uids.items() if value is None]
        if missing:
            raise DecodeError(f"missing or invalid {', '.join(missing)}", path)
        raw_image_type = ds.get("ImageType")
        if raw_image_type is None:
            image_type: tuple[str, ...] = ()
        elif isinstance(raw_image_type, (MultiValue, list, tuple)):
            image_type = tuple(str(v).strip().upper() for v in raw_image_type)
        else:
            image_type = (str(raw_image_type).strip().upper(),)
        laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
        file_meta = getattr(ds, "file_meta", None)
        transfer_syntax = None if file_meta is None else file_meta.get("TransferSyntaxUID")
        return ImageHeader(
            path=Path(path),
            sop_instance_uid=str(uids["SOPInstanceUID"]),
            sop_class_uid=str(uids["SOPClassUID"]),
            study_instance_uid=str(uids["StudyInstanceUID"]),
            series_instance_uid=str(uids["SeriesInstanceUID"]),
            modality=_text(ds, "Modality"),
            body_part=_text(ds, "BodyPartExamined"),
            view_position=_text(ds, "ViewPosition"),
            image_type=image_type,
            laterality=laterality,
            presentation_intent_type=_text(ds, "PresentationIntentType"),
            photometric=_text(ds, "PhotometricInterpretation"),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            number_of_frames=_int(ds, "NumberOfFrames") or 1,
            series_number=_int(ds, "SeriesNumber"),
            instance_number=_int(ds, "InstanceNumber"),
            transfer_syntax_uid=None if transfer_syntax is None else str(transfer_syntax),
            species=_species(ds),
            descriptions=_descriptions(ds),
            manufacturer=_text(ds, "Manufacturer"),
            model_name=_text(ds, "ManufacturerModelName"),
            series_description=_text(ds, "SeriesDescription"),
            burned_in_annotation=_text(ds, "BurnedInAnnotation"),
            equipment=_equipment(ds),
            observer_uids=_observer_uids(ds),
        )
    except DecodeError:
        raise
    except Exception as exc:  # malformed element values surface lazily in pydicom
        raise DecodeError(f"malformed header: {exc}", path) from exc


def read_image(path: Path) -> DecodedImage:
    """Decode the first frame of an image and its display parameters.

    Parameters
    ----------
    path
        A PS3.10 file with Pixel Data (any supported transfer syntax).

    Returns
    -------
    DecodedImage
        Stored values (no rescale/VOI applied) and the parameters to apply them.

    Raises
    ------
    DecodeError
        If the file is not DICOM, has no pixel data, or the decoder fails (``reason``
        carries the decoder's message).
    OSError
        If the file cannot be opened.
    """
    # A full read (not pydicom's streaming path reader) so deflated files work too.
    ds = _read(path, stop_before_pixels=False)
    try:
        pixels = pixel_array(ds, index=0)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        logger.info("pixel decode failed", extra={"path": str(path), "reason": reason})
        raise DecodeError(f"cannot decode pixel data: {reason}", path) from exc
    try:
        return _to_decoded(ds, pixels, path)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"inconsistent image attributes: {exc}", path) from exc


def _to_decoded(ds: Dataset, pixels: np.ndarray[Any, Any], path: Path) -> DecodedImage:
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
        photometric = "RGB"
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        # pydicom converts YBR_* to RGB when decoding (raw=False)
        photometric = "RGB"
    elif pixels.ndim != 2:
        raise DecodeError(f"unexpected decoded shape {pixels.shape}", path)
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if (rows, columns) != (pixels.shape[0], pixels.shape[1]):
        raise DecodeError(
            f"decoded shape {pixels.shape[:2]} differs from Rows/Columns {(rows, columns)}", path
        )
    if not pixels.dtype.isnative:
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    slope = _first_float(ds.get("RescaleSlope"))
    intercept = _first_float(ds.get("RescaleIntercept"))
    return DecodedImage(
        pixels=pixels,
        photometric=photometric,
        rescale_slope=1.0 if slope is None or slope == 0 else slope,
        rescale_intercept=0.0 if intercept is None else intercept,
        window_center=_first_float(ds.get("WindowCenter")),
        window_width=_first_float(ds.get("WindowWidth")),
        voi_lut_function=_text(ds, "VOILUTFunction") or "LINEAR",
        bits_stored=_int(ds, "BitsStored"),
        pixel_spacing_mm=_spacing(ds),
        presentation=presentation_values(ds, pixels),
    )


def read_dataset(path: Path, *, with_pixels: bool = True) -> Dataset:
    """Read a full dataset (e.g. as SR evidence).

    Parameters
    ----------
    path
        A PS3.10 file.
    with_pixels
        False skips Pixel Data (enough for SR references, much less memory).

    Returns
    -------
    Dataset
        The parsed dataset (with ``file_meta``).

    Raises
    ------
    DecodeError
        If the file is not DICOM.
    OSError
        If the file cannot be opened.
    """
    return _read(path, stop_before_pixels=not with_pixels)
