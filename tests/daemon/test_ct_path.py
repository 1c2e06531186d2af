"""CT slice-level models with study-level aggregation, and several bundles for one study.

A synthetic CT series goes through the in-process radflag (DCMTK storescu -> listener ->
worker -> SR to the PACS stand-in); the study gets ONE result whose probability is the
card's aggregation (``topk_mean``) of the slice probabilities.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from daemon.app import Radflag
from daemon.models import LoadedModel, load_models
from db.models import Result, Study
from model.bundle import ModelCard, build_network, save_bundle
from model.infer import Classifier
from model.preprocess import PreprocessSpec
from tests.daemon.conftest import PacsStandIn, make_settings, storescu, wait_until

pytestmark = pytest.mark.dcmtk

N_SLICES = 7
TOP_K = 3


def _ct_slice(study_uid: str, series_uid: str, index: int, rng: np.random.Generator) -> Dataset:
    """One axial CT slice (CT Image Storage, PS3.3 A.3) of a synthetic chest phantom."""
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((yy - 32) ** 2 / 28**2 + (xx - 32) ** 2 / 30**2) <= 1.0
    lungs = (((yy - 32) ** 2 / 16**2 + (xx - 20) ** 2 / 8**2) <= 1.0) | (
        ((yy - 32) ** 2 / 16**2 + (xx - 44) ** 2 / 8**2) <= 1.0
    )
    hu = np.full((size, size), -1000.0)
    hu[body] = 40.0
    hu[lungs] = -850.0
    hu += rng.normal(0, 15, hu.shape)
    if index % 3 == 0:  # a "nodule" on some slices, so the slice probabilities differ
        hu[(yy - 30) ** 2 + (xx - 20 - index) ** 2 <= 9] = 60.0
    stored = np.clip(hu + 1024.0, 0, 4095).astype(np.int16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientID = "CT-TEST-1"
    ds.PatientName = "Test^Ct"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = "20240101"
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.AccessionNumber = "CTACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "radflag-test"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-160.0, -160.0, -5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [5.0, 5.0]
    ds.SliceThickness = 5.0
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    ds.PixelData = stored.tobytes()
    return ds


def _ct_model(tmp_path: Path) -> LoadedModel:
    torch.manual_seed(1)
    spec = PreprocessSpec(input_size=32, channels=1)
    card = ModelCard(
        name="test-ct-slices",
        version="0.0.1-test",
        architecture="resnet10t",
        classes=["absent", "present"],
        positive_class="present",
        preprocessing=spec.to_dict(),
        threshold=0.5,
        modalities=["CT"],
        aggregation={"method": "topk_mean", "k": TOP_K},
        description="untrained CT slice model for tests",
    )
    bundle = save_bundle(tmp_path / "ct-bundle", build_network("resnet10t", spec), card)
    device = torch.device("cpu")
    return LoadedModel(bundle=bundle, classifier=Classifier(bundle, device=device), device=device)


def _results(app: Radflag, study_uid: str) -> list[Result]:
    with app.sessions() as s:
        rows = s.scalars(
            select(Result).join(Study).where(Study.study_instance_uid == study_uid)
        ).all()
        s.expunge_all()
        return list(rows)


def test_ct_series_gets_one_topk_mean_result(tmp_path: Path, pacs: PacsStandIn) -> None:
    rng = np.random.default_rng(0)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(N_SLICES):
        path = tmp_path / "ct" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        _ct_slice(study_uid, series_uid, i, rng).save_as(path, enforce_file_format=True)
        files.append(path)
    app = Radflag(make_settings(tmp_path, pacs.port), models=[_ct_model(tmp_path)])
    app.start()
    try:
        sent = storescu(app.port, *files)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(_results(app, study_uid)) == 1, 120, "the CT result")
        (result,) = _results(app, study_uid)
        pacs.wait_for(1)
    finally:
        app.stop()
    assert result.model_name == "test-ct-slices" and result.n_images == N_SLICES
    slice_probs = sorted(result.images.values(), reverse=True)
    assert len(slice_probs) == N_SLICES and len(set(slice_probs)) > 1
    assert result.probability == pytest.approx(float(np.mean(slice_probs[:TOP_K])), abs=1e-9)
    assert result.probability != pytest.approx(max(slice_probs), abs=1e-9)
    sr_uids = {str(ds.StudyInstanceUID) for ds in pacs.received}
    assert sr_uids == {study_uid}


def _tiny_cxr_bundle(tmp_path: Path, name: str, positive: str, finding: dict[str, str]) -> Path:
    """An untrained CR/DX bundle without applicability gate (noise images are not refused)."""
    torch.manual_seed(2)
    spec = PreprocessSpec(input_size=32, channels=1)
    card = ModelCard(
        name=name,
        version="0.0.1-test",
        architecture="resnet10t",
        classes=sorted([positive, "other"]),
        positive_class=positive,
        preprocessing=spec.to_dict(),
        threshold=0.5,
        modalities=["CR", "DX"],
        finding=finding,
        description="untrained bundle for the multi-bundle path",
    )
    return save_bundle(tmp_path / name, build_network("resnet10t", spec), card).path


def test_two_bundles_give_two_results_for_one_study(tmp_path: Path, pacs: PacsStandIn) -> None:
    # no COVID-19 weights are shipped, and the shipped pneumonia bundle's gate refuses the
    # noise images used here: two tiny bundles exercise the multi-bundle path
    pneumonia = _tiny_cxr_bundle(
        tmp_path,
        "test-pneumonia-cxr",
        "pneumonia",
        {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"},
    )
    covid = _tiny_cxr_bundle(
        tmp_path,
        "test-covid19-cxr",
        "covid",
        {"scheme": "SCT", "value": "840539006", "meaning": "COVID-19"},
    )
    models = load_models([pneumonia, covid], device="cpu", batch_size=4)
    from tests.dicom_io.conftest import make_dx, save

    study_uid = generate_uid()
    files = [
        save(make_dx(study_uid=study_uid, seed=k, PatientID="TWO-1"), tmp_path / f"{k}.dcm")
        for k in range(2)
    ]
    app = Radflag(make_settings(tmp_path, pacs.port), models=models)
    app.start()
    try:
        sent = storescu(app.port, *files)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(_results(app, study_uid)) == 2, 120, "two results")
        results = _results(app, study_uid)
    finally:
        app.stop()
    by_name = {r.model_name: r for r in results}
    assert set(by_name) == {"test-pneumonia-cxr", "test-covid19-cxr"}
    assert by_name["test-covid19-cxr"].finding_code == "840539006"
    assert by_name["test-pneumonia-cxr"].finding_code == "233604007"
    for r in results:
        assert r.n_images == 2 and 0.0 <= r.probability <= 1.0
