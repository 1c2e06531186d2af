"""Processing one claimed study: select, decode, classify, write the SR, record the outcome.

This is the worker's unit of work (see the data flow in ``ARCHITECTURE.md``). Errors split in
two (ARCHITECTURE principle 8):

- **permanent** -- the content itself prevents a result, retrying cannot help: an instance
  whose header cannot be parsed or whose pixel data cannot be decoded
  (:class:`~dicom_io.reader.DecodeError`; the file is quarantined with the reader's reason
  and the study FAILED, naming the instance), a spool file that is gone, a header value
  radflag cannot interpret (:class:`PermanentProcessingError`, naming the attribute), a
  study with nothing to classify (NOT_APPLICABLE with the selection reasons). Logged as one
  warning line, never a traceback, and never retried.
- **transient** -- I/O errors other than a missing file, database errors: retried by the
  queue with backoff up to ``worker.max_attempts``, logged as one line.

Anything else is unexpected (a programming error or an unknown library failure): logged with
its traceback and retried up to ``worker.max_attempts``, then FAILED.

Acknowledged instances that can no longer be read are handled like undecodable ones: the
study fails once, with the instance quarantined, rather than being classified without it
(a result silently based on part of a study would be worse than none).
Header values that are invalid but not needed for classification (dates, names, ages...)
never fail a study: they are repaired in the SR/SC copy (:mod:`dicom_io.headers`) and the
repairs are listed under ``header_repairs`` in the audit detail of the classification.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy.exc import SQLAlchemyError
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
from db.results import (
    OutputRecord,
    PriorRevision,
    ResultRecord,
    prior_revision,
    record_classification,
    study_sender,
)
from db.retention import purged_instances
from dicom_io.headers import repair_sources
from dicom_io.kos import build_rejection_note
from dicom_io.reader import (
    DecodedImage,
    DecodeError,
    ImageHeader,
    read_dataset,
    read_header,
    read_image,
)
from dicom_io.revisions import (
    ObjectRef,
    ResultContent,
    add_algorithm_equipment,
    content_result_uids,
    set_predecessor,
    set_revision_number,
)
from dicom_io.sc import build_heatmap_sc, encode_in
from dicom_io.select import OwnIdentity, select_images
from dicom_io.spool import Spool
from dicom_io.sr import (
    AlgorithmInfo,
    FindingResult,
    SRStorageClass,
    as_comprehensive_sr,
    build_sr,
    device_observer_uid,
    model_identity,
)
from model.infer import ImagePrediction, aggregate_study
from model.pixels import PixelMeta
from model.preprocess import to_display

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class PermanentProcessingError(Exception):
    """The study's content itself prevents a result; retrying cannot help."""


class UnreadableInstance(PermanentProcessingError):
    """An acknowledged instance cannot be read or decoded any more (quarantined, FAILED).

    Parameters
    ----------
    instance
        The claimed instance.
    reason
        The reader's or decoder's reason.
    what
        ``header``, ``pixel data`` or ``file``: what could not be read.
    """

    def __init__(self, instance: ClaimedInstance, reason: str, what: str) -> None:
        super().__init__(f"cannot read the {what} of {instance.sop_instance_uid}: {reason}")
        self.instance = instance
        self.reason = reason
        self.what = what


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, SQLAlchemyError)
"""Failures that may heal (I/O, database): the study is retried later."""


def _agent_info(loaded: LoadedModel) -> AlgorithmInfo:
    """Return the identity of a loaded model as written into its results."""
    card, identity = loaded.bundle.card, loaded.bundle.identity
    return AlgorithmInfo(
        name=card.name,
        version=card.version,
        manufacturer=card.manufacturer,
        weights_sha256=identity.weights_sha256,
        threshold=card.threshold,
    )


def own_identity(models: list[LoadedModel]) -> OwnIdentity:
    """Return radflag's identity in the results of ``models`` (the loop guard's input)."""
    infos = [_agent_info(m) for m in models]
    return OwnIdentity(
        manufacturers=frozenset(i.manufacturer for i in infos),
        model_names=frozenset(i.name[:64] for i in infos),
        device_observer_uids=frozenset(device_observer_uid(i) for i in infos),
    )


