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
from dicom_io.select import (
    DEFAULT_RULES,
    ExclusionReason,
    OwnIdentity,
    SelectionRules,
    is_result_like,
    select_images,
)

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
        (
            {
                "modality": "OT",
                "body_part": None,
                "sop_class_uid": str(SecondaryCaptureImageStorage),
            },
            ExclusionReason.MODALITY_NOT_SUPPORTED,
        ),
        (
            {"modality": "SR", "sop_class_uid": str(ComprehensiveSRStorage)},
            ExclusionReason.NOT_AN_IMAGE_SOP_CLASS,
        ),
        (
            {"modality": "KO", "sop_class_uid": str(KeyObjectSelectionDocumentStorage)},
            ExclusionReason.NOT_AN_IMAGE_SOP_CLASS,
        ),
        (
            {"modality": "PR", "sop_class_uid": str(GrayscaleSoftcopyPresentationStateStorage)},
            ExclusionReason.NOT_AN_IMAGE_SOP_CLASS,
        ),
        (
            {"modality": "SEG", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4"},
            ExclusionReason.NOT_AN_IMAGE_SOP_CLASS,
        ),
        (
            {
                "modality": "OT",
                "sop_class_uid": str(SecondaryCaptureImageStorage),
                "burned_in_annotation": "YES",
                "descriptions": ("VENDOR AI HEATMAP",),
            },
            ExclusionReason.AI_RESULT,
        ),
        (
            {
                "modality": "OT",
                "sop_class_uid": str(SecondaryCaptureImageStorage),
                "series_description": "AI HEATMAP RADFLAG-PNEUMONIA 1.0",
                "series_number": 9902,
            },
            ExclusionReason.OWN_OUTPUT,
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
        # Secondary Capture radiographs (digitised films, public collections)
        {"modality": "CR", "sop_class_uid": str(SecondaryCaptureImageStorage)},
        {
            "modality": "CR",
            "sop_class_uid": str(SecondaryCaptureImageStorage),
            "image_type": ("DERIVED", "SECONDARY"),
        },
        {"modality": "OT", "sop_class_uid": str(SecondaryCaptureImageStorage)},  # CHEST
        {
            "modality": "OT",
            "body_part": None,
            "descriptions": ("CXR PA",),
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7.4",  # multi-frame true colour SC
        },
        {
            "modality": "DX",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7.3",  # multi-frame word SC, 1 frame
            "burned_in_annotation": "YES",  # a film label, not an AI result
        },
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


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"species": "CANIS LUPUS FAMILIARIS"}, ExclusionReason.NOT_HUMAN),
        ({"descriptions": ("CANINE LATERAL THORAX 0-15CM",)}, ExclusionReason.NOT_HUMAN),
        ({"descriptions": ("Veterinary chest",)}, ExclusionReason.NOT_HUMAN),
        (
            {"view_position": None, "descriptions": ("CHEST LAT",)},
            ExclusionReason.VIEW_NOT_FRONTAL,
        ),
    ],
)
def test_human_and_described_view_rules(changes: dict[str, object], reason: str) -> None:
    result = select_images([variant(1, **changes)], {"DX"})
    assert [r for _, r in result.excluded] == [reason]


@pytest.mark.parametrize(
    "changes",
    [
        {"species": "HOMO SAPIENS"},
        {"descriptions": ("CHEST PA", "CATHETER CHECK")},  # words, not substrings: CAT-heter
        {"view_position": None, "descriptions": ("CHEST PA AND LAT",)},  # frontal word wins
        {"view_position": "PA", "descriptions": ("CHEST LAT",)},  # View Position wins
    ],
)
def test_human_frontal_variants_are_selected(changes: dict[str, object]) -> None:
    assert select_images([variant(1, **changes)], {"DX"}).selected


