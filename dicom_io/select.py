r"""Which received instances a model applies to.

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
8. ``NOT_HUMAN``: the patient must be human: Patient Species (PS3.3 C.7.1.1, only present for
   veterinary patients) absent or *Homo sapiens*, and no acquisition description (Protocol
   Name, Acquisition Device Processing Description, Series/Study Description, Performed
   Protocol) naming an animal (``CANINE``, ``FELINE``, ``VETERINARY``...; whole words).
9. ``VIEW_NOT_FRONTAL``: View Position (PS3.3 C.8.11.5) must not be lateral (``LL``, ``RL``,
   ``LAT``, ``LATERAL``), oblique (``RLO``, ``LLO``) or decubitus (``RLD``, ``LLD``); absent,
   ``AP``, ``PA`` and other values are accepted. When View Position is absent, a description
   saying ``LAT``/``LATERAL`` (and no frontal word ``PA``/``AP``/``FRONTAL``) also excludes.
10. ``DERIVED_IMAGE``: for CR/DX, Image Type ``DERIVED\SECONDARY`` (PS3.3 C.7.6.1.1.2):
   images created after the examination, e.g. annotated or re-processed copies.
   ``DERIVED\PRIMARY`` is accepted: many DX systems label their processed "for
   presentation" image that way, and it is the direct result of the examination (value 2
   ``PRIMARY``). With ``require_original`` only ``ORIGINAL`` images pass. For CT,
   ``LOCALIZER`` (scout) images are excluded.

Rules 7-10 are parameters of :class:`SelectionRules` (the defaults above are
:data:`DEFAULT_RULES`); the model's modalities come from its model card (CR/DX for chest
radiograph models, CT for CT models).

Every input header ends up in exactly one of ``selected`` or ``excluded``, in input order.
"""

from __future__ import annotations

import re
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
    NOT_HUMAN = "not_human"
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

HUMAN_SPECIES = frozenset({"HOMO SAPIENS", "HUMAN"})
"""Patient Species values meaning a human patient (SNOMED CT 337915000 *Homo sapiens*)."""

NON_HUMAN_WORDS = frozenset(
    {
        "VETERINARY",
        "VET",
        "CANINE",
        "FELINE",
        "EQUINE",
        "BOVINE",
        "PORCINE",
        "OVINE",
        "CAPRINE",
        "AVIAN",
        "DOG",
        "CAT",
        "HORSE",
    }
)
"""Words in acquisition descriptions that mark a veterinary acquisition."""

LATERAL_WORDS = frozenset({"LAT", "LATERAL", "LL", "RL", "DECUBITUS", "OBLIQUE"})
FRONTAL_WORDS = frozenset({"PA", "AP", "FRONTAL"})
_WORD_RE = re.compile(r"[A-Z]+")


@dataclass(frozen=True)
class SelectionRules:
    r"""Configurable part of the selection rules (see the module docstring).

    Parameters
    ----------
    body_parts
        Accepted Body Part Examined values (upper case).
    allow_missing_body_part
        Accept images without Body Part Examined.
    excluded_view_positions
        View Position values that are not frontal.
    view_from_descriptions
        When View Position is absent, exclude images whose descriptions say lateral.
    human_only
        Exclude veterinary patients (species or description words).
    non_human_words
        Description words marking a veterinary acquisition.
    exclude_derived_secondary
        Exclude CR/DX ``DERIVED\SECONDARY`` images.
    require_original
        Accept only CR/DX images whose Image Type value 1 is ``ORIGINAL``.
    """

    body_parts: frozenset[str] = CHEST_BODY_PARTS
    allow_missing_body_part: bool = True
    excluded_view_positions: frozenset[str] = NON_FRONTAL_VIEWS
    view_from_descriptions: bool = True
    human_only: bool = True
    non_human_words: frozenset[str] = NON_HUMAN_WORDS
    exclude_derived_secondary: bool = True
    require_original: bool = False

    def __post_init__(self) -> None:
        for name in ("body_parts", "excluded_view_positions", "non_human_words"):
            values = getattr(self, name)
            if isinstance(values, str):
                raise TypeError(f"{name} must be a collection of strings, not a string")
            object.__setattr__(self, name, frozenset(v.strip().upper() for v in values))


