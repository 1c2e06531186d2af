"""Processing one claimed study: select, decode, classify, write the SR, record the outcome.

This is the worker's unit of work (see the data flow in ``ARCHITECTURE.md``). Errors split in
two: permanent ones (undecodable pixel data, a study with nothing to classify) end the study
in FAILED / NOT_APPLICABLE with the reason; anything unexpected is retried by the queue up to
``worker.max_attempts``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from daemon.models import LoadedModel
from daemon.settings import Settings
from db.queue import (
    ClaimedInstance,
    ClaimedStudy,
    LeaseLost,
    finish_failed,
    finish_not_applicable,
    retry_later,
)
from db.results import OutputRecord, ResultRecord, record_classification
from dicom_io.reader import (
    DecodedImage,
    DecodeError,
    ImageHeader,
    read_dataset,
    read_header,
    read_image,
)
from dicom_io.select import select_images
from dicom_io.spool import Spool
from dicom_io.sr import AlgorithmInfo, FindingResult, build_sr, result_uids
from model.bundle import ModelCard, ModelIdentity
from model.infer import aggregate_study
from model.pixels import PixelMeta

log = logging.getLogger(__name__)


class PermanentProcessingError(Exception):
    """The study's content itself prevents a result; retrying cannot help."""


@dataclass(frozen=True)
class _Selected:
    instance: ClaimedInstance
    header: ImageHeader


def to_pixel_meta(image: DecodedImage) -> PixelMeta:
    """Map the DICOM reader's pixel description onto the model's (the model never sees pydicom)."""
    return PixelMeta(
        photometric=image.photometric,
        rescale_slope=image.rescale_slope,
        rescale_intercept=image.rescale_intercept,
        window_center=image.window_center,
        window_width=image.window_width,
        voi_lut_function=image.voi_lut_function,
        bits_stored=image.bits_stored,
        pixel_spacing_mm=image.pixel_spacing_mm,
    )