def test_rules_are_configurable() -> None:
    hand = variant(1, body_part="HAND")
    no_part = variant(2, body_part=None)
    derived = variant(3, image_type=("DERIVED", "PRIMARY"))
    lateral_text = variant(4, view_position=None, descriptions=("CHEST LATERAL",))
    headers = [hand, no_part, derived, lateral_text]

    default = select_images(headers, {"DX"})
    strict = select_images(
        headers,
        {"DX"},
        SelectionRules(
            body_parts=frozenset({"hand"}),
            allow_missing_body_part=False,
            require_original=True,
            view_from_descriptions=False,
        ),
    )

    assert [h.sop_instance_uid for h in default.selected] == ["1.2.3.2", "1.2.3.3"]
    assert [h.sop_instance_uid for h in strict.selected] == ["1.2.3.1"]
    assert dict((h.sop_instance_uid, r) for h, r in strict.excluded) == {
        "1.2.3.2": ExclusionReason.BODY_PART_NOT_CHEST,
        "1.2.3.3": ExclusionReason.BODY_PART_NOT_CHEST,
        "1.2.3.4": ExclusionReason.BODY_PART_NOT_CHEST,
    }
    assert select_images([derived], {"DX"}, SelectionRules(require_original=True)).excluded == [
        (derived, ExclusionReason.DERIVED_IMAGE)
    ]
    assert SelectionRules() == DEFAULT_RULES
    with pytest.raises(TypeError, match="body_parts"):
        SelectionRules(body_parts="CHEST")  # type: ignore[arg-type]


@pytest.mark.shared
def test_real_files_selection() -> None:
    from dicom_io.reader import read_header
    from tests.conftest import shared_path

    chest = shared_path("dicom", "chest-real", "files")
    headers = {
        name: read_header(chest / name)
        for name in (
            "JPEG2KLossless_1s_1f_u_16_16.dcm",
            "966_malformed.dcm",
            "highdicom_dx_image.dcm",
        )
    }
    result = select_images(list(headers.values()), {"CR", "DX"})
    reasons = {h.path.name: r for h, r in result.excluded if h.path is not None}

    assert sorted(h.path.name for h in result.selected if h.path is not None) == [
        "966_malformed.dcm",  # DERIVED\PRIMARY DX chest PA: reaches the decoder (and fails there)
        "JPEG2KLossless_1s_1f_u_16_16.dcm",
    ]
    assert reasons == {"highdicom_dx_image.dcm": ExclusionReason.NOT_HUMAN}  # a dog's thorax


def test_for_processing_is_analysed_only_when_alone() -> None:
    raw = variant(7, sop_class_uid=str(DigitalXRayImageStorageForProcessing))
    assert select_images([raw], {"DX"}).selected == [raw]
    assert select_images([BASE, raw], {"DX"}).excluded == [(raw, ExclusionReason.FOR_PROCESSING)]


def test_loop_guard_recognises_identity_not_sop_class() -> None:
    own = OwnIdentity(
        manufacturers=frozenset({"radflag project"}),
        model_names=frozenset({"radflag-pneumonia-cxr"}),
        device_observer_uids=frozenset({"2.25.42"}),
    )
    sc = str(SecondaryCaptureImageStorage)
    own_sc = variant(
        2,
        sop_class_uid=sc,
        modality="OT",
        manufacturer="RADFLAG PROJECT",
        model_name="RADFLAG-PNEUMONIA-CXR",
    )
    own_sr = variant(3, sop_class_uid=str(ComprehensiveSRStorage), observer_uids=("2.25.42",))
    other_sr = variant(4, sop_class_uid=str(ComprehensiveSRStorage), manufacturer="ACME AI")
    film = variant(5, sop_class_uid=sc, modality="CR", manufacturer="ACME DIGITIZER")
    contributed = variant(
        6, manufacturer="ACME", equipment=(("RADFLAG PROJECT", "RADFLAG-PNEUMONIA-CXR"),)
    )
    result = select_images([own_sc, own_sr, other_sr, film, contributed], {"DX", "CR"}, own=own)
    assert result.selected == [film]
    assert dict((h.sop_instance_uid, r) for h, r in result.excluded) == {
        "1.2.3.2": ExclusionReason.OWN_OUTPUT,
        "1.2.3.3": ExclusionReason.OWN_OUTPUT,
        "1.2.3.4": ExclusionReason.NOT_AN_IMAGE_SOP_CLASS,
        "1.2.3.6": ExclusionReason.OWN_OUTPUT,
    }
    # ingest: result objects never reopen a finished study; a radiograph does
    assert [is_result_like(h, own) for h in (own_sc, own_sr, other_sr, film)] == [
        True,
        True,
        True,
        False,
    ]
