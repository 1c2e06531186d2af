"""Prometheus metrics of one running radflag (``/metrics``).

Every :class:`Radflag` has its own :class:`~prometheus_client.CollectorRegistry`, so tests with
several apps in one process do not collide. Counters and histograms are updated in-process by
small hooks the daemon installs where things happen:

* :class:`CountingSink` wraps the listener's instance sink (instances received);
* :meth:`PipelineMetrics.listener_event` sees the listener's refusals (instances and
  associations rejected);
* :class:`ObservedProcessor` wraps the worker's study processor (studies classified,
  not applicable, failed, retried; per-stage latencies read back from the rows the processor
  committed — the database stays the source of truth);
* :meth:`PipelineMetrics.observe_deliveries` runs after each outbox round (objects delivered,
  dead letters, retries; send latencies).

Gauges (queue depth, outbox backlog, studies and outbox entries per state) are read from the
database at scrape time by :class:`DatabaseGauges`, so they are right after a restart and
when several daemons share one database.

Metric names follow the Prometheus naming conventions (base units: seconds; ``_total`` for
counters). No label carries a patient identifier or a UID.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.worker import StudyHandler
from db.dashboard_queries import queue_gauges
from db.models import Delivery, DeliveryAttempt, Result, Study, utcnow
from db.outbox import DeliveryState
from db.queue import ClaimedStudy
from db.states import StudyState
from dicom_io.scp import InstanceSink, ListenerEventKind, ReceivedInstance

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
"""Histogram buckets (seconds): from a few milliseconds (SR encoding) to an hour (a quiet
period plus a congested queue)."""

PROCESSING_STAGES: Mapping[str, str] = {
    "decode": "decode",
    "inference": "inference",
    "sr": "sr",
    "sc": "sc",
    "total": "processing",
}
"""``results.timings_ms`` keys -> ``stage`` label of ``radflag_stage_duration_seconds``."""


class PipelineMetrics:
    """The counters and histograms of one radflag, in a registry of its own.

    Parameters
    ----------
    sessions
        Session factory of the radflag database (read-only use: gauges, latencies).
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self.registry = CollectorRegistry()
        reg = self.registry
        self.received = Counter(
            "radflag_received",
            "SOP instances received and committed (C-STORE success), new or duplicate.",
            ["outcome"],
            registry=reg,
        )
        self.rejected = Counter(
            "radflag_rejected",
            "Refused by the listener: C-STOREs answered with a failure status (instance) and "
            "associations rejected (association).",
            ["kind"],
            registry=reg,
        )
        self.classified = Counter(
            "radflag_classified",
            "Studies classified, per model (one count per model result).",
            ["model", "version"],
            registry=reg,
        )
        self.not_applicable = Counter(
            "radflag_not_applicable",
            "Studies no loaded model applies to.",
            registry=reg,
        )
        self.delivered = Counter(
            "radflag_delivered",
            "Result objects delivered to a destination (C-STORE success).",
            registry=reg,
        )
        self.failed = Counter(
            "radflag_failed",
            "Permanent failures: studies that failed processing (stage=processing) and result "
            "objects given up after the last attempt (stage=delivery, dead letters).",
            ["stage"],
            registry=reg,
        )
        self.retried = Counter(
            "radflag_retried",
            "Failed attempts that will be retried (stage=processing|delivery).",
            ["stage"],
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "radflag_stage_duration_seconds",
            "Per-stage latency: decode, inference, sr, sc, processing (the worker's steps); "
            "received_to_ready, ready_to_classified, classified_to_delivered (between steps); "
            "delivery_attempt (one C-STORE association).",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=reg,
        )
        for outcome in ("new", "duplicate"):
            self.received.labels(outcome=outcome)
        for kind in ("instance", "association"):
            self.rejected.labels(kind=kind)
        for stage in ("processing", "delivery"):
            self.failed.labels(stage=stage)
            self.retried.labels(stage=stage)
        reg.register(DatabaseGauges(sessions))
        self._attempt_watermark = self._max_attempt_id()

    # -- listener -------------------------------------------------------------------------
    def listener_event(self, kind: str) -> None:
        """Count a listener refusal (``dicom_io.scp.ListenerEventKind`` value)."""
        if kind == ListenerEventKind.STORE_FAILED.value:
            self.rejected.labels(kind="instance").inc()
        elif kind == ListenerEventKind.ASSOCIATION_REJECTED.value:
            self.rejected.labels(kind="association").inc()

    # -- worker ---------------------------------------------------------------------------
    def observe_study(self, claim: ClaimedStudy, started_at: datetime) -> None:
        """Count the outcome of one processing run and record its latencies.

        Reads back what the processor committed: the results created since ``started_at``
        (one per model) and the study's state and timestamps.
        """
        with self._sessions() as session:
            study = session.get(Study, claim.study_id)
            if study is None:
                return
            results = session.scalars(
                select(Result).where(
                    Result.study_id == claim.study_id,
                    Result.superseded.is_(False),
                    Result.created_at >= started_at,
                )
            ).all()
            for r in results:
                self.classified.labels(model=r.model_name, version=r.model_version).inc()
                for key, stage in PROCESSING_STAGES.items():
                    value_ms = (r.timings_ms or {}).get(key)
                    if isinstance(value_ms, int | float) and (value_ms > 0 or key != "sc"):
                        self.stage_seconds.labels(stage=stage).observe(float(value_ms) / 1000)
            if results:
                for stage, start, end in (
                    ("received_to_ready", study.last_received_at, study.ready_at),
                    ("ready_to_classified", study.ready_at, study.classified_at),
                ):
                    if start is not None and end is not None and end >= start:
                        self.stage_seconds.labels(stage=stage).observe(
                            (end - start).total_seconds()
                        )
            elif study.state == StudyState.NOT_APPLICABLE.value:
                self.not_applicable.inc()
            elif study.state == StudyState.FAILED.value:
                self.failed.labels(stage="processing").inc()
            elif study.state == StudyState.READY.value:
                self.retried.labels(stage="processing").inc()

    # -- outbox ---------------------------------------------------------------------------
    def observe_deliveries(self, counts: Mapping[str, int]) -> None:
        """Count one outbox round (``deliver_due``'s result) and record send latencies.

        Latencies come from the ``delivery_attempts`` rows written since the previous round.
        """
        self.delivered.inc(counts.get(DeliveryState.SENT.value, 0))
        self.failed.labels(stage="delivery").inc(counts.get(DeliveryState.DEAD.value, 0))
        self.retried.labels(stage="delivery").inc(counts.get(DeliveryState.PENDING.value, 0))
        if not any(counts.values()):
            return
        with self._sessions() as session:
            rows = session.execute(
                select(
                    DeliveryAttempt.id,
                    DeliveryAttempt.started_at,
                    DeliveryAttempt.finished_at,
                    DeliveryAttempt.ok,
                    Delivery.sent_at,
                    Study.classified_at,
                )
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .join(Study, Study.id == Delivery.study_id)
                .where(DeliveryAttempt.id > self._attempt_watermark)
                .order_by(DeliveryAttempt.id)
            ).all()
        for attempt_id, started, finished, ok, sent_at, classified_at in rows:
            self._attempt_watermark = max(self._attempt_watermark, int(attempt_id))
            if finished >= started:
                self.stage_seconds.labels(stage="delivery_attempt").observe(
                    (finished - started).total_seconds()
                )
            if ok and sent_at is not None and classified_at is not None:
                elapsed_s = (sent_at - classified_at).total_seconds()
                if elapsed_s >= 0:
                    self.stage_seconds.labels(stage="classified_to_delivered").observe(elapsed_s)

    def _max_attempt_id(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.max(DeliveryAttempt.id))) or 0)


