"""The one grayscale pipeline (PS3.4 Annex N.2) from stored values to presentation values.

Both the model input and the heatmap picture start from :func:`presentation_values`, so the
model and the viewer see the same grey levels. Steps, with pydicom doing the LUT work:

1. Stored values: decoded by pydicom, which masks bits above Bits Stored and sign-extends
   signed pixels (PS3.5 8.1.1), so junk in the high bits never reaches the LUTs.
2. Pixel Padding Value (and Pixel Padding Range Limit, PS3.3 C.7.5.1.1.2): padding pixels are
   remembered here and shown black at the end.
3. Modality LUT (PS3.3 C.11.1): :func:`pydicom.pixels.processing.apply_modality_lut` --
   Modality LUT Sequence, or Rescale Slope/Intercept. An unusable rescale (slope 0, not a
   number) is ignored and noted.
4. VOI LUT (PS3.3 C.11.2): :func:`pydicom.pixels.processing.apply_voi_lut` with the first
   VOI LUT Sequence item, else the first window (VOI LUT Function LINEAR, LINEAR_EXACT or
   SIGMOID). The output is scaled to [0, 1] by the range pydicom maps to (the VOI LUT's own
   entry range for a LUT). An unusable window or LUT is ignored and noted.
5. Presentation LUT (PS3.3 C.11.6): a Presentation LUT Sequence goes through
   :func:`pydicom.pixels.processing.apply_presentation_lut`; Presentation LUT Shape INVERSE
   or Photometric Interpretation MONOCHROME1 invert the scaled output (``1 - v``; the shape
   INVERSE that the DX module requires with MONOCHROME1 is the same single inversion,
   PS3.3 C.8.11.3.1.2). pydicom's own INVERSE subtracts from the image maximum instead of
   the range maximum, which would depend on content, so the inversion is done here.

When a VOI transform was applied the result is a P-value image: uint16, 0 black to 65535
white (PS3.14), handed to the model with photometric MONOCHROME2 and a LINEAR_EXACT window
of centre 32767.5 / width 65535, which is the identity on [0, 65535]. Without a VOI transform
the modality values are handed over unchanged with their polarity (MONOCHROME1 when
inverted) and no window, and the model's percentile range applies (model.preprocess).
True-colour images (RGB, YBR converted) have no grayscale pipeline and pass unchanged.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import (
    apply_modality_lut,
    apply_presentation_lut,
    apply_voi_lut,
)

logger = logging.getLogger(__name__)

P_VALUE_MAX = 65535
"""White in the P-value images handed to the model (16-bit P-values, PS3.14)."""


@dataclass(frozen=True)
class PresentationImage:
    """Grey levels ready for the model and the viewer.

    Attributes
    ----------
    values
        ``(H, W)`` uint16 P-values when ``voi_applied``; else modality values (float32 or
        the stored integer type); ``(H, W, 3)`` for true colour.
    photometric
        ``MONOCHROME2`` for P-values; ``MONOCHROME1``/``MONOCHROME2`` for modality values
        (MONOCHROME1 meaning the model must invert); ``RGB`` for colour.
    voi_applied
        Whether step 4 ran (the values are then final P-values).
    notes
        Parts of the header that were ignored, and why (attribute named).
    """

    values: npt.NDArray[Any]
    photometric: str
    voi_applied: bool
    notes: tuple[str, ...] = ()
    unwindowed: PresentationImage | None = None
    """When ``voi_applied``: the same image before the VOI step (modality values and
    polarity), for a model whose intensity range comes from the image itself."""

    @property
    def window(self) -> tuple[float, float, str] | None:
        """The (centre, width, function) the model must apply: identity on P-values."""
        if not self.voi_applied:
            return None
        return (P_VALUE_MAX / 2, float(P_VALUE_MAX), "LINEAR_EXACT")


def _number(value: Any) -> float | None:
    try:
        number = float(value[0] if isinstance(value, (list, tuple)) else value)
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return number if np.isfinite(number) else None


def _padding_mask(ds: Dataset, stored: npt.NDArray[Any]) -> npt.NDArray[np.bool_] | None:
    """Pixels equal to Pixel Padding Value, or within it and the Range Limit (C.7.5.1.1.2)."""
    value = _number(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _number(ds.get("PixelPaddingRangeLimit"))
    if limit is None:
        mask = stored == value
    else:
        mask = (stored >= min(value, limit)) & (stored <= max(value, limit))
    return mask if mask.any() else None


def _lut_view(ds: Dataset, notes: list[str]) -> Dataset:
    """Return a shallow copy of the LUT attributes pydicom reads, unusable ones removed."""
    view = Dataset()
    for keyword in (
        "PhotometricInterpretation",
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "ModalityLUTSequence",
        "VOILUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "PresentationLUTSequence",
        "PresentationLUTShape",
    ):
        try:
            if keyword in ds and ds[keyword].value not in (None, ""):
                view[keyword] = copy.deepcopy(ds[keyword])
        except Exception:  # noqa: BLE001 - an undecodable value counts as absent
            notes.append(f"{keyword}: undecodable, ignored")
    meta = getattr(ds, "file_meta", None)
    view.file_meta = meta if isinstance(meta, FileMetaDataset) else FileMetaDataset()
    slope, intercept = _number(view.get("RescaleSlope")), _number(view.get("RescaleIntercept"))
    if "RescaleSlope" in view or "RescaleIntercept" in view:
        if slope is None or slope == 0 or intercept is None:
            notes.append("RescaleSlope/RescaleIntercept: missing, zero or not a number, ignored")
            for keyword in ("RescaleSlope", "RescaleIntercept"):
                if keyword in view:
                    del view[keyword]
        else:
            view.RescaleSlope, view.RescaleIntercept = slope, intercept
    if "PixelRepresentation" not in view:
        view.PixelRepresentation = 0
    return view


def _fix_lut_depth(view: Dataset, notes: list[str]) -> None:
    """Read a Modality LUT entry size other than 8/16 bits (PS3.3 C.11.1.1.1) as 8 or 16."""
    item = view.ModalityLUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    if bits not in (8, 16):
        notes.append(
            f"ModalityLUTSequence: LUT Descriptor bits {bits} read as {16 if bits > 8 else 8}"
        )
        item.LUTDescriptor = [entries, first, 16 if bits > 8 else 8]


def _modality(arr: npt.NDArray[Any], view: Dataset, notes: list[str]) -> npt.NDArray[Any]:
    try:
        if view.get("ModalityLUTSequence"):
            _fix_lut_depth(view, notes)
        return np.asarray(apply_modality_lut(arr, view))
    except Exception as exc:  # noqa: BLE001 - a broken LUT is ignored, not fatal
        notes.append(f"ModalityLUTSequence: unusable ({exc}), ignored")
        del view["ModalityLUTSequence"]
        return np.asarray(apply_modality_lut(arr, view))


def _voi_lut_range(view: Dataset) -> tuple[float, float]:
    """Output range of the first VOI LUT: its smallest and largest entry."""
    item = view.VOILUTSequence[0]
    entries, first, _bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 1 << 16
    ramp = np.arange(first, first + entries, dtype=np.int64)
    table = np.asarray(apply_voi_lut(ramp, view, index=0, prefer_lut=True), dtype=np.float64)
    return float(table.min()), float(table.max())


def _voi(
    values: npt.NDArray[Any], view: Dataset, notes: list[str]
) -> npt.NDArray[np.float64] | None:
    """Step 4: the first VOI LUT or window scaled to [0, 1], or None without a usable one."""
    if view.get("VOILUTSequence"):
        try:
            lo, hi = _voi_lut_range(view)
            out = np.asarray(apply_voi_lut(values, view, index=0, prefer_lut=True), np.float64)
            if hi > lo:
                return np.clip((out - lo) / (hi - lo), 0.0, 1.0)
            notes.append("VOILUTSequence: constant table, ignored")
        except Exception as exc:  # noqa: BLE001 - fall back to the window
            notes.append(f"VOILUTSequence: unusable ({type(exc).__name__}: {exc}), ignored")
        del view["VOILUTSequence"]
    if "WindowCenter" not in view or "WindowWidth" not in view:
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in view:
                notes.append(f"{keyword}: given without its partner, ignored")
        return None
    if "VOILUTFunction" in view:
        view.VOILUTFunction = str(view.VOILUTFunction).strip().upper()
    try:
        with np.errstate(over="ignore"):  # SIGMOID at the sentinels saturates to its range
            limits = apply_voi_lut(np.array([-1e300, 1e300]), view, index=0)
            out = np.asarray(apply_voi_lut(values, view, index=0), dtype=np.float64)
        lo, hi = float(limits[0]), float(limits[1])
    except Exception as exc:  # noqa: BLE001 - e.g. width < 1, unknown function
        notes.append(f"WindowCenter/WindowWidth/VOILUTFunction: unusable ({exc}), ignored")
        return None
    if not hi > lo:
        notes.append("WindowCenter/WindowWidth: empty output range, ignored")
        return None
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def _presentation(unit: npt.NDArray[np.float64], view: Dataset) -> npt.NDArray[np.float64]:
    """Step 5 on [0, 1] values: Presentation LUT Sequence, or INVERSE / MONOCHROME1."""
    if view.get("PresentationLUTSequence"):
        bits = int(view.PresentationLUTSequence[0].LUTDescriptor[2])
        ramp = np.arange(P_VALUE_MAX + 1, dtype=np.float64)  # pydicom spreads min..max
        table = np.asarray(apply_presentation_lut(ramp, view), dtype=np.float64)
        p_values = table[np.rint(unit * P_VALUE_MAX).astype(np.int64)]
        return np.clip(p_values / ((1 << bits) - 1), 0.0, 1.0)
    shape = str(view.get("PresentationLUTShape", "") or "").strip().upper()
    if shape == "INVERSE" or view.get("PhotometricInterpretation") == "MONOCHROME1":
        return 1.0 - unit
    return unit


def presentation_values(ds: Dataset, stored: npt.NDArray[Any]) -> PresentationImage:
    """Run the grayscale pipeline on decoded ``stored`` values of ``ds``.

    Every step (PS3.4 N.2) is a function of the stored value alone, so an integer image is
    run through its distinct values once (:class:`_Levels`) and then indexed: exact, and a
    2048² radiograph costs one table of a few thousand entries instead of per-pixel floats.

    Parameters
    ----------
    ds
        The image's header (Image Pixel, Modality LUT, VOI LUT, Presentation LUT modules).
    stored
        Decoded first frame: ``(H, W)`` stored values, or ``(H, W, 3)`` RGB.

    Returns
    -------
    PresentationImage
        P-values (or modality values without a VOI transform) and what was ignored.
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").strip().upper()
    if stored.ndim == 3:
        return PresentationImage(stored, "RGB", voi_applied=False)
    notes: list[str] = []
    view = _lut_view(ds, notes)
    view.PhotometricInterpretation = (
        photometric if photometric in ("MONOCHROME1", "MONOCHROME2") else "MONOCHROME2"
    )
    padding = _padding_mask(ds, stored)
    levels = _Levels.of(stored)
    values = _modality(levels.ramp, view, notes)
    unit = _voi(values, view, notes)
    inverted = (
        view.PhotometricInterpretation == "MONOCHROME1"
        or str(view.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    )
    if unit is None:
        return _without_voi(levels.expand(_integral(values)), padding, inverted, notes)
    p_table = np.rint(_presentation(unit, view) * P_VALUE_MAX).astype(np.uint16)
    out = levels.expand(p_table)
    if padding is not None:
        out[padding] = 0
    before_voi = _without_voi(levels.expand(_integral(values)), padding, inverted, [])
    return PresentationImage(
        out, "MONOCHROME2", voi_applied=True, notes=tuple(notes), unwindowed=before_voi
    )


_LEVELS_MAX = 1 << 17
"""Largest stored-value range run through a table (:class:`_Levels`); wider goes per pixel."""


@dataclass(frozen=True)
class _Levels:
    """An integer image as (table index per pixel, the ramp of stored values it indexes).

    For a float image, or an integer range wider than :data:`_LEVELS_MAX`, ``ramp`` is the
    image itself and ``index`` is None (the pipeline runs per pixel).
    """

    ramp: npt.NDArray[Any]
    index: npt.NDArray[Any] | None = None

    @classmethod
    def of(cls, stored: npt.NDArray[Any]) -> _Levels:
        if not np.issubdtype(stored.dtype, np.integer) or stored.size == 0:
            return cls(stored)
        lo, hi = int(stored.min()), int(stored.max())
        if hi - lo + 1 > _LEVELS_MAX:
            return cls(stored)
        index = (stored.astype(np.int64) - lo).astype(np.int32) if lo else stored
        return cls(np.arange(lo, hi + 1).astype(stored.dtype), index)

    def expand(self, table: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Return ``table`` (computed on :attr:`ramp`) as a full image."""
        return table if self.index is None else table[self.index]


def _integral(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Return float modality values that are all whole numbers as int32, else unchanged.

    An integer image goes through the model's exact histogram path
    (:func:`model.preprocess.unit_intensity`) instead of sorting floats.
    """
    if (
        np.issubdtype(values.dtype, np.floating)
        and values.size
        and np.all(np.isfinite(values))
        and np.array_equal(values, np.rint(values))
        and values.min() > -(1 << 31)
        and values.max() < 1 << 31
    ):
        return values.astype(np.int32)
    return values


def _without_voi(
    values: npt.NDArray[Any],
    padding: npt.NDArray[np.bool_] | None,
    inverted: bool,
    notes: list[str],
) -> PresentationImage:
    """Modality values and polarity for the model's own intensity range (no VOI given)."""
    if np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float32)
    if padding is not None and not padding.all():
        # padding shows black: the value that ends darkest after the model's inversion
        fill = values[~padding].max() if inverted else values[~padding].min()
        values = values.copy()
        values[padding] = fill
    photometric = "MONOCHROME1" if inverted else "MONOCHROME2"
    return PresentationImage(values, photometric, voi_applied=False, notes=tuple(notes))


__all__ = ["P_VALUE_MAX", "PresentationImage", "presentation_values"]
