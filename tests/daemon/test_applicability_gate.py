"""Through a running radflag: the shipped bundle's applicability gate sends the dog thorax
(its pixels under a human frontal chest header) and a lateral view (also with a frontal
chest header) to NOT_APPLICABLE with the reason, while a chest radiograph of the training
source rendered as 14-bit DX is classified."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from daemon.app import Radflag
from daemon.models import LoadedModel
from daemon.renditions import to_dataset
from db.models import Study
from db.queries import audit_trail
from dicom_io.reader import read_image
from model.bundle import default_bundle_path, load_bundle
from model.evaluate import card_split
from model.infer import Classifier
from model.preprocess import load_image_file
from model.renditions import RENDITIONS, Rendition, render
from tests.conftest import shared_path
from tests.daemon.conftest import PacsStandIn, dcmsend, make_settings, wait_until

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _state(app: Radflag, uid: str) -> str | None:
    with app.sessions() as s:
        return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))


def _first_lateral() -> Path:
    folder = shared_path("cxr", "ieee8023-covid-train")
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as fh:
        names = sorted(row["filename"] for row in csv.DictReader(fh) if row["view"] == "L")
    return folder / names[0]


def test_gate_answers_not_applicable_for_dog_and_lateral(tmp_path: Path, pacs: PacsStandIn) -> None:
    bundle = load_bundle(default_bundle_path())
    assert bundle.gate is not None
    device = torch.device("cpu")
    models = [
        LoadedModel(bundle=bundle, classifier=Classifier(bundle, device=device), device=device)
    ]
    hospital = next(s for s in RENDITIONS if s.name == "dx14_hospital_mix")
    data = shared_path("cxr", "kermany-pneumonia-train")
    chest_jpeg = card_split(bundle.card, "validation", data)[0].path
    lateral_ds = to_dataset(render(load_image_file(_first_lateral())[0], hospital))
    chest_ds = to_dataset(render(load_image_file(chest_jpeg)[0], hospital, seed=1))
    lateral = tmp_path / "lateral.dcm"
    chest = tmp_path / "chest.dcm"
    lateral_ds.save_as(lateral, enforce_file_format=True)
    chest_ds.save_as(chest, enforce_file_format=True)
    # the dog's pixels under a human frontal chest header: only the image can tell
    dog_image = read_image(shared_path("dicom", "chest-real", "files", "highdicom_dx_image.dcm"))
    dog_ds = to_dataset(
        Rendition(
            name="dog",
            pixels=dog_image.pixels.astype(np.uint16),
            bits_stored=dog_image.bits_stored or 16,
            photometric=dog_image.photometric,
            rescale_slope=dog_image.rescale_slope,
            rescale_intercept=dog_image.rescale_intercept,
        )
    )
    dog = tmp_path / "dog.dcm"
    dog_ds.save_as(dog, enforce_file_format=True)
    app = Radflag(make_settings(tmp_path, pacs.port), models=models)
    app.start()
    try:
        assert dcmsend(app.port, dog, lateral, chest).returncode == 0
        uids = {
            "dog": str(dog_ds.StudyInstanceUID),
            "lateral": str(lateral_ds.StudyInstanceUID),
            "chest": str(chest_ds.StudyInstanceUID),
        }
        wait_until(lambda: _state(app, uids["chest"]) == "DONE", 120, "chest study DONE")
        for what in ("dog", "lateral"):
            uid = uids[what]

            def refused_yet(u: str = uid) -> bool:
                return _state(app, u) == "NOT_APPLICABLE"

            wait_until(refused_yet, 120, f"{what} refused")
            trail = audit_trail(app.sessions, uid)
            assert trail[-1].detail["reasons"][bundle.card.name]["excluded"] == {}
            assert trail[-1].event_type == "STUDY_NOT_APPLICABLE"
            refused = trail[-1].detail["reasons"][bundle.card.name]["not_applicable"]
            assert len(refused) == 1
            assert "frontal chest radiograph" in next(iter(refused.values()))
    finally:
        app.stop()
