"""Reading spooled instances: header-only reads and pixel decoding.

Pixel data in any transfer syntax of PS3.5 section 8 / Annex A (native, deflated, JPEG,
JPEG-LS, JPEG 2000, RLE) is decoded by pydicom's pixel backends (pylibjpeg plugins, Pillow).
Only the first frame is decoded. Values are returned as stored: the Modality LUT (rescale,
PS3.3 C.11.1) and VOI LUT (window, PS3.3 C.11.2) are *not* applied but their parameters are
returned so the model's preprocessing can apply them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pixel_array

from dicom_io.uids import clean_uid

logger = logging.getLogger(__name__)


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
    elsewhere).
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


def _read(path: Path, *, stop_before_pixels: bool) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=stop_before_pixels)
    except OSError:
        raise
    except Exception as exc:  # InvalidDicomError, EOFError, struct/value errors...
        raise DecodeError(f"not a readable DICOM file: {exc}", path) from exc


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
