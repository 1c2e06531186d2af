"""Image selection rules."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    GrayscaleSoftcopyPresentationStateStorage,
    KeyObjectSelectionDocumentStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from dicom_io.reader import ImageHeader
from dicom_io.select import ExclusionReason, select_images

BASE = ImageHeader(
    sop_instance_uid="1.2.3.1",
    sop_class_uid=str(DigitalXRayImageStorageForPresentation),
    study_instance_uid="1.2.3",
    series_instance_uid="1.2.3.0",
    modality="DX",
    body_part="CHEST",
    view_position="PA",
    image_type=("ORIGINAL", "PRIMARY"),
    laterality=None,
    presentation_intent_type="FOR PRESENTATION",
    photometric="MONOCHROME2",
    rows=2048,
    columns=2048,
    number_of_frames=1,
    series_number=1,
    instance_number=1,
    transfer_syntax_uid=None,
)


def variant(n: int, **changes: object) -> ImageHeader:
    return dataclasses.replace(BASE, sop_instance_uid=f"1.2.3.{n}", **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"modality": None}, ExclusionReason.MODALITY_MISSING),
        (
            {"modality": "MR", "sop_class_uid": str(MRImageStorage)},
            ExclusionReason.MODALITY_NOT_SUPPORTED,
        ),
        ({"sop_class_uid": str(SecondaryCaptureImageStorage)}, ExclusionReason.OWN_OUTPUT_KIND),
        (
            {"modality": "SR", "sop_class_uid": str(ComprehensiveSRStorage)},
            ExclusionReason.OWN_OUTPUT_KIND,
        ),
        (
            {"modality": "KO", "sop_class_uid": str(KeyObjectSelectionDocumentStorage)},
            ExclusionReason.OWN_OUTPUT_KIND,
        ),
        (
            {"modality": "PR", "sop_class_uid": str(GrayscaleSoftcopyPresentationStateStorage)},
            ExclusionReason.OWN_OUTPUT_KIND,
        ),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.2"}, ExclusionReason.NOT_AN_IMAGE_SOP_CLASS),
        (
            {"sop_class_uid": str(DigitalXRayImageStorageForProcessing)},
            ExclusionReason.FOR_PROCESSING,
        ),
        ({"presentation_intent_type": "FOR PROCESSING"}, ExclusionReason.FOR_PROCESSING),
        ({"number_of_frames": 3}, ExclusionReason.MULTI_FRAME),
        ({"body_part": "HAND"}, ExclusionReason.BODY_PART_NOT_CHEST),
        ({"view_position": "LL"}, ExclusionReason.VIEW_NOT_FRONTAL),
        ({"view_position": "LATERAL"}, ExclusionReason.VIEW_NOT_FRONTAL),
        ({"view_position": "rl"}, ExclusionReason.VIEW_NOT_FRONTAL),
        ({"image_type": ("DERIVED", "SECONDARY")}, ExclusionReason.DERIVED_IMAGE),
    ],
)
def test_exclusion_rules(changes: dict[str, object], reason: ExclusionReason) -> None:
    header = variant(9, **changes)
    result = select_images([BASE, header], {"DX", "CR"})
    assert result.selected == [BASE]
    assert result.excluded == [(header, reason)]


@pytest.mark.parametrize(
    "changes",
    [
        {"body_part": None},
        {"body_part": "THORAX"},
        {"view_position": None},
        {"view_position": "AP"},
        {"modality": "cr", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1"},
        {"image_type": ()},
        {"image_type": ("DERIVED", "PRIMARY")},
    ],
)
def test_accepted_variants(changes: dict[str, object]) -> None:
    header = variant(5, **changes)
    assert select_images([header], ["DX", "CR"]).selected == [header]


def test_ct_rules() -> None:
    axial = variant(
        1,
        modality="CT",
        sop_class_uid=str(CTImageStorage),
        image_type=("DERIVED", "PRIMARY", "AXIAL"),
    )
    scout = variant(
        2,
        modality="CT",
        sop_class_uid=str(CTImageStorage),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    result = select_images([axial, scout], {"CT"})
    assert result.selected == [axial]
    assert result.excluded == [(scout, ExclusionReason.DERIVED_IMAGE)]


def test_every_header_is_accounted_for_in_order() -> None:
    headers = [variant(i, view_position=("LL" if i % 2 else "PA")) for i in range(6)]
    result = select_images(headers, {"DX"})
    assert [h.sop_instance_uid for h in result.selected] == ["1.2.3.0", "1.2.3.2", "1.2.3.4"]
    assert [h.sop_instance_uid for h, _ in result.excluded] == ["1.2.3.1", "1.2.3.3", "1.2.3.5"]