class DatabaseGauges(Collector):
    """Scrape-time gauges read from the database (the single source of truth).

    When the database cannot be read, ``radflag_database_up`` is 0 and the other gauges are
    left out (a scrape never fails because of it).
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def describe(self) -> Iterable[Metric]:
        """Name the metric families without touching the database."""
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        """Query the counts and return the gauges."""
        try:
            gauges = queue_gauges(self._sessions)
        except SQLAlchemyError as exc:
            log.warning("metrics: database unreachable", extra={"error": type(exc).__name__})
            up = GaugeMetricFamily(
                "radflag_database_up", "1 when the database answered the last scrape."
            )
            up.add_metric([], 0)
            return [up]
        up, depth, backlog, studies, deliveries = self._families()
        up.add_metric([], 1)
        depth.add_metric([], gauges.queue_depth)
        backlog.add_metric([], gauges.outbox_backlog)
        for state, n in sorted(gauges.studies_by_state.items()):
            studies.add_metric([state], n)
        for state, n in sorted(gauges.deliveries_by_state.items()):
            deliveries.add_metric([state], n)
        return [up, depth, backlog, studies, deliveries]

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            GaugeMetricFamily(
                "radflag_database_up", "1 when the database answered the last scrape."
            ),
            GaugeMetricFamily("radflag_queue_depth", "Studies READY and waiting for a worker."),
            GaugeMetricFamily("radflag_outbox_backlog", "Result objects PENDING delivery."),
            GaugeMetricFamily("radflag_studies", "Studies per state.", labels=["state"]),
            GaugeMetricFamily(
                "radflag_outbox_entries", "Outbox entries per state.", labels=["state"]
            ),
        )


class CountingSink:
    """An :class:`~dicom_io.scp.InstanceSink` that counts what the wrapped sink stored.

    Failures (``SinkUnavailable``) propagate unchanged; the listener reports them as a
    ``store_failed`` event, counted by :meth:`PipelineMetrics.listener_event`.
    """

    def __init__(self, inner: InstanceSink, metrics: PipelineMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def store(self, instance: ReceivedInstance) -> bool:
        """Store through the wrapped sink and count the outcome (new or duplicate)."""
        new = self._inner.store(instance)
        self._metrics.received.labels(outcome="new" if new else "duplicate").inc()
        return new


class ObservedProcessor:
    """Runs the wrapped study handler and records the outcome in the metrics.

    Implements :class:`daemon.worker.StudyHandler`: :meth:`process` is delegated, then
    observed. An error while observing is logged and never reaches the worker.
    """

    def __init__(self, inner: StudyHandler, metrics: PipelineMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def process(self, claim: ClaimedStudy) -> None:
        """Process ``claim`` with the wrapped processor, then count what happened."""
        started_at = utcnow()
        t0 = time.perf_counter()
        self._inner.process(claim)
        try:
            self._metrics.observe_study(claim, started_at)
        except Exception as exc:  # noqa: BLE001 - metrics must never break processing
            log.warning(
                "metrics: could not observe a processed study",
                extra={
                    "study_instance_uid": claim.study_instance_uid,
                    "error": type(exc).__name__,
                    "elapsed_s": round(time.perf_counter() - t0, 3),
                },
            )


def observe_delivery_round(metrics: PipelineMetrics, counts: Mapping[str, int]) -> None:
    """Record an outbox round; never raises (metrics must not break delivery)."""
    try:
        metrics.observe_deliveries(counts)
    except Exception as exc:  # noqa: BLE001
        log.warning("metrics: could not observe a delivery round", extra={"error": str(exc)})
