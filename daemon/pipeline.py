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

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy.orm import Session, sessionmaker

from daemon.models import LoadedModel
from daemon.settings import TRANSFER_SYNTAXES, Settings
from db.queue import (
    ClaimedInstance,
    ClaimedStudy,
    LeaseLost,
    finish_failed,
    finish_not_applicable,
    retry_later,
)
from db.results import OutputRecord, ResultRecord, record_classification, study_sender
from dicom_io.reader import (
    DecodedImage,
    DecodeError,
    ImageHeader,
    read_dataset,
    read_header,
    read_image,
)
from dicom_io.sc import build_heatmap_sc, encode_in
from dicom_io.select import select_images
from dicom_io.spool import Spool
from dicom_io.sr import (
    AlgorithmInfo,
    FindingResult,
    as_comprehensive_sr,
    build_sr,
    result_uids,
)
from model.infer import ImagePrediction, aggregate_study
from model.pixels import PixelMeta
from model.preprocess import to_display

log = logging.getLogger(__name__)


class PermanentProcessingError(Exception):
    """The study's content itself prevents a result; retrying cannot help."""


class NotApplicableImages(Exception):
    """The model's applicability gate refused every selected image of the study."""


def keep_applicable(
    chosen: list[_Selected], predictions: list[ImagePrediction], rejected: dict[str, str]
) -> tuple[list[_Selected], list[ImagePrediction]]:
    """Drop images the bundle's applicability gate refuses, recording why by SOP Instance UID.

    Parameters
    ----------
    chosen
        Selected images, in the order of ``predictions``.
    predictions
        The classifier's output for them.
    rejected
        Filled with ``{sop_instance_uid: reason}`` for every refused image.

    Raises
    ------
    NotApplicableImages
        When no image is left: the study gets no answer from this model.
    """
    kept = [(s, p) for s, p in zip(chosen, predictions, strict=True) if p.not_applicable is None]
    for sel, pred in zip(chosen, predictions, strict=True):
        if pred.not_applicable is not None:
            rejected[sel.header.sop_instance_uid] = pred.not_applicable
    if not kept:
        raise NotApplicableImages(f"{len(rejected)} image(s) refused by the applicability gate")
    return [s for s, _ in kept], [p for _, p in kept]


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


class _Payloads:
    """Result objects of one model on one study, written once per encoding a destination needs.

    The canonical file (Explicit VR Little Endian; the SR as Comprehensive 3D SR) lies at
    ``results/<study>/<series>/<sop>.dcm``; other encodings next to it with a suffix.
    """

    def __init__(self, results: Spool, study_uid: str) -> None:
        self._results = results
        self._study_uid = study_uid
        self._objects: dict[str, Dataset] = {}
        self._written: dict[tuple[str, bool, str], tuple[str, Path]] = {}

    def add(self, kind: str, ds: Dataset) -> None:
        self._objects[kind] = ds
        self.variant(kind, ExplicitVRLittleEndian)

    def variant(
        self, kind: str, syntax: str, *, comprehensive_sr: bool = False
    ) -> tuple[str, Path] | None:
        """Return ``(sop_instance_uid, path)`` of an encoding, writing it on first use.

        ``comprehensive_sr`` asks for the SR as Comprehensive SR instead of Comprehensive 3D SR.
        """
        base = self._objects.get(kind)
        if base is None:
            return None
        if kind == "SR" and syntax != ImplicitVRLittleEndian:
            syntax = ExplicitVRLittleEndian  # an SR has no pixels to compress
        comprehensive_sr = comprehensive_sr and kind == "SR"
        cache_key = (kind, comprehensive_sr, syntax)
        if cache_key in self._written:
            return self._written[cache_key]
        ds = as_comprehensive_sr(base) if comprehensive_sr else base
        encoded = ds if syntax == ExplicitVRLittleEndian else encode_in(ds, syntax)
        series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        path = self._results.path_for(self._study_uid, series_uid, sop_uid)
        if syntax != ExplicitVRLittleEndian:
            path = path.with_name(f"{sop_uid}.{UID(syntax).keyword or syntax}.dcm")
        self._results.write(encoded, encoded.file_meta, path)
        self._written[cache_key] = (sop_uid, path)
        return self._written[cache_key]


def _explain(loaded: LoadedModel, pixels: npt.NDArray[Any], meta: PixelMeta) -> npt.NDArray[Any]:
    """Return the model's Grad-CAM heatmap of one image (``Classifier.explain``)."""
    (explanation,) = loaded.classifier.explain([(pixels, meta)])
    return np.asarray(explanation.heatmap, dtype=np.float32)