DEFAULT_RULES = SelectionRules()
"""The documented defaults."""


def _words(texts: Sequence[str]) -> set[str]:
    return {word for text in texts for word in _WORD_RE.findall(text.upper())}


def _is_non_human(header: ImageHeader, rules: SelectionRules) -> bool:
    species = (header.species or "").strip().upper()
    if species and species not in HUMAN_SPECIES:
        return True
    return bool(_words(header.descriptions) & rules.non_human_words)


def _is_non_frontal(header: ImageHeader, rules: SelectionRules) -> bool:
    view = (header.view_position or "").strip().upper()
    if view:
        return view in rules.excluded_view_positions
    if not rules.view_from_descriptions:
        return False
    words = _words(header.descriptions)
    return bool(words & LATERAL_WORDS) and not words & FRONTAL_WORDS


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of :func:`select_images`."""

    selected: list[ImageHeader] = field(default_factory=list)
    excluded: list[tuple[ImageHeader, str]] = field(default_factory=list)


def is_never_classified(sop_class_uid: str) -> bool:
    """Return True for SOP classes the loop guard excludes: SR, presentation states, SC.

    radflag emits SR and Secondary Capture objects itself; a PACS that routes a study back
    sends them too. Callers (e.g. study assembly) may use this to avoid re-opening a finished
    study for such an instance.
    """
    return (
        sop_class_uid.startswith(_SECONDARY_CAPTURE_PREFIX)
        or sop_class_uid.startswith(_SR_PREFIX)
        or sop_class_uid.startswith(_PRESENTATION_STATE_PREFIX)
    )


def exclusion_reason(
    header: ImageHeader, modalities: Collection[str], rules: SelectionRules = DEFAULT_RULES
) -> ExclusionReason | None:
    """Return why ``header`` is excluded for a model of ``modalities``, or None if selected.

    Parameters
    ----------
    header
        The instance header.
    modalities
        Modalities the model accepts (e.g. ``{"CR", "DX"}``).
    rules
        Configurable rules; :data:`DEFAULT_RULES` by default.

    Returns
    -------
    ExclusionReason or None
        The first failing rule of the module docstring, or None.
    """
    wanted = {m.strip().upper() for m in modalities}
    modality = (header.modality or "").strip().upper()
    if not modality:
        return ExclusionReason.MODALITY_MISSING
    if is_never_classified(header.sop_class_uid):
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
    if body_part and body_part not in rules.body_parts:
        return ExclusionReason.BODY_PART_NOT_CHEST
    if not body_part and not rules.allow_missing_body_part:
        return ExclusionReason.BODY_PART_NOT_CHEST
    if rules.human_only and _is_non_human(header, rules):
        return ExclusionReason.NOT_HUMAN
    if _is_non_frontal(header, rules):
        return ExclusionReason.VIEW_NOT_FRONTAL
    image_type = tuple(v.strip().upper() for v in header.image_type)
    if modality in PROJECTION_MODALITIES:
        if rules.exclude_derived_secondary and image_type[:2] == ("DERIVED", "SECONDARY"):
            return ExclusionReason.DERIVED_IMAGE
        if rules.require_original and image_type[:1] != ("ORIGINAL",):
            return ExclusionReason.DERIVED_IMAGE
    if modality == "CT" and "LOCALIZER" in image_type:
        return ExclusionReason.DERIVED_IMAGE
    return None


def select_images(
    headers: Sequence[ImageHeader],
    modalities: Collection[str],
    rules: SelectionRules = DEFAULT_RULES,
) -> SelectionResult:
    """Split ``headers`` into the images a model applies to and the rest, with reasons.

    Parameters
    ----------
    headers
        Headers of a study's instances (see :func:`dicom_io.reader.read_header`).
    modalities
        Modalities the model accepts.
    rules
        Configurable rules; :data:`DEFAULT_RULES` by default.

    Returns
    -------
    SelectionResult
        ``selected`` headers and ``excluded`` ``(header, reason)`` pairs, where ``reason``
        is an :class:`ExclusionReason` (a ``str``).
    """
    result = SelectionResult()
    for header in headers:
        reason = exclusion_reason(header, modalities, rules)
        if reason is None:
            result.selected.append(header)
        else:
            result.excluded.append((header, reason))
    return result
