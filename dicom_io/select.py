r"""Which received instances a model applies to.

Rules, applied in this order (the first failing rule is the recorded reason):

1. ``MODALITY_MISSING``: Modality must be present.
2. ``OWN_OUTPUT``: radflag's own results routed back are never analysed (loop guard). They
   are recognised by radflag's identity, not by SOP class: a Device Observer UID of one of
   the loaded models (TID 1004), or Manufacturer / Manufacturer's Model Name (or a
   Contributing Equipment item, PS3.3 C.12.1.1.5) of a loaded model, or a model's
   Manufacturer with radflag's result series description (``AI result ...`` /
   ``AI heatmap ...``), see :class:`OwnIdentity`.
3. ``NOT_AN_IMAGE_SOP_CLASS``: objects whose content is a result or annotation, not an image
   -- SR (including Key Object Selection), presentation states, segmentations, waveforms,
   encapsulated documents (:data:`NON_IMAGE_SOP_CLASS_PREFIXES`). Another vendor's AI result
   in such an object is excluded by its content type, whoever made it. After rule 5, an image
   class that is not one of :data:`ANALYSED_SOP_CLASSES` is excluded with the same reason.
4. ``AI_RESULT``: a Secondary Capture with burned-in annotation (0028,0301) ``YES`` whose
   descriptions name an AI/CAD result (``AI``, ``CAD``, ``HEATMAP``...; whole words): another
   vendor's result picture.
5. ``MODALITY_NOT_SUPPORTED``: Modality must be one of the model's modalities (upper-case).
   A Secondary Capture (single or multi-frame, grey or true colour; how digitised films and
   public collections arrive) counts as a radiograph when its Modality is CR/DX, or when its
   Modality is ``OT`` (or another modality the model does not take) and its Body Part
   Examined or descriptions say chest (``CHEST``, ``THORAX``, ``LUNG``, ``CXR``).
6. ``FOR_PROCESSING``: DX "For Processing" objects (SOP class or Presentation Intent Type
   ``FOR PROCESSING``, PS3.3 C.8.11.1) hold raw detector values; they are skipped when the
   study also holds an image for presentation, and analysed when they are all there is.
7. ``MULTI_FRAME``: Number of Frames > 1 (the chest classifier is single-frame).
8. ``BODY_PART_NOT_CHEST``: Body Part Examined must be ``CHEST``, ``THORAX`` or ``LUNG``
   (also as a whole word of a non-standard value such as ``CHEST PA`` or
   ``THORAX_AP_SUPINE``), or absent (many modalities leave it empty).
9. ``NOT_HUMAN``: the patient must be human: Patient Species (PS3.3 C.7.1.1, only present for
   veterinary patients) absent or *Homo sapiens*, and no acquisition description (Protocol
   Name, Acquisition Device Processing Description, Series/Study Description, Performed
   Protocol) naming an animal (``CANINE``, ``FELINE``, ``VETERINARY``...; whole words).
10. ``VIEW_NOT_FRONTAL``: View Position (PS3.3 C.8.11.5) must not be lateral (``LL``, ``RL``,
   ``LAT``, ``LATERAL``), oblique (``RLO``, ``LLO``) or decubitus (``RLD``, ``LLD``); absent,
   ``AP``, ``PA`` and other values are accepted. When View Position is absent, a description
   saying ``LAT``/``LATERAL`` (and no frontal word ``PA``/``AP``/``FRONTAL``) also excludes.
11. ``DERIVED_IMAGE``: for CR/DX, Image Type ``DERIVED\SECONDARY`` (PS3.3 C.7.6.1.1.2):
   images created after the examination, e.g. annotated or re-processed copies.
   ``DERIVED\PRIMARY`` is accepted: many DX systems label their processed "for
   presentation" image that way, and it is the direct result of the examination (value 2
   ``PRIMARY``). With ``require_original`` only ``ORIGINAL`` images pass. A Secondary
   Capture is secondary by nature and is not judged by Image Type. For CT,
   ``LOCALIZER`` (scout) images are excluded.

Rules 8-11 are parameters of :class:`SelectionRules` (the defaults above are
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
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_io.reader import ImageHeader


class ExclusionReason(StrEnum):
    """Why an instance was not selected (closed vocabulary, see module docstring)."""

    MODALITY_MISSING = "modality_missing"
    MODALITY_NOT_SUPPORTED = "modality_not_supported"
    OWN_OUTPUT = "own_output"
    AI_RESULT = "ai_result"
    NOT_AN_IMAGE_SOP_CLASS = "not_an_image_sop_class"
    FOR_PROCESSING = "for_processing"
    MULTI_FRAME = "multi_frame"
    BODY_PART_NOT_CHEST = "body_part_not_chest"
    NOT_HUMAN = "not_human"
    VIEW_NOT_FRONTAL = "view_not_frontal"
    DERIVED_IMAGE = "derived_image"


SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        str(SecondaryCaptureImageStorage),
        str(MultiFrameGrayscaleByteSecondaryCaptureImageStorage),
        str(MultiFrameGrayscaleWordSecondaryCaptureImageStorage),
        str(MultiFrameTrueColorSecondaryCaptureImageStorage),
    }
)
"""Secondary Capture classes that can carry a radiograph (PS3.3 A.8.1-A.8.5; not 1-bit)."""

ANALYSED_SOP_CLASSES = frozenset(
    {
        str(ComputedRadiographyImageStorage),
        str(DigitalXRayImageStorageForPresentation),
        str(DigitalXRayImageStorageForProcessing),
        str(CTImageStorage),
        *SECONDARY_CAPTURE_SOP_CLASSES,
    }
)
"""Image storage SOP classes a model may run on (PS3.4 B.5)."""

CHEST_WORDS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "CXR", "THORACIC"})
"""Words that say chest in a Secondary Capture's body part or descriptions."""