def _read_spooled(inst: ClaimedInstance, what: str, read: Callable[[Path], _T]) -> _T:
    """Read a spooled instance; a parse failure or a vanished file is permanent."""
    try:
        return read(Path(inst.path))
    except DecodeError as exc:
        raise UnreadableInstance(inst, exc.reason, what) from exc
    except FileNotFoundError as exc:
        raise UnreadableInstance(inst, "the spooled file is missing", "file") from exc


def _read_header(inst: ClaimedInstance) -> ImageHeader:
    return _read_spooled(inst, "header", read_header)


def _decode(inst: ClaimedInstance) -> DecodedImage:
    """Decode one selected image; decoder failures are permanent, other I/O is transient."""
    return _read_spooled(inst, "pixel data", read_image)


def _read_source(inst: ClaimedInstance) -> Dataset:
    return _read_spooled(inst, "header", lambda path: read_dataset(path, with_pixels=False))


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
    """Map the DICOM reader's pixel description onto the model's (the model never sees pydicom).

    The grey levels come from :mod:`dicom_io.grayscale` (:func:`model_pixels`): P-values with
    an identity LINEAR_EXACT window when a VOI transform was applied, else modality values
    with their polarity and no window (the model's percentile range applies).
    """
    grey = image.presentation
    if grey is None:
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
    window = grey.window
    return PixelMeta(
        photometric=grey.photometric,
        window_center=None if window is None else window[0],
        window_width=None if window is None else window[1],
        voi_lut_function="LINEAR" if window is None else window[2],
        bits_stored=image.bits_stored,
        pixel_spacing_mm=image.pixel_spacing_mm,
    )


def model_pixels(image: DecodedImage) -> npt.NDArray[Any]:
    """Return the grey levels a viewer shows (P-values after the VOI step, PS3.4 N.2)."""
    return image.pixels if image.presentation is None else image.presentation.values


def model_input(image: DecodedImage) -> tuple[npt.NDArray[Any], PixelMeta]:
    """Return what the classifier (and its Grad-CAM) reads: the one serving input path.

    The grayscale pipeline of :mod:`dicom_io.grayscale` up to the Modality LUT and polarity,
    with the header's VOI window passed on in :class:`model.pixels.PixelMeta`: a bundle
    whose ``intensity`` is ``image_range`` ignores it (its range comes from the image, as
    for its training JPEGs), a legacy ``voi`` bundle applies it. Training, evaluation
    (``daemon.renditions``) and the daemon all read DICOM through this function.
    """
    grey = image.presentation
    before_voi = None if grey is None else (grey.unwindowed or grey)
    if before_voi is None or before_voi.voi_applied:
        return image.pixels, to_pixel_meta(image)
    meta = PixelMeta(
        photometric=before_voi.photometric,
        window_center=image.window_center,
        window_width=image.window_width,
        voi_lut_function=image.voi_lut_function,
        bits_stored=image.bits_stored,
        pixel_spacing_mm=image.pixel_spacing_mm,
    )
    return before_voi.values, meta


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
        to_display(model_pixels(image), meta, loaded.bundle.card.preprocess_spec), dtype=np.uint8
    )


def result_content(
    per_image: dict[str, float], finding: FindingResult, threshold: float
) -> ResultContent:
    """Return what a result states: its source images and values (names its UIDs)."""
    return ResultContent(
        frozenset(per_image),
        {
            "finding": f"{finding.code_scheme}:{finding.code_value}",
            "probability": float(finding.probability),
            "present": bool(finding.present),
            "threshold": float(threshold),
        },
    )


@dataclass(frozen=True)
class Revision:
    """Where a newly computed result stands among the study's earlier results of its model."""

    number: int
    predecessor: ObjectRef | None
    """The SR the new SR replaces (its Predecessor Documents Sequence, PS3.3 C.17.2)."""
    replaces: PriorRevision | None
    """The earlier revision this one supersedes; None when new or unchanged."""


def next_revision(prior: PriorRevision | None, study_uid: str, sr_sop_uid: str) -> Revision:
    """Return the new result's revision: unchanged content keeps the prior one, else + 1."""
    if prior is None or not prior.sr_sop_instance_uid or not prior.sr_series_instance_uid:
        return Revision(1, None, None)
    if prior.sr_sop_instance_uid == sr_sop_uid:  # same content, same object
        earlier = None
        if prior.predecessor_sop_instance_uid and prior.predecessor_series_instance_uid:
            earlier = ObjectRef(
                study_uid,
                prior.predecessor_series_instance_uid,
                SRStorageClass.COMPREHENSIVE_3D.value,
                prior.predecessor_sop_instance_uid,
            )
        return Revision(prior.revision, earlier, None)
    predecessor = ObjectRef(
        study_uid,
        prior.sr_series_instance_uid,
        SRStorageClass.COMPREHENSIVE_3D.value,
        prior.sr_sop_instance_uid,
    )
    return Revision(prior.revision + 1, predecessor, prior)


