"""Finish stage: a model's verdict -> SR (and heatmap SC) written -> outbox entries -> record.

Header values that are invalid but not needed for classification are repaired in the SR/SC
copy (:mod:`dicom_io.headers`); the repairs are returned for the audit (``header_repairs``).
An SC that cannot be built is a problem audited under ``output_problems``; the SR still goes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import Settings
from daemon.stages.heatmap import heatmap_picture, key_image
from daemon.stages.infer import ModelRunner
from daemon.stages.outputs import OutputPlanner, Queued
from daemon.stages.payloads import Payloads
from daemon.stages.plan import agent_info
from daemon.stages.prepare import PreparedImage, model_key
from daemon.stages.reading import PermanentProcessingError, source_of
from daemon.stages.revisions import Revision, mark_revision, next_revision, result_content
from daemon.stages.verdict import ModelVerdict
from db.queue import ClaimedStudy
from db.results import ResultRecord, prior_revision
from dicom_io.headers import repair_sources
from dicom_io.revisions import ResultContent, content_result_uids
from dicom_io.sc import build_heatmap_sc
from dicom_io.spool import Spool
from dicom_io.sr import AlgorithmInfo, build_sr, model_identity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyClock:
    """When the study's processing started and how long its images took to prepare."""

    t_start: float
    decode_ms: float


@dataclass(frozen=True)
class ResultBasis:
    """What a model's result objects are built from."""

    claim: ClaimedStudy
    verdict: ModelVerdict
    sources: list[Dataset]
    algorithm: AlgorithmInfo
    content: ResultContent
    revision: Revision
    sr_uids: tuple[str, str]
    """(Series Instance UID, SOP Instance UID) of the SR."""


@dataclass(frozen=True)
class ModelOutcome:
    """A model's recorded result and what the audit says about it."""

    record: ResultRecord
    problems: dict[str, str] = field(default_factory=dict)
    repairs: dict[str, list[str]] = field(default_factory=dict)