AI_RESULT_WORDS = frozenset(
    {"AI", "CAD", "HEATMAP", "GRADCAM", "SALIENCY", "ATTENTION", "PREDICTION", "INFERENCE"}
)
"""Description words marking another producer's AI/CAD result picture."""

NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, Key Object Selection (PS3.4 B.5)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registrations, segmentations, fiducials
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects
)
"""SOP classes whose content is a result or annotation, not an image a model can read."""

RESULT_SERIES_PREFIXES = ("AI RESULT ", "AI HEATMAP ")
"""Start of the Series Description of radflag's SR and SC (see :mod:`dicom_io.sr`, ``sc``)."""

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


@dataclass(frozen=True)
class OwnIdentity:
    """radflag's identity as it appears in its results, for the loop guard.

    Parameters
    ----------
    manufacturers
        Manufacturer (0008,0070) values of the loaded models' results (upper case).
    model_names
        Manufacturer's Model Name values (the model names, upper case).
    device_observer_uids
        Device Observer UIDs of the loaded models (TID 1004).
    """

    manufacturers: frozenset[str] = frozenset()
    model_names: frozenset[str] = frozenset()
    device_observer_uids: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("manufacturers", "model_names"):
            values = frozenset(v.strip().upper() for v in getattr(self, name))
            object.__setattr__(self, name, values)

    def made(self, header: ImageHeader) -> bool:
        """Return True when ``header`` carries radflag's identity (rule 2)."""
        if set(header.observer_uids) & self.device_observer_uids:
            return True
        for manufacturer, model in (
            (header.manufacturer or "", header.model_name or ""),
            *header.equipment,
        ):
            if manufacturer in self.manufacturers and model in self.model_names:
                return True
        description = (header.series_description or "") + " "
        return bool(header.manufacturer in self.manufacturers) and description.startswith(
            RESULT_SERIES_PREFIXES
        )


NO_IDENTITY = OwnIdentity()
"""No loaded model: only radflag's result series descriptions are recognised."""


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


def is_secondary_capture(sop_class_uid: str) -> bool:
    """Return True for the Secondary Capture classes that may carry a radiograph."""
    return sop_class_uid in SECONDARY_CAPTURE_SOP_CLASSES


def is_result_like(header: ImageHeader, own: OwnIdentity = NO_IDENTITY) -> bool:
    """Return True when ``header`` is a result object, radflag's own or another producer's.

    Used by ingest (the loop guard it feeds): such an instance arriving after a study is
    finished must not reopen it. Non-image objects (SR, KOS, PR, SEG...), radflag's own
    outputs (rule 2; without ``own`` by its result series descriptions) and AI result
    pictures (rule 4) are result-like; images, Secondary Capture radiographs included, are not.
    radflag's result series are recognised by description and Series Number even without
    ``own``.
    """
    if header.sop_class_uid not in ANALYSED_SOP_CLASSES or own.made(header):
        return True
    return _radflag_series(header) or _is_ai_picture(header)


RESULT_SERIES_NUMBERS = frozenset({9901, 9902})
"""Series Numbers of radflag's SR and SC series (defaults of ``build_sr``, ``build_heatmap_sc``)."""


def _radflag_series(header: ImageHeader) -> bool:
    """Return True for radflag's result series: its description and series number."""
    description = (header.series_description or "") + " "
    return (
        description.startswith(RESULT_SERIES_PREFIXES)
        and header.series_number in RESULT_SERIES_NUMBERS
    )


