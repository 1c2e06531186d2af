"""Every file of the transfer-syntax zoo and of chest-real, sent by DCMTK ``dcmsend``.

Each file ends in exactly one expected outcome: classified, not applicable (with the
selection reason in the audit trail), quarantined (study failed with the decoder's reason) or
refused (its SOP class is not one radflag serves: the C-STORE never happens). Files of the
refused SOP classes are also sent relabelled as Secondary Capture, so that every transfer
syntax of the zoo (implicit/explicit/big endian, deflate, JPEG, JPEG-LS, JPEG 2000, RLE) is
negotiated, stored as received and decoded from the spool. Afterwards a duplicate is counted
once and the listener still answers C-ECHO.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select

from db.models import Instance, Result, Study
from db.queries import audit_trail
from dicom_io.reader import read_image
from tests.conftest import shared_path
from tests.daemon.conftest import (  # noqa: F401 - fixtures
    make_settings,
    start_app,
    tiny_bundle,
    tiny_models,
    wait_until,
)
from tests.peers.dcmtk import echoscu

pytestmark = [pytest.mark.dcmtk, pytest.mark.shared]

CLASSIFIED = "classified"
QUARANTINED = "quarantined"
REFUSED = "refused"

EXPECTED: dict[str, tuple[str, str | None]] = {
    # chest-real
    "JPEG2KLossless_1s_1f_u_16_16.dcm": (CLASSIFIED, None),
    "966_malformed.dcm": (QUARANTINED, "cannot decode pixel data"),
    "highdicom_dx_image.dcm": ("NOT_APPLICABLE", "not_human"),
    # zoo: accepted SOP classes, nothing to classify
    "CT1_jpegls_nearlossless.dcm": ("NOT_APPLICABLE", "modality_not_supported"),
    "CR_hip_RG2_jpeg_extended.dcm": ("NOT_APPLICABLE", "body_part_not_chest"),
    "CR_hip_RG2_jpeg_lossless_sv1.dcm": ("NOT_APPLICABLE", "body_part_not_chest"),
    "CR_hip_RG2_jpegls_lossless.dcm": ("NOT_APPLICABLE", "body_part_not_chest"),
    "CR_extremity_RG3_j2k_lossless.dcm": ("NOT_APPLICABLE", "body_part_not_chest"),
    # Secondary Captures (OT, NM) that do not say chest: not radiographs radflag reads
    "image_deflated.dcm": ("NOT_APPLICABLE", "modality_not_supported"),
    "SC_rgb_jpeg_baseline.dcm": ("NOT_APPLICABLE", "modality_not_supported"),
    "NM_jpeg_extended_12bit.dcm": ("NOT_APPLICABLE", "modality_not_supported"),
    "NM_jpeg_lossless_sv1.dcm": ("NOT_APPLICABLE", "modality_not_supported"),
    "NM_j2k_lossy.dcm": ("NOT_APPLICABLE", "modality_not_supported"),
    # zoo: SOP classes radflag does not serve (MR, Enhanced MR, US multi-frame)
    "MR_small_explicitLE.dcm": (REFUSED, None),
    "MR_small_implicitLE.dcm": (REFUSED, None),
    "MR_small_explicitBE.dcm": (REFUSED, None),
    "MR_jpeg_lossless_p14.dcm": (REFUSED, None),
    "MR_small_jpegls_lossless.dcm": (REFUSED, None),
    "MR_small_j2k_lossless.dcm": (REFUSED, None),
    "MR_small_rle.dcm": (REFUSED, None),
    "MR_multiframe10_explicitLE.dcm": (REFUSED, None),
    "MR_multiframe10_j2k_lossless.dcm": (REFUSED, None),
    "MR_multiframe10_jpegls_lossless.dcm": (REFUSED, None),
    "MR_multiframe10_rle.dcm": (REFUSED, None),
    "US_multiframe30_jpeg_baseline_ybr.dcm": (REFUSED, None),
}


NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _same_encoding(stored: object, original: object) -> bool:
    """Compressed data keeps its transfer syntax; native data may change byte order/VR form.

    DCMTK proposes every native syntax for native data and radflag prefers Explicit VR Little
    Endian (Big Endian is retired, PS3.5 A.3), so a native file may arrive re-encoded.
    """
    if str(original) in NATIVE_SYNTAXES:
        return str(stored) in NATIVE_SYNTAXES
    return str(stored) == str(original)


def _relabelled_as_sc(source: Path, out_dir: Path) -> Path:
    """Copy of ``source`` as a Secondary Capture (new SOP Instance UID), same transfer syntax."""
    ds = dcmread(source)
    uid = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    path = out_dir / f"sc_{source.name}"
    ds.save_as(path, enforce_file_format=True)
    return path


def _dcmsend(port: int, files: list[Path], report: Path) -> dict[str, str]:
    """Send with ``dcmsend``; return the DIMSE status per file from its report (``+crf``)."""
    # -dn: never decompress, each file goes in its own transfer syntax (or not at all);
    # -nh: go on after a refused C-STORE.
    argv = ["/usr/bin/dcmsend", "-dn", "-nh", "-to", "20", "-aet", "MODALITY", "-aec", "RADFLAG"]
    proc = subprocess.run(
        [*argv, "+crf", str(report), "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert report.is_file(), proc.stdout + proc.stderr
    outcome: dict[str, str] = {}
    for block in report.read_text().split("\n\n"):
        fields = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in block.splitlines())
        )
        if "Filename" in fields:
            outcome[fields["Filename"]] = fields.get("DIMSE Status", "")
    return outcome


def _states(app: Any) -> dict[str, str]:
    with app.sessions() as s:
        return {u: st for u, st in s.execute(select(Study.study_instance_uid, Study.state))}


def test_every_zoo_and_chest_file_gets_its_outcome(tmp_path: Path, start_app: Any) -> None:  # noqa: F811
    zoo = shared_path("dicom", "transfer-syntax-zoo", "files")
    chest = shared_path("dicom", "chest-real", "files")
    files = sorted([*zoo.glob("*.dcm"), *chest.glob("*.dcm")])
    assert sorted(f.name for f in files) == sorted(EXPECTED), "shared data changed"
    relabel_dir = tmp_path / "relabelled"
    relabel_dir.mkdir()
    relabelled = [
        _relabelled_as_sc(f, relabel_dir) for f in files if EXPECTED[f.name][0] == REFUSED
    ]
    headers = {f: dcmread(f, stop_before_pixels=True) for f in [*files, *relabelled]}

    app = start_app(make_settings(tmp_path, None))
    sent = _dcmsend(app.port, [*files, *relabelled], tmp_path / "report.txt")
    duplicate = files[[f.name for f in files].index("JPEG2KLossless_1s_1f_u_16_16.dcm")]
    again = _dcmsend(app.port, [duplicate], tmp_path / "again.txt")

    for f in [*files, *relabelled]:
        refused = f in files and EXPECTED[f.name][0] == REFUSED
        assert sent[str(f)] == ("<not sent>" if refused else "0x0000 (Success)"), f.name
    assert again == {str(duplicate): "0x0000 (Success)"}

    study_uids = {str(h.StudyInstanceUID) for f, h in headers.items() if f not in files}
    study_uids |= {
        str(headers[f].StudyInstanceUID) for f in files if EXPECTED[f.name][0] != REFUSED
    }
    wait_until(
        lambda: all(
            _states(app).get(u) in {"DONE", "NOT_APPLICABLE", "FAILED"} for u in study_uids
        ),
        timeout_s=90,
        what="every study finished",
    )
    states = _states(app)
    with app.sessions() as s:
        instances = {i.sop_instance_uid: i for i in s.scalars(select(Instance)).all()}
        results = s.scalars(select(Result)).all()

    for f in files:
        outcome, reason = EXPECTED[f.name]
        header = headers[f]
        sop_uid, study_uid = str(header.SOPInstanceUID), str(header.StudyInstanceUID)
        if outcome == REFUSED:
            assert sop_uid not in instances, f.name
            continue
        inst = instances[sop_uid]
        assert _same_encoding(inst.transfer_syntax_uid, header.file_meta.TransferSyntaxUID)
        trail = audit_trail(app.sessions, study_uid)
        if outcome == CLASSIFIED:
            assert states[study_uid] == "DONE", f.name
            assert [r.images for r in results if sop_uid in r.images], f.name
        elif outcome == QUARANTINED:
            assert states[study_uid] == "FAILED", f.name
            assert inst.quarantined and app.spool.resolve(inst.path).is_file()
            assert app.spool.resolve(inst.path).parent == app.spool.quarantine_dir
            failed = [e for e in trail if e.event_type == "STUDY_FAILED"]
            assert reason is not None and reason in str(failed[-1].detail), f.name
            assert "J2K" in str(failed[-1].detail) or "decode" in str(failed[-1].detail)
        else:
            assert states[study_uid] == outcome, f.name
            (na,) = [e for e in trail if e.event_type == "STUDY_NOT_APPLICABLE"]
            excluded = na.detail["reasons"]["test-pneumonia"]["excluded"]
            assert excluded[sop_uid] == reason, f.name
            assert not [r for r in results if sop_uid in r.images]

    # Every accepted file -- relabelled ones included, so every zoo transfer syntax -- is
    # stored as received and decodes from the spool to the same pixels as the original.
    for f in [*files, *relabelled]:
        sop_uid = str(headers[f].SOPInstanceUID)
        if sop_uid not in instances or instances[sop_uid].quarantined:
            continue
        stored = app.spool.resolve(instances[sop_uid].path)
        stored_syntax = dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert _same_encoding(stored_syntax, headers[f].file_meta.TransferSyntaxUID), f.name
        decoded = read_image(stored)
        original = dcmread(f).pixel_array
        expected = original[0] if int(headers[f].get("NumberOfFrames", 1) or 1) > 1 else original
        np.testing.assert_array_equal(decoded.pixels, expected, err_msg=f.name)
    assert {
        str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in relabelled
    } >= {
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.5",
    }

    # The duplicate: stored once, counted once; the listener still answers.
    assert instances[str(headers[duplicate].SOPInstanceUID)].duplicate_count == 1
    dup_events = [
        e
        for e in audit_trail(app.sessions, str(headers[duplicate].StudyInstanceUID))
        if e.event_type == "INSTANCE_DUPLICATE"
    ]
    assert len(dup_events) == 1
    assert echoscu(app.port, called_aet="RADFLAG", timeout_s=10).returncode == 0