class StudyProcessor:
    """Runs the models on claimed studies and records what happened.

    Parameters
    ----------
    settings
        Validated settings.
    sessions
        Session factory of the radflag database.
    spool
        The incoming spool (for quarantine).
    results
        Where result objects are written.
    models
        Warm classifiers.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        spool: Spool,
        results: Spool,
        models: list[LoadedModel],
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._spool = spool
        self._results = results
        self._models = models

    def process(self, claim: ClaimedStudy) -> None:
        """Process ``claim`` to a recorded outcome; never raises except on programming errors."""
        extra = {"study_instance_uid": claim.study_instance_uid, "attempt": claim.attempt}
        try:
            self._process(claim)
        except LeaseLost as exc:
            log.warning("result discarded: study changed while processing (%s)", exc, extra=extra)
        except PermanentProcessingError as exc:
            log.warning("study failed: %s", exc, extra=extra)
            with contextlib.suppress(LeaseLost):
                finish_failed(self._sessions, claim, str(exc))
        except Exception as exc:
            log.exception("processing failed; will retry", extra=extra)
            with contextlib.suppress(LeaseLost):
                retry_later(
                    self._sessions,
                    claim,
                    f"{type(exc).__name__}: {exc}",
                    max_attempts=self._settings.worker.max_attempts,
                )

    def _process(self, claim: ClaimedStudy) -> None:
        t_start = time.perf_counter()
        headers: list[_Selected] = []
        unreadable: dict[str, str] = {}
        for inst in claim.instances:
            try:
                headers.append(_Selected(inst, read_header(Path(inst.path))))
            except Exception as exc:  # noqa: BLE001 - an unreadable file is a recorded reason
                unreadable[inst.sop_instance_uid] = f"{type(exc).__name__}: {exc}"

        by_uid = {h.header.sop_instance_uid: h for h in headers}
        plan: list[tuple[LoadedModel, list[_Selected]]] = []
        reasons: dict[str, Any] = {"unreadable": unreadable}
        for loaded in self._models:
            selection = select_images([h.header for h in headers], loaded.modalities)
            chosen = [by_uid[h.sop_instance_uid] for h in selection.selected]
            reasons[loaded.bundle.card.name] = {
                "selected": [h.header.sop_instance_uid for h in chosen],
                "excluded": {hdr.sop_instance_uid: why for hdr, why in selection.excluded},
            }
            if chosen:
                plan.append((loaded, chosen))
        if not plan:
            log.info(
                "study not applicable to any model",
                extra={"study_instance_uid": claim.study_instance_uid},
            )
            finish_not_applicable(self._sessions, claim, reasons)
            return

        decoded: dict[str, DecodedImage] = {}
        t_decode = time.perf_counter()
        for _, chosen in plan:
            for sel in chosen:
                uid = sel.header.sop_instance_uid
                if uid in decoded:
                    continue
                try:
                    decoded[uid] = read_image(Path(sel.instance.path))
                except DecodeError as exc:
                    self._fail_undecodable(claim, sel, str(exc))
                    return
        decode_ms = (time.perf_counter() - t_decode) * 1000

        records: list[ResultRecord] = []
        for loaded, chosen in plan:
            records.append(self._classify(claim, loaded, chosen, decoded, decode_ms, t_start))
        has_outputs = record_classification(self._sessions, claim, records, selection=reasons)
        log.info(
            "study classified",
            extra={
                "study_instance_uid": claim.study_instance_uid,
                "results": [
                    {
                        "model": r.model_name,
                        "probability": round(r.probability, 4),
                        "positive": r.positive,
                    }
                    for r in records
                ],
                "deliveries_queued": has_outputs,
            },
        )

    def _classify(
        self,
        claim: ClaimedStudy,
        loaded: LoadedModel,
        chosen: list[_Selected],
        decoded: dict[str, DecodedImage],
        decode_ms: float,
        t_start: float,
    ) -> ResultRecord:
        card = loaded.bundle.card
        identity = loaded.bundle.identity
        t0 = time.perf_counter()
        items = [
            (
                decoded[s.header.sop_instance_uid].pixels,
                to_pixel_meta(decoded[s.header.sop_instance_uid]),
            )
            for s in chosen
        ]
        predictions = loaded.classifier.classify(items)
        infer_ms = (time.perf_counter() - t0) * 1000
        per_image = {
            s.header.sop_instance_uid: float(p.probability)
            for s, p in zip(chosen, predictions, strict=True)
        }
        probability = aggregate_study(list(per_image.values()))
        positive = probability >= card.threshold

        t_sr = time.perf_counter()
        sources: list[Dataset] = [
            read_dataset(Path(s.instance.path), with_pixels=False) for s in chosen
        ]
        try:
            sr = self._build_sr(claim, sources, card, identity, probability, positive)
        except ValueError as exc:
            raise PermanentProcessingError(f"cannot build the SR: {exc}") from exc
        series_uid, sop_uid = str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)
        sr_path = self._results.path_for(claim.study_instance_uid, series_uid, sop_uid)
        self._results.write(sr, sr.file_meta, sr_path)
        sr_ms = (time.perf_counter() - t_sr) * 1000
        outputs = tuple(
            OutputRecord(
                destination=d.name,
                ae_title=d.ae_title,
                host=d.host,
                port=d.port,
                kind="SR",
                sop_instance_uid=sop_uid,
                payload_path=str(sr_path),
            )
            for d in self._settings.destinations
        )
        return ResultRecord(
            model_name=identity.name,
            model_version=identity.version,
            weights_sha256=identity.weights_sha256,
            finding_code=card.finding.value,
            finding_meaning=card.finding.meaning,
            probability=probability,
            positive=positive,
            threshold=card.threshold,
            images=per_image,
            timings_ms={
                "decode": round(decode_ms, 1),
                "inference": round(infer_ms, 1),
                "sr": round(sr_ms, 1),
                "total": round((time.perf_counter() - t_start) * 1000, 1),
            },
            device=str(loaded.device),
            sr_series_instance_uid=series_uid,
            sr_sop_instance_uid=sop_uid,
            outputs=outputs,
        )

    def _build_sr(
        self,
        claim: ClaimedStudy,
        sources: list[Dataset],
        card: ModelCard,
        identity: ModelIdentity,
        probability: float,
        positive: bool,
    ) -> Dataset:
        series_uid, sop_uid = result_uids(claim.study_instance_uid, card.name, card.version, "SR")
        return build_sr(
            sources,
            FindingResult(
                code_value=card.finding.value,
                code_scheme=card.finding.scheme,
                code_meaning=card.finding.meaning,
                probability=probability,
                present=positive,
            ),
            AlgorithmInfo(
                name=card.name,
                version=card.version,
                manufacturer=card.manufacturer,
                weights_sha256=identity.weights_sha256,
                threshold=card.threshold,
            ),
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
        )

    def _fail_undecodable(self, claim: ClaimedStudy, sel: _Selected, reason: str) -> None:
        path = Path(sel.instance.path)
        try:
            moved = self._spool.quarantine(path, reason)
        except Exception as exc:  # noqa: BLE001 - keep the file where it is, still fail
            log.error("could not quarantine an undecodable file: %s", exc)
            moved = path
        log.warning(
            "pixel data cannot be decoded; study failed",
            extra={"study_instance_uid": claim.study_instance_uid, "reason": reason},
        )
        finish_failed(
            self._sessions,
            claim,
            f"cannot decode pixel data of {sel.header.sop_instance_uid}: {reason}",
            quarantined={sel.instance.instance_id: str(moved)},
            detail={"sop_instance_uid": sel.header.sop_instance_uid, "quarantine_path": str(moved)},
        )
