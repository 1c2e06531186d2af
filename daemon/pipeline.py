"""Processing one claimed study: wire the stages of :mod:`daemon.stages` and record the outcome.

Several studies are processed at once (one thread each, ``worker.studies_in_flight``); they
share the prepare pool and the models' micro-batchers, so a batch holds images of several
studies. Errors split in two (ARCHITECTURE principle 8, :mod:`daemon.stages.reading`):
**permanent** ones fail the study once (an unreadable instance is quarantined first), logged
as one warning line without traceback; **transient** ones are retried by the queue with
backoff up to ``worker.max_attempts``. Anything else is unexpected: logged with its traceback
and retried, then FAILED. Acknowledged instances that can no longer be read fail the study
rather than letting it be classified without them (a result silently based on part of a
study would be worse than none).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from daemon.models import LoadedModel
from daemon.settings import Settings
from daemon.stages.finish import Finisher, ModelOutcome, StudyClock
from daemon.stages.infer import start_runners
from daemon.stages.inputs import model_input, model_pixels, to_pixel_meta
from daemon.stages.plan import StudyPlan, own_identity, plan_study, refuse_purged_study
from daemon.stages.prepare import PreparedImage, Preparer
from daemon.stages.reading import (
    TRANSIENT_ERRORS,
    PermanentProcessingError,
    UnreadableInstance,
)
from daemon.stages.verdict import ModelVerdict, gate_key, judge
from db.queue import ClaimedStudy, LeaseLost, finish_failed, finish_not_applicable, retry_later
from db.results import record_classification
from dicom_io.spool import Spool
from model.batcher import BatcherConfig
from model.infer import ImagePrediction

__all__ = [
    "TRANSIENT_ERRORS",
    "PermanentProcessingError",
    "StudyProcessor",
    "UnreadableInstance",
    "model_input",
    "model_pixels",
    "own_identity",
    "to_pixel_meta",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classified:
    """The classify stage's hand-off: predictions per model (selection order) and more."""

    predictions: dict[str, list[ImagePrediction]]
    kept: dict[str, PreparedImage]
    grayscale_notes: dict[str, list[str]]
    decode_ms: float
    infer_ms: float


class StudyProcessor:
    """Runs the models on claimed studies and records what happened (thread-safe).

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
        worker = settings.worker
        self._settings = settings
        self._sessions = sessions
        self._spool = spool
        self._models = models
        self._rules = settings.selection.to_rules()
        self._own = own_identity(models)
        config = BatcherConfig(
            max_batch=worker.batch_size,
            max_latency_s=worker.batch_latency_ms / 1000,
            max_pending=worker.max_pending_images,
        )
        wants_sc = any("SC" in d.outputs for d in settings.destinations)
        self.runners = start_runners(models, config, with_cams=wants_sc)
        self.preparer = Preparer(worker.prepare_threads, worker.prepare_processes)
        self._finisher = Finisher(settings, sessions, results, self.runners)

    def close(self) -> None:
        """Stop the batchers and the prepare pool (after the studies in flight)."""
        for runner in self.runners.values():
            runner.stop()
        self.preparer.close()

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
            self._retry(claim, exc)
        except Exception as exc:
            log.exception("unexpected processing error; will retry", extra=extra)
            self._retry(claim, exc)

    def _retry(self, claim: ClaimedStudy, exc: BaseException) -> None:
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
        plan = plan_study(claim, self._models, self._rules, self._own)
        if not plan.models:
            self._not_applicable(claim, plan.reasons, "no model applies to any image")
            return
        classified = self.classify(plan)
        reasons = dict(plan.reasons)
        if classified.grayscale_notes:
            reasons["grayscale_ignored"] = classified.grayscale_notes
        verdicts = self._verdicts(plan, classified, reasons)
        if not verdicts:
            self._not_applicable(claim, reasons, "the applicability gate refused every image")
            return
        clock = StudyClock(t_start, classified.decode_ms)
        outcomes = [self._finisher.finish(claim, v, classified.kept, clock) for v in verdicts]
        self._record(claim, outcomes, reasons)

    def classify(self, plan: StudyPlan) -> Classified:
        """Prepare the plan's images (bounded pool) and classify them (shared batchers).

        Each image's inputs go to the batchers as soon as they exist; its decoded pixels
        are dropped then, except for a one-image study whose heatmap picture needs them.
        """
        images = plan.images()
        keep = len(images) == 1 and self._finisher.wants_picture()
        jobs = [(sel, plan.models_of(sel.uid)) for sel in images]
        futures: dict[str, dict[str, Future[ImagePrediction]]] = defaultdict(dict)
        kept: dict[str, PreparedImage] = {}
        notes: dict[str, list[str]] = {}
        t0 = time.perf_counter()
        for prepared in self.preparer.stream(jobs, keep):
            uid = prepared.selected.uid
            for name, tensor in prepared.inputs.items():
                futures[name][uid] = self.runners[name].classify.submit(tensor)
            if prepared.grayscale_notes:
                notes[uid] = list(prepared.grayscale_notes)
            if prepared.decoded is not None:
                kept[uid] = prepared
        t1 = time.perf_counter()
        predictions = {
            mp.loaded.bundle.card.name: [
                futures[mp.loaded.bundle.card.name][s.uid].result() for s in mp.chosen
            ]
            for mp in plan.models
        }
        infer_ms = (time.perf_counter() - t1) * 1000  # the wait once every input is queued
        return Classified(predictions, kept, notes, (t1 - t0) * 1000, infer_ms)

    def _verdicts(
        self, plan: StudyPlan, classified: Classified, reasons: dict[str, Any]
    ) -> list[ModelVerdict]:
        """Judge each model's predictions; the gate's verdicts go into ``reasons``."""
        gate = self._settings.models.applicability_gate
        verdicts: list[ModelVerdict] = []
        for mp in plan.models:
            name = mp.loaded.bundle.card.name
            verdict, rejected = judge(mp, classified.predictions[name], gate, classified.infer_ms)
            if rejected:
                reasons[name] = {**reasons[name], gate_key(gate): rejected}
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    def _record(
        self, claim: ClaimedStudy, outcomes: list[ModelOutcome], reasons: dict[str, Any]
    ) -> None:
        """Store the results and queue the outbox in one transaction; log the outcome."""
        problems = {k: v for o in outcomes for k, v in o.problems.items()}
        repairs = {k: v for o in outcomes for k, v in o.repairs.items()}
        if problems:
            reasons["output_problems"] = problems
        if repairs:
            reasons["header_repairs"] = repairs
        records = [o.record for o in outcomes]
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
