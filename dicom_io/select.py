"""Which received instances a model applies to.

Rules, applied in this order (the first failing rule is the recorded reason):

1. ``MODALITY_MISSING``: Modality must be present.
2. ``OWN_OUTPUT_KIND``: SR (including Key Object Selection), Presentation State and
   **Secondary Capture are never selected**: radflag itself emits SR and Secondary Capture
   objects, so analysing them would loop (loop guard).
3. ``MODALITY_NOT_SUPPORTED``: Modality must be one of the model's modalities (upper-case).
4. ``NOT_AN_IMAGE_SOP_CLASS``: the SOP class must be an image storage class we analyse
   (CR, DX for presentation/processing, CT; PS3.4 B.5).
5. ``FOR_PROCESSING``: DX "For Processing" objects (SOP class or Presentation Intent Type
   ``FOR PROCESSING``, PS3.3 C.8.11.1) hold raw detector values and are skipped.
6. ``MULTI_FRAME``: Number of Frames > 1 (the chest classifier is single-frame).
7. ``BODY_PART_NOT_CHEST``: Body Part Examined must be ``CHEST``, ``THORAX`` or ``LUNG``,
   or absent (many modalities leave it empty).
8. ``VIEW_NOT_FRONTAL``: View Position (PS3.3 C.8.11.5) must not be lateral (``LL``, ``RL``,
   ``LAT``, ``LATERAL``), oblique (``RLO``, ``LLO``) or decubitus (``RLD``, ``LLD``); absent,
   ``AP``, ``PA`` and other values are accepted.
9. ``DERIVED_IMAGE``: for CR/DX, Image Type ``DERIVED\\SECONDARY`` (PS3.3 C.7.6.1.1.2):
   images created after the examination, e.g. annotated or re-processed copies.
   ``DERIVED\\PRIMARY`` is accepted: many DX systems label their processed "for
   presentation" image that way, and it is the direct result of the examination (value 2
   ``PRIMARY``). For CT, ``LOCALIZER`` (scout) images are excluded.

Every input header ends up in exactly one of ``selected`` or ``excluded``, in input order.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

from dicom_io.reader import ImageHeader


class ExclusionReason(StrEnum):
    """Why an instance was not selected (closed vocabulary, see module docstring)."""

    MODALITY_MISSING = "modality_missing"
    MODALITY_NOT_SUPPORTED = "modality_not_supported"
    OWN_OUTPUT_KIND = "own_output_kind"
    NOT_AN_IMAGE_SOP_CLASS = "not_an_image_sop_class"
    FOR_PROCESSING = "for_processing"
    MULTI_FRAME = "multi_frame"
    BODY_PART_NOT_CHEST = "body_part_not_chest"
    VIEW_NOT_FRONTAL = "view_not_frontal"
    DERIVED_IMAGE = "derived_image"


ANALYSED_SOP_CLASSES = frozenset(
    {
        str(ComputedRadiographyImageStorage),
        str(DigitalXRayImageStorageForPresentation),
        str(DigitalXRayImageStorageForProcessing),
        str(CTImageStorage),
    }
)
"""Image storage SOP classes a model may run on (PS3.4 B.5)."""

_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_PRESENTATION_STATE_PREFIX = "1.2.840.10008.5.1.4.1.1.11."

CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG"})
"""Accepted Body Part Examined values (PS3.16 Annex L defined terms)."""

NON_FRONTAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "RLO", "LLO", "RLD", "LLD"})
"""View Position values that are not a frontal (AP/PA) projection."""

PROJECTION_MODALITIES = frozenset({"CR", "DX"})


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of :func:`select_images`."""

    selected: list[ImageHeader] = field(default_factory=list)
    excluded: list[tuple[ImageHeader, str]] = field(default_factory=list)


def _is_own_output_kind(sop_class_uid: str) -> bool:
    return (
        sop_class_uid.startswith(_SECONDARY_CAPTURE_PREFIX)
        or sop_class_uid.startswith(_SR_PREFIX)
        or sop_class_uid.startswith(_PRESENTATION_STATE_PREFIX)
    )


def exclusion_reason(header: ImageHeader, modalities: Collection[str]) -> ExclusionReason | None:
    """Return why ``header`` is excluded for a model of ``modalities``, or None if selected.

    Parameters
    ----------
    header
        The instance header.
    modalities
        Modalities the model accepts (e.g. ``{"CR", "DX"}``).

    Returns
    -------
    ExclusionReason or None
        The first failing rule of the module docstring, or None.
    """
    wanted = {m.strip().upper() for m in modalities}
    modality = (header.modality or "").strip().upper()
    if not modality:
        return ExclusionReason.MODALITY_MISSING
    if _is_own_output_kind(header.sop_class_uid):
        return ExclusionReason.OWN_OUTPUT_KIND
    if modality not in wanted:
        return ExclusionReason.MODALITY_NOT_SUPPORTED
    if header.sop_class_uid not in ANALYSED_SOP_CLASSES:
        return ExclusionReason.NOT_AN_IMAGE_SOP_CLASS
    if (
        header.sop_class_uid == str(DigitalXRayImageStorageForProcessing)
        or (header.presentation_intent_type or "").upper() == "FOR PROCESSING"
    ):
        return ExclusionReason.FOR_PROCESSING
    if header.number_of_frames > 1:
        return ExclusionReason.MULTI_FRAME
    body_part = (header.body_part or "").strip().upper()
    if body_part and body_part not in CHEST_BODY_PARTS:
        return ExclusionReason.BODY_PART_NOT_CHEST
    if (header.view_position or "").strip().upper() in NON_FRONTAL_VIEWS:
        return ExclusionReason.VIEW_NOT_FRONTAL
    image_type = tuple(v.strip().upper() for v in header.image_type)
    if modality in PROJECTION_MODALITIES and image_type[:2] == ("DERIVED", "SECONDARY"):
        return ExclusionReason.DERIVED_IMAGE
    if modality == "CT" and "LOCALIZER" in image_type:
        return ExclusionReason.DERIVED_IMAGE
    return None


def select_images(headers: Sequence[ImageHeader], modalities: Collection[str]) -> SelectionResult:
    """Split ``headers`` into the images a model applies to and the rest, with reasons.

    Parameters
    ----------
    headers
        Headers of a study's instances (see :func:`dicom_io.reader.read_header`).
    modalities
        Modalities the model accepts.

    Returns
    -------
    SelectionResult
        ``selected`` headers and ``excluded`` ``(header, reason)`` pairs, where ``reason``
        is an :class:`ExclusionReason` (a ``str``).
    """
    result = SelectionResult()
    for header in headers:
        reason = exclusion_reason(header, modalities)
        if reason is None:
            result.selected.append(header)
        else:
            result.excluded.append((header, reason))
    return result
