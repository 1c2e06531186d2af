"""Benchmark images: Kermany validation radiographs rendered as realistic DX studies.

Each source JPEG of the bundle's validation split is rendered once as the stored values of a
12-bit DX For Presentation object (PS3.3 A.26; :func:`model.renditions.render`, narrow VOI
window, restored to a detector-like size) and then written as many PS3.10 files as needed,
every one with new UIDs (:func:`daemon.renditions.to_dataset`), grouped into studies.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import generate_uid

from daemon.renditions import read_through_dicom, to_dataset
from model.bundle import Bundle
from model.evaluate import card_split
from model.infer import Classifier, select_device
from model.preprocess import load_image_file
from model.renditions import Rendition, RenditionSpec, render

Study = list[Path]


def render_sources(
    bundle: Bundle, count: int, shape: tuple[int, int], data: Path | None = None
) -> list[Rendition]:
    """Render ``count`` validation images of ``bundle`` as 12-bit DX of ``shape`` (rows, cols).

    Parameters
    ----------
    bundle
        Its card names the training data and the patient-level split.
    count
        Distinct source images (seeded sample of the validation split, both classes).
    shape
        Stored (rows, columns).
    data
        Dataset folder when it moved since training.

    Raises
    ------
    ValueError
        When the split cannot be rebuilt (no data).
    """
    records = card_split(bundle.card, "validation", data)
    chosen = random.Random(0).sample(records, min(count, len(records)))
    spec = RenditionSpec(f"bench_dx12_{shape[0]}x{shape[1]}", 12, "narrow", shape=shape)
    return [render(load_image_file(r.path)[0], spec, seed=i) for i, r in enumerate(chosen)]


def keep_applicable(bundle: Bundle, renditions: Sequence[Rendition]) -> list[Rendition]:
    """Drop renditions the bundle's applicability gate refuses (they would get no SR).

    A refused image makes its study NOT_APPLICABLE: no result reaches the PACS, so it could
    neither end a throughput run nor give a latency. Read through the serving path
    (:func:`daemon.renditions.read_through_dicom`).
    """
    clf = Classifier(bundle, device=select_device("auto"))
    verdicts = clf.classify([read_through_dicom(r) for r in renditions])
    return [r for r, v in zip(renditions, verdicts, strict=True) if v.not_applicable is None]


@dataclass
class StudyWriter:
    """Writes DX studies from a fixed set of renditions, cycling through them.

    Attributes
    ----------
    renditions
        Pixel sources; image ``k`` written uses ``renditions[k % len(renditions)]``.
    folder
        Where study folders are created.
    """

    renditions: Sequence[Rendition]
    folder: Path
    _written: int = field(default=0, init=False)
    _studies: int = field(default=0, init=False)

    def studies(self, name: str, n_studies: int, images_per_study: int = 1) -> list[Study]:
        """Write ``n_studies`` studies of ``images_per_study`` images under ``folder/name``.

        Every instance gets new SOP Instance, Series and Study UIDs (one series per study);
        each study its own Patient ID and Accession Number.
        """
        out = self.folder / name
        out.mkdir(parents=True, exist_ok=True)
        result: list[Study] = []
        for _ in range(n_studies):
            self._studies += 1
            study_uid, series_uid = generate_uid(), generate_uid()
            files: Study = []
            for number in range(1, images_per_study + 1):
                ds = to_dataset(self.renditions[self._written % len(self.renditions)])
                self._written += 1
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.PatientID = f"BENCH-{self._studies:05d}"
                ds.AccessionNumber = f"B{self._studies:07d}"
                ds.InstanceNumber = number
                path = out / f"s{self._studies:05d}-{number:04d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
            result.append(files)
        return result


def flatten(studies: Sequence[Study]) -> list[Path]:
    """All files of ``studies`` in order."""
    return [path for study in studies for path in study]
