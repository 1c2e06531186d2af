"""Warm the result encoder at start-up, so the first study is not the slow one.

highdicom reads its tables of the standard (IODs, modules; JSON) the first time an SR is
built: about half a second on a 2-core machine, paid by the first study after every start
(measured: SR stage 814 ms for the first study, 35-60 ms after). The daemon already loads
its models warm before it accepts associations (:mod:`daemon.app`); this builds one
throw-away SR (PS3.3 A.35.13, TID 1500) for a synthetic header in the same start-up step.
Nothing is written or sent; a failure only costs the first study the time again.
"""

from __future__ import annotations

import logging
import time

from pydicom.dataset import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, generate_uid

from dicom_io.sr import AlgorithmInfo, FindingResult, build_sr, result_uids

log = logging.getLogger(__name__)


def _synthetic_source() -> Dataset:
    """Return a 1x1 DX header: what highdicom needs of an analysed image (no Pixel Data)."""
    ds = Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientID = "WARM-UP"
    ds.PatientName = "WARM^UP"
    ds.Rows = ds.Columns = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def warm_up_sr_encoder() -> float | None:
    """Build and discard one SR; return the seconds it took (None when it failed)."""
    t0 = time.perf_counter()
    source = _synthetic_source()
    series_uid, sop_uid = result_uids(str(source.StudyInstanceUID), "warm-up", "0", "SR")
    try:
        build_sr(
            [source],
            FindingResult("233604007", "SCT", "Pneumonia", probability=0.5, present=False),
            AlgorithmInfo("warm-up", "0", "radflag", "0" * 64, 0.5),
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
        )
    except Exception as exc:  # noqa: BLE001 - best effort: the first study pays instead
        log.warning("SR encoder warm-up failed: %s", type(exc).__name__)
        return None
    return time.perf_counter() - t0