def _display(image: DecodedImage, meta: PixelMeta, loaded: LoadedModel) -> npt.NDArray[np.uint8]:
    """Return the image as a viewer shows it (:func:`model.preprocess.to_display`)."""
    return np.asarray(
        to_display(image.pixels, meta, loaded.bundle.card.preprocess_spec), dtype=np.uint8
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
        self._rules = settings.selection.to_rules()

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
            selection = select_images([h.header for h in headers], loaded.modalities, self._rules)
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
        problems: dict[str, str] = {}
        for loaded, chosen in plan:
            rejected: dict[str, str] = {}
            with contextlib.suppress(NotApplicableImages):
                records.append(
                    self._classify(
                        claim, loaded, chosen, decoded, decode_ms, t_start, problems, rejected
                    )
                )
            if rejected:
                reasons[loaded.bundle.card.name]["not_applicable"] = rejected
        if not records:
            log.info(
                "study not applicable: the applicability gate refused every image",
                extra={"study_instance_uid": claim.study_instance_uid},
            )
            finish_not_applicable(self._sessions, claim, reasons)
            return
        if problems:
            reasons["output_problems"] = problems
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
        problems: dict[str, str],
        rejected: dict[str, str],
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
        chosen, predictions = keep_applicable(chosen, predictions, rejected)
        infer_ms = (time.perf_counter() - t0) * 1000
        per_image = {
            s.header.sop_instance_uid: float(p.probability)
            for s, p in zip(chosen, predictions, strict=True)
        }
        probability = aggregate_study(list(per_image.values()), card.aggregation)
        positive = probability >= card.threshold

        t_sr = time.perf_counter()
        sources: list[Dataset] = [
            read_dataset(Path(s.instance.path), with_pixels=False) for s in chosen
        ]
        finding = FindingResult(
            code_value=card.finding.value,
            code_scheme=card.finding.scheme,
            code_meaning=card.finding.meaning,
            probability=probability,
            present=positive,
        )
        algorithm = AlgorithmInfo(
            name=card.name,
            version=card.version,
            manufacturer=card.manufacturer,
            weights_sha256=identity.weights_sha256,
            threshold=card.threshold,
        )
        try:
            sr = self._build_sr(claim, sources, finding, algorithm)
        except ValueError as exc:
            raise PermanentProcessingError(f"cannot build the SR: {exc}") from exc
        series_uid, sop_uid = str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)
        payloads = _Payloads(self._results, claim.study_instance_uid)
        payloads.add("SR", sr)
        sr_ms = (time.perf_counter() - t_sr) * 1000

        t_sc = time.perf_counter()
        if any("SC" in d.outputs for d in self._settings.destinations):
            key = max(chosen, key=lambda sel: per_image[sel.header.sop_instance_uid])
            try:
                payloads.add(
                    "SC",
                    self._build_sc(claim, loaded, key, decoded, sources, finding, algorithm),
                )
            except Exception as exc:  # noqa: BLE001 - the SR still goes out; reason audited
                log.warning(
                    "heatmap picture not built; the SR is still delivered",
                    extra={"study_instance_uid": claim.study_instance_uid, "error": str(exc)},
                )
                problems[f"{card.name}:SC"] = f"{type(exc).__name__}: {exc}"
        sc_ms = (time.perf_counter() - t_sc) * 1000

        outputs = self._outputs(claim, payloads, card.name, problems)
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
                "sc": round(sc_ms, 1),
                "total": round((time.perf_counter() - t_start) * 1000, 1),
            },
            device=str(loaded.device),
            sr_series_instance_uid=series_uid,
            sr_sop_instance_uid=sop_uid,
            outputs=outputs,
        )

    def _outputs(
        self,
        claim: ClaimedStudy,
        payloads: _Payloads,
        model_name: str,
        problems: dict[str, str],
    ) -> tuple[OutputRecord, ...]:
        """One outbox entry per destination and output kind (PS3.4 B: one C-STORE each)."""
        records: list[OutputRecord] = []
        sender: tuple[str | None, str | None] | None = None
        for dest in self._settings.destinations:
            ae_title, host = dest.ae_title, dest.host
            if dest.to_sender:
                if sender is None:
                    sender = study_sender(self._sessions, claim.study_id)
                ae_title = ae_title or (sender[0] or claim.calling_ae or "")
                host = host or (sender[1] or "")
                if not ae_title or not host:
                    problems[f"{model_name}:{dest.name}"] = (
                        "sender AE title or address unknown; nothing queued for this destination"
                    )
                    continue
            syntax = TRANSFER_SYNTAXES[dest.transfer_syntax]
            comprehensive_sr = dest.sr_sop_class == "comprehensive"
            for kind in dest.outputs:
                payload = payloads.variant(kind, syntax, comprehensive_sr=comprehensive_sr)
                if payload is None:
                    continue  # SC not built: the reason is in ``problems`` (audited)
                sop_uid, path = payload
                records.append(
                    OutputRecord(
                        destination=dest.name,
                        ae_title=ae_title,
                        host=host,
                        port=dest.port,
                        kind=kind,
                        sop_instance_uid=sop_uid,
                        payload_path=str(path),
                    )
                )
        return tuple(records)

    def _build_sr(
        self,
        claim: ClaimedStudy,
        sources: list[Dataset],
        finding: FindingResult,
        algorithm: AlgorithmInfo,
    ) -> Dataset:
        series_uid, sop_uid = result_uids(
            claim.study_instance_uid, algorithm.name, algorithm.version, "SR"
        )
        return build_sr(
            sources,
            finding,
            algorithm,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
        )

    def _build_sc(
        self,
        claim: ClaimedStudy,
        loaded: LoadedModel,
        key: _Selected,
        decoded: dict[str, DecodedImage],
        sources: list[Dataset],
        finding: FindingResult,
        algorithm: AlgorithmInfo,
    ) -> Dataset:
        """Build the heatmap picture of the study's key image (the one with the top probability)."""
        image = decoded[key.header.sop_instance_uid]
        meta = to_pixel_meta(image)
        heatmap = _explain(loaded, image.pixels, meta)
        display = _display(image, meta, loaded)
        source = next(ds for ds in sources if str(ds.SOPInstanceUID) == key.header.sop_instance_uid)
        series_uid, sop_uid = result_uids(
            claim.study_instance_uid, algorithm.name, algorithm.version, "SC"
        )
        return build_heatmap_sc(
            source,
            display,
            heatmap,
            finding,
            algorithm,
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