def mark_revision(ds: Dataset, algorithm: AlgorithmInfo, revision: Revision) -> None:
    """Add the algorithm's Contributing Equipment, the revision number and (SR) predecessor."""
    add_algorithm_equipment(ds, model_identity(algorithm), algorithm.manufacturer)
    set_revision_number(ds, revision.number)
    if revision.predecessor is not None and "ContentSequence" in ds:
        set_predecessor(ds, revision.predecessor)


def refuse_purged_study(sessions: sessionmaker[Session], claim: ClaimedStudy) -> None:
    """Refuse a study whose images retention already purged (re-opened by a late image).

    Classifying what is left would report on a subset of the study as if it were all of it.

    Raises
    ------
    PermanentProcessingError
        Naming how many of the study's images are gone.
    """
    purged = purged_instances(sessions, claim.study_id)
    if purged:
        raise PermanentProcessingError(
            f"study re-opened after retention purged {len(purged)} of its "
            f"{len(claim.instances)} images; not re-classified from the remaining subset"
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
        self._own = own_identity(models)

    def process(self, claim: ClaimedStudy) -> None:
        """Process ``claim`` to a recorded outcome; never raises except on programming errors."""
        extra = {"study_instance_uid": claim.study_instance_uid, "attempt": claim.attempt}
        try:
            self._process(claim)
        except LeaseLost as exc:
            log.warning("result discarded: study changed while processing (%s)", exc, extra=extra)
        except UnreadableInstance as exc:
            with contextlib.suppress(LeaseLost):
                self._fail_unreadable(claim, exc)
        except PermanentProcessingError as exc:
            log.warning("study failed: %s", exc, extra=extra)
            with contextlib.suppress(LeaseLost):
                finish_failed(self._sessions, claim, str(exc))
        except TRANSIENT_ERRORS as exc:
            log.warning(
                "transient failure; will retry: %s: %s", type(exc).__name__, exc, extra=extra
            )
            with contextlib.suppress(LeaseLost):
                retry_later(
                    self._sessions,
                    claim,
                    f"{type(exc).__name__}: {exc}",
                    max_attempts=self._settings.worker.max_attempts,
                )
        except Exception as exc:
            log.exception("unexpected processing error; will retry", extra=extra)
            with contextlib.suppress(LeaseLost):
                retry_later(
                    self._sessions,
                    claim,
                    f"{type(exc).__name__}: {exc}",
                    max_attempts=self._settings.worker.max_attempts,
                )

    def _process(self, claim: ClaimedStudy) -> None:
        t_start = time.perf_counter()
        refuse_purged_study(self._sessions, claim)
        headers = [_Selected(inst, _read_header(inst)) for inst in claim.instances]

        by_uid = {h.header.sop_instance_uid: h for h in headers}
        plan: list[tuple[LoadedModel, list[_Selected]]] = []
        reasons: dict[str, Any] = {}
        for loaded in self._models:
            selection = select_images(
                [h.header for h in headers], loaded.modalities, self._rules, self._own
            )
            chosen = [by_uid[h.sop_instance_uid] for h in selection.selected]
            reasons[loaded.bundle.card.name] = {
                "selected": [h.header.sop_instance_uid for h in chosen],
                "excluded": {hdr.sop_instance_uid: why for hdr, why in selection.excluded},
            }
            if chosen:
                plan.append((loaded, chosen))
        if not plan:
            self._not_applicable(claim, reasons, "no model applies to any image")
            return

        decoded: dict[str, DecodedImage] = {}
        t_decode = time.perf_counter()
        for _, chosen in plan:
            for sel in chosen:
                uid = sel.header.sop_instance_uid
                if uid not in decoded:
                    decoded[uid] = _decode(sel.instance)
        decode_ms = (time.perf_counter() - t_decode) * 1000
        ignored = _grayscale_notes(decoded)
        if ignored:
            reasons["grayscale_ignored"] = ignored

        records: list[ResultRecord] = []
        problems: dict[str, str] = {}
        repairs: dict[str, list[str]] = {}
        for loaded, chosen in plan:
            rejected: dict[str, str] = {}
            with contextlib.suppress(NotApplicableImages):
                records.append(
                    self._classify(
                        claim,
                        loaded,
                        chosen,
                        decoded,
                        (decode_ms, t_start),
                        problems,
                        repairs,
                        rejected,
                    )
                )
            if rejected:
                gate = self._settings.models.applicability_gate
                key = "not_applicable" if gate else "applicability_gate_ignored"
                reasons[loaded.bundle.card.name][key] = rejected
        if not records:
            self._not_applicable(claim, reasons, "the applicability gate refused every image")
            return
        if problems:
            reasons["output_problems"] = problems
        if repairs:
            reasons["header_repairs"] = repairs
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
        timing: tuple[float, float],
        problems: dict[str, str],
        repairs: dict[str, list[str]],
        rejected: dict[str, str],
    ) -> ResultRecord:
        decode_ms, t_start = timing
        card = loaded.bundle.card
        identity = loaded.bundle.identity
        t0 = time.perf_counter()
        items = [_model_input(s, decoded) for s in chosen]
        predictions = loaded.classifier.classify(items)
        if self._settings.models.applicability_gate:
            chosen, predictions = keep_applicable(chosen, predictions, rejected)
        else:  # classified all the same; the gate's verdict is only audited
            rejected.update(
                (s.header.sop_instance_uid, p.not_applicable)
                for s, p in zip(chosen, predictions, strict=True)
                if p.not_applicable is not None
            )
        infer_ms = (time.perf_counter() - t0) * 1000
        per_image = {
            s.header.sop_instance_uid: float(p.probability)
            for s, p in zip(chosen, predictions, strict=True)
        }
        probability = aggregate_study(list(per_image.values()), card.aggregation)
        positive = probability >= card.threshold

        t_sr = time.perf_counter()
        sources, repaired = repair_sources(_read_source(s.instance) for s in chosen)
        repairs.update(repaired)
        finding = FindingResult(
            code_value=card.finding.value,
            code_scheme=card.finding.scheme,
            code_meaning=card.finding.meaning,
            probability=probability,
            present=positive,
        )
        algorithm = _agent_info(loaded)
        content = result_content(per_image, finding, card.threshold)
        prior = prior_revision(self._sessions, claim.study_id, identity.name)
        try:
            sr = self._build_sr(claim, sources, finding, algorithm, content)
        except ValueError as exc:
            raise PermanentProcessingError(f"cannot build the SR: {exc}") from exc
        series_uid, sop_uid = str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID)
        revision = next_revision(prior, claim.study_instance_uid, sop_uid)
        mark_revision(sr, algorithm, revision)
        payloads = _Payloads(self._results, claim.study_instance_uid)
        payloads.add("SR", sr)
        sr_ms = (time.perf_counter() - t_sr) * 1000

        t_sc = time.perf_counter()
        if any("SC" in d.outputs for d in self._settings.destinations):
            key = max(chosen, key=lambda sel: per_image[sel.header.sop_instance_uid])
            try:
                sc = self._build_sc(
                    claim, loaded, key, decoded, sources, finding, algorithm, content
                )
                mark_revision(sc, algorithm, revision)
                payloads.add("SC", sc)
            except Exception as exc:  # noqa: BLE001 - the SR still goes out; reason audited
                log.warning(
                    "heatmap picture not built; the SR is still delivered",
                    extra={"study_instance_uid": claim.study_instance_uid, "error": str(exc)},
                )
                problems[f"{card.name}:SC"] = f"{type(exc).__name__}: {exc}"
        sc_ms = (time.perf_counter() - t_sc) * 1000

        outputs = self._outputs(claim, payloads, card.name, problems)
        if revision.replaces is not None:
            outputs += self._rejection_notes(claim, algorithm, revision.replaces, problems)
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
            revision=revision.number,
            content_key=content.key(),
            predecessor_sop_instance_uid=(
                None if revision.predecessor is None else revision.predecessor.sop_instance_uid
            ),
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
                        payload_path=self._results.relative(path),
                    )
                )
        return tuple(records)

    def _build_sr(
        self,
        claim: ClaimedStudy,
        sources: list[Dataset],
        finding: FindingResult,
        algorithm: AlgorithmInfo,
        content: ResultContent,
    ) -> Dataset:
        series_uid, sop_uid = content_result_uids(
            claim.study_instance_uid, model_identity(algorithm), "SR", content
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
        content: ResultContent,
    ) -> Dataset:
        """Build the heatmap picture of the study's key image (the one with the top probability)."""
        image = decoded[key.header.sop_instance_uid]
        meta = to_pixel_meta(image)
        heatmap = _explain(loaded, *model_input(image))
        display = _display(image, meta, loaded)
        source = next(ds for ds in sources if str(ds.SOPInstanceUID) == key.header.sop_instance_uid)
        series_uid, sop_uid = content_result_uids(
            claim.study_instance_uid, model_identity(algorithm), "SC", content
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

    def _rejection_notes(
        self,
        claim: ClaimedStudy,
        algorithm: AlgorithmInfo,
        replaced: PriorRevision,
        problems: dict[str, str],
    ) -> tuple[OutputRecord, ...]:
        """IOCM rejection notes (KOS) for destinations with ``supersede = "iocm_reject"``.

        Each such destination gets one note rejecting the objects of the replaced revision it
        received (IHE RAD TF-3 4.66); the note's UIDs derive from the rejected instances.
        """
        records: list[OutputRecord] = []
        for dest in self._settings.destinations:
            sent = replaced.sent.get(dest.name, [])
            if dest.supersede != "iocm_reject" or not sent:
                continue
            try:
                rejected = [
                    read_dataset(self._results.resolve(o.payload_path), with_pixels=False)
                    for o in sent
                ]
                kos = build_rejection_note(
                    rejected, model_identity(algorithm), algorithm.manufacturer
                )
                path = self._results.path_for(
                    claim.study_instance_uid, str(kos.SeriesInstanceUID), str(kos.SOPInstanceUID)
                )
                self._results.write(kos, kos.file_meta, path)
            except Exception as exc:  # noqa: BLE001 - e.g. purged by retention; reason audited
                problems[f"{algorithm.name}:{dest.name}:KOS"] = f"{type(exc).__name__}: {exc}"
                continue
            records.append(
                OutputRecord(
                    destination=dest.name,
                    ae_title=sent[0].ae_title,
                    host=sent[0].host,
                    port=sent[0].port,
                    kind="KOS",
                    sop_instance_uid=str(kos.SOPInstanceUID),
                    payload_path=self._results.relative(path),
                )
            )
        return tuple(records)

    def _not_applicable(self, claim: ClaimedStudy, reasons: dict[str, Any], why: str) -> None:
        log.info(
            "study not applicable: %s",
            why,
            extra={"study_instance_uid": claim.study_instance_uid},
        )
        finish_not_applicable(self._sessions, claim, reasons)

    def _fail_unreadable(self, claim: ClaimedStudy, exc: UnreadableInstance) -> None:
        """Quarantine the instance's file (when it still exists) and fail the study once."""
        path = Path(exc.instance.path)
        quarantined: dict[int, str] = {}
        if path.exists():
            try:
                moved = self._spool.quarantine(path, exc.reason)
                quarantined[exc.instance.instance_id] = self._spool.relative(moved)
            except OSError as error:  # keep the file where it is, still fail
                log.error("could not quarantine an unreadable file: %s", error)
        log.warning(
            "%s cannot be read; study failed",
            exc.what,
            extra={"study_instance_uid": claim.study_instance_uid, "reason": exc.reason},
        )
        finish_failed(
            self._sessions,
            claim,
            str(exc),
            quarantined=quarantined,
            detail={
                "sop_instance_uid": exc.instance.sop_instance_uid,
                "unreadable": exc.what,
                "reason": exc.reason,
                "quarantine_path": next(iter(quarantined.values()), None),
            },
        )


def _grayscale_notes(decoded: dict[str, DecodedImage]) -> dict[str, list[str]]:
    """Return, per instance, the grayscale attributes ignored as unusable (for the audit)."""
    return {
        uid: list(image.presentation.notes)
        for uid, image in decoded.items()
        if image.presentation is not None and image.presentation.notes
    }


def _model_input(
    sel: _Selected, decoded: dict[str, DecodedImage]
) -> tuple[npt.NDArray[Any], PixelMeta]:
    """Return the model's input of one image; a value it cannot take is a permanent error."""
    try:
        return model_input(decoded[sel.header.sop_instance_uid])
    except ValueError as exc:
        raise PermanentProcessingError(
            f"{sel.header.sop_instance_uid}: unsupported image attributes: {exc}"
        ) from exc