class Finisher:
    """Builds, writes and lists for the outbox the result objects of a verdict.

    Parameters
    ----------
    settings, sessions, results
        Destinations and heatmap setting; database; results spool.
    runners
        The models' batchers (the heatmap one is used here).
    """

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        results: Spool,
        runners: Mapping[str, ModelRunner],
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self._results = results
        self._runners = runners
        self._planner = OutputPlanner(settings, sessions, results)
        self._wants_sc = any("SC" in d.outputs for d in settings.destinations)

    def wants_picture(self, positive: bool | None = None) -> bool:
        """Whether a heatmap SC is built (for a study of that outcome, when given)."""
        if not self._wants_sc:
            return False
        return self._settings.worker.heatmaps == "all" or positive is not False

    def finish(
        self,
        claim: ClaimedStudy,
        verdict: ModelVerdict,
        kept: Mapping[str, PreparedImage],
        clock: StudyClock,
    ) -> ModelOutcome:
        """Build and write the SR (and SC), plan the outbox; return the record to store."""
        t_sr = time.perf_counter()
        basis, payloads, repairs = self._sr(claim, verdict)
        sr_ms = (time.perf_counter() - t_sr) * 1000
        t_sc = time.perf_counter()
        problems: dict[str, str] = {}
        if self.wants_picture(verdict.positive):
            problems.update(self._sc(basis, kept, payloads))
        sc_ms = (time.perf_counter() - t_sc) * 1000
        name = verdict.loaded.bundle.card.name
        queued = self._planner.outputs(claim, payloads, name)
        if basis.revision.replaces is not None:
            notes = self._planner.rejection_notes(claim, basis.algorithm, basis.revision.replaces)
            queued = Queued(queued.records + notes.records, {**queued.problems, **notes.problems})
        timings = {
            "decode": clock.decode_ms,
            "inference": verdict.infer_ms,
            "sr": sr_ms,
            "sc": sc_ms,
            "total": (time.perf_counter() - clock.t_start) * 1000,
        }
        record = _record(basis, queued, timings)
        return ModelOutcome(record, {**problems, **queued.problems}, repairs)

    def _sr(
        self, claim: ClaimedStudy, verdict: ModelVerdict
    ) -> tuple[ResultBasis, Payloads, dict[str, list[str]]]:
        """Build, mark and write the SR; return what the SC and the record build on."""
        sources, repairs = repair_sources(source_of(s.instance) for s in verdict.chosen)
        card = verdict.loaded.bundle.card
        algorithm = agent_info(verdict.loaded)
        finding = verdict.finding()
        content = result_content(verdict.per_image, finding, card.threshold)
        identity = verdict.loaded.bundle.identity
        prior = prior_revision(self._sessions, claim.study_id, identity.name)
        series_uid, sop_uid = content_result_uids(
            claim.study_instance_uid, model_identity(algorithm), "SR", content
        )
        try:
            sr = build_sr(
                sources,
                finding,
                algorithm,
                series_instance_uid=series_uid,
                sop_instance_uid=sop_uid,
            )
        except ValueError as exc:
            raise PermanentProcessingError(f"cannot build the SR: {exc}") from exc
        revision = next_revision(prior, claim.study_instance_uid, sop_uid)
        mark_revision(sr, algorithm, revision)
        payloads = Payloads(self._results, claim.study_instance_uid)
        payloads.add("SR", sr)
        basis = ResultBasis(
            claim, verdict, sources, algorithm, content, revision, (series_uid, sop_uid)
        )
        return basis, payloads, dict(repairs)

    def _sc(
        self, basis: ResultBasis, kept: Mapping[str, PreparedImage], payloads: Payloads
    ) -> dict[str, str]:
        """Build and write the heatmap picture of the key image; a failure is a problem."""
        verdict = basis.verdict
        try:
            key = key_image(verdict, kept)
            picture = heatmap_picture(verdict, key, self._runners[model_key(verdict.loaded)])
            source = next(s for s in basis.sources if str(s.SOPInstanceUID) == key.selected.uid)
            series_uid, sop_uid = content_result_uids(
                basis.claim.study_instance_uid,
                model_identity(basis.algorithm),
                "SC",
                basis.content,
            )
            sc = build_heatmap_sc(
                source,
                picture.display,
                picture.heatmap,
                verdict.finding(),
                basis.algorithm,
                series_instance_uid=series_uid,
                sop_instance_uid=sop_uid,
            )
            mark_revision(sc, basis.algorithm, basis.revision)
            payloads.add("SC", sc)
        except Exception as exc:  # noqa: BLE001 - the SR still goes out; reason audited
            log.warning(
                "heatmap picture not built; the SR is still delivered",
                extra={"study_instance_uid": basis.claim.study_instance_uid, "error": str(exc)},
            )
            return {f"{verdict.loaded.bundle.card.name}:SC": f"{type(exc).__name__}: {exc}"}
        return {}


def _record(basis: ResultBasis, queued: Queued, timings: dict[str, float]) -> ResultRecord:
    """Return the row :func:`db.results.record_classification` stores for one model."""
    verdict, revision = basis.verdict, basis.revision
    card, identity = verdict.loaded.bundle.card, verdict.loaded.bundle.identity
    return ResultRecord(
        model_name=identity.name,
        model_version=identity.version,
        weights_sha256=identity.weights_sha256,
        finding_code=card.finding.value,
        finding_meaning=card.finding.meaning,
        probability=verdict.probability,
        positive=verdict.positive,
        threshold=card.threshold,
        images=verdict.per_image,
        timings_ms={k: round(v, 1) for k, v in timings.items()},
        device=str(verdict.loaded.device),
        sr_series_instance_uid=basis.sr_uids[0],
        sr_sop_instance_uid=basis.sr_uids[1],
        outputs=tuple(queued.records),
        revision=revision.number,
        content_key=basis.content.key(),
        predecessor_sop_instance_uid=(
            None if revision.predecessor is None else revision.predecessor.sop_instance_uid
        ),
    )