def _is_ai_picture(header: ImageHeader) -> bool:
    return (
        is_secondary_capture(header.sop_class_uid)
        and (header.burned_in_annotation or "") == "YES"
        and bool(_words(header.descriptions) & AI_RESULT_WORDS)
    )


def _says_chest(header: ImageHeader, rules: SelectionRules) -> bool:
    body_part = (header.body_part or "").strip().upper()
    if body_part:
        return body_part in rules.body_parts or bool(_words([body_part]) & CHEST_WORDS)
    return bool(_words(header.descriptions) & CHEST_WORDS)


def _modality_fits(
    header: ImageHeader, modality: str, wanted: set[str], rules: SelectionRules
) -> bool:
    """Rule 5: the model takes the modality, or an SC says chest to a radiograph model."""
    if modality in wanted:
        return True
    return (
        is_secondary_capture(header.sop_class_uid)
        and modality not in {"CT", "MR", "US", "NM", "PT", "MG", "XA", "RF"}
        and bool(wanted & PROJECTION_MODALITIES)
        and _says_chest(header, rules)
    )


def _is_for_processing(header: ImageHeader) -> bool:
    return (
        header.sop_class_uid == str(DigitalXRayImageStorageForProcessing)
        or (header.presentation_intent_type or "").upper() == "FOR PROCESSING"
    )


def exclusion_reason(
    header: ImageHeader,
    modalities: Collection[str],
    rules: SelectionRules = DEFAULT_RULES,
    own: OwnIdentity = NO_IDENTITY,
    *,
    has_presentation: bool = True,
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
    own
        radflag's identity for the loop guard (rule 2).
    has_presentation
        Whether the study holds an image for presentation (rule 6).

    Returns
    -------
    ExclusionReason or None
        The first failing rule of the module docstring, or None.
    """
    wanted = {m.strip().upper() for m in modalities}
    modality = (header.modality or "").strip().upper()
    if not modality:
        return ExclusionReason.MODALITY_MISSING
    if own.made(header) or _radflag_series(header):
        return ExclusionReason.OWN_OUTPUT
    if header.sop_class_uid.startswith(NON_IMAGE_SOP_CLASS_PREFIXES):
        return ExclusionReason.NOT_AN_IMAGE_SOP_CLASS
    if _is_ai_picture(header):
        return ExclusionReason.AI_RESULT
    if not _modality_fits(header, modality, wanted, rules):
        return ExclusionReason.MODALITY_NOT_SUPPORTED
    if header.sop_class_uid not in ANALYSED_SOP_CLASSES:
        return ExclusionReason.NOT_AN_IMAGE_SOP_CLASS
    if _is_for_processing(header) and has_presentation:
        return ExclusionReason.FOR_PROCESSING
    if header.number_of_frames > 1:
        return ExclusionReason.MULTI_FRAME
    return _content_reason(header, modality, rules)


def _content_reason(
    header: ImageHeader, modality: str, rules: SelectionRules
) -> ExclusionReason | None:
    """Rules 8-11: body part, species, view and image type."""
    body_part = (header.body_part or "").strip().upper()
    if body_part and not (body_part in rules.body_parts or _words([body_part]) & rules.body_parts):
        return ExclusionReason.BODY_PART_NOT_CHEST
    if not body_part and not rules.allow_missing_body_part:
        return ExclusionReason.BODY_PART_NOT_CHEST
    if rules.human_only and _is_non_human(header, rules):
        return ExclusionReason.NOT_HUMAN
    if _is_non_frontal(header, rules):
        return ExclusionReason.VIEW_NOT_FRONTAL
    image_type = tuple(v.strip().upper() for v in header.image_type)
    if modality in PROJECTION_MODALITIES and not is_secondary_capture(header.sop_class_uid):
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
    own: OwnIdentity = NO_IDENTITY,
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
    own
        radflag's identity for the loop guard (rule 2).

    Returns
    -------
    SelectionResult
        ``selected`` headers and ``excluded`` ``(header, reason)`` pairs, where ``reason``
        is an :class:`ExclusionReason` (a ``str``).
    """
    result = SelectionResult()
    has_presentation = any(
        not _is_for_processing(h) and exclusion_reason(h, modalities, rules, own) is None
        for h in headers
    )
    for header in headers:
        reason = exclusion_reason(header, modalities, rules, own, has_presentation=has_presentation)
        if reason is None:
            result.selected.append(header)
        else:
            result.excluded.append((header, reason))
    return result
