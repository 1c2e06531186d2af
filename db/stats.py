"""Operational statistics for ``radflag stats`` (read-only).

* counts of studies per state (all time) and of outbox entries per state;
* per-stage latency percentiles of the studies received in a time window:
  ``received -> ready`` (last instance to quiet period passed), ``ready -> classified``,
  ``classified -> delivered`` (to the last result object sent), and ``received -> delivered``
  (first instance to last result object sent, end to end);
* the positive rate of each model version per UTC day (a drift signal: a model whose positive
  rate moves while the case mix does not is seeing different images);
* the most frequent failure reasons in the window.

Percentiles and daily buckets are computed in Python from the window's rows so that SQLite
and PostgreSQL give identical answers.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Delivery, Result, Study, utcnow
from db.outbox import DeliveryState
from db.states import StudyState

PERCENTILES: tuple[int, ...] = (50, 90, 95, 99)
"""Percentiles reported for every stage."""

STAGES: tuple[str, ...] = (
    "received_to_ready",
    "ready_to_classified",
    "classified_to_delivered",
    "received_to_delivered",
)
"""Stage names, in pipeline order."""


def percentile(values: list[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) of ``values`` by linear interpolation.

    The same definition as ``numpy.percentile(..., method="linear")``.

    Raises
    ------
    ValueError
        When ``values`` is empty or ``q`` is outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class StageLatency:
    """Latency of one pipeline stage over the window's studies, in seconds."""

    stage: str
    n: int
    p50_s: float | None
    p90_s: float | None
    p95_s: float | None
    p99_s: float | None
    max_s: float | None

    @classmethod
    def of(cls, stage: str, values_s: list[float]) -> StageLatency:
        """Summarise ``values_s`` (may be empty: every statistic is then None)."""
        if not values_s:
            return cls(stage, 0, None, None, None, None, None)
        p = {q: percentile(values_s, q) for q in PERCENTILES}
        return cls(stage, len(values_s), p[50], p[90], p[95], p[99], max(values_s))


@dataclass(frozen=True)
class DailyRate:
    """Results of one model version for one finding on one UTC day."""

    day: date
    model_name: str
    model_version: str
    finding_code: str
    n_results: int
    n_positive: int
    positive_rate: float
    mean_probability: float
    finding_meaning: str = ""
    """The finding's name (SNOMED CT meaning), e.g. ``Pneumonia``."""


@dataclass(frozen=True)
class FailureCount:
    """How many studies of the window failed with one reason."""

    reason: str
    n_studies: int


@dataclass(frozen=True)
class Stats:
    """Everything ``radflag stats`` shows."""

    since: datetime | None
    until: datetime
    studies_by_state: dict[str, int]
    deliveries_by_state: dict[str, int]
    studies_in_window: int
    latencies: tuple[StageLatency, ...]
    positive_rate: tuple[DailyRate, ...]
    failures: tuple[FailureCount, ...]

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready mapping (ISO 8601 times and dates)."""
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat(),
            "studies_by_state": dict(self.studies_by_state),
            "deliveries_by_state": dict(self.deliveries_by_state),
            "studies_in_window": self.studies_in_window,
            "latencies": [asdict(x) for x in self.latencies],
            "positive_rate": [{**asdict(r), "day": r.day.isoformat()} for r in self.positive_rate],
            "failures": [asdict(f) for f in self.failures],
        }


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _counts(session: Session, column: Any) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).group_by(column)).all()
    return {str(k): int(n) for k, n in rows}


def collect_stats(
    sessions: sessionmaker[Session],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    top_failures: int = 10,
) -> Stats:
    """Compute the statistics of ``radflag stats``.

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    since, until
        Window ``[since, until)`` (aware datetimes) on the study's first receive time (for
        latencies and failures) and on the result time (for positive rates). ``until``
        defaults to now, ``since`` to the beginning.
    top_failures
        How many failure reasons to list.

    Returns
    -------
    Stats
        The counts per state are over all studies, regardless of the window.
    """
    end = until or utcnow()
    for name, value in (("since", since), ("until", end)):
        if value is not None and value.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware")
    with sessions() as session:
        studies_by_state = {s.value: 0 for s in StudyState}
        studies_by_state.update(_counts(session, Study.state))
        deliveries_by_state = {s.value: 0 for s in DeliveryState}
        deliveries_by_state.update(_counts(session, Delivery.state))

        delivered = (
            select(Delivery.study_id, func.max(Delivery.sent_at).label("delivered_at"))
            .where(Delivery.state == DeliveryState.SENT.value)
            .group_by(Delivery.study_id)
            .subquery()
        )
        window = [Study.first_received_at < end]
        if since is not None:
            window.append(Study.first_received_at >= since)
        rows = session.execute(
            select(
                Study.state,
                Study.first_received_at,
                Study.last_received_at,
                Study.ready_at,
                Study.classified_at,
                Study.failure_reason,
                delivered.c.delivered_at,
            )
            .outerjoin(delivered, delivered.c.study_id == Study.id)
            .where(*window)
        ).all()
        stage_values: dict[str, list[float]] = {s: [] for s in STAGES}
        failures: Counter[str] = Counter()
        for state, first, last, ready, classified, reason, delivered_at in rows:
            # Only a DONE study's send time closes the pipeline; a later reprocessing run
            # may have left an older send time behind.
            done_at = delivered_at if state == StudyState.DONE.value else None
            for stage, elapsed_s in (
                ("received_to_ready", _seconds(last, ready)),
                ("ready_to_classified", _seconds(ready, classified)),
                ("classified_to_delivered", _seconds(classified, done_at)),
                ("received_to_delivered", _seconds(first, done_at)),
            ):
                if elapsed_s is not None and elapsed_s >= 0:
                    stage_values[stage].append(elapsed_s)
            if state in (StudyState.FAILED.value, StudyState.DELIVERY_FAILED.value):
                failures[reason or "(no reason recorded)"] += 1

        result_window = [Result.created_at < end, Result.superseded.is_(False)]
        if since is not None:
            result_window.append(Result.created_at >= since)
        buckets: dict[tuple[date, str, str, str], list[tuple[bool, float]]] = {}
        meanings: dict[str, str] = {}
        for created, name, version, code, meaning, positive, probability in session.execute(
            select(
                Result.created_at,
                Result.model_name,
                Result.model_version,
                Result.finding_code,
                Result.finding_meaning,
                Result.positive,
                Result.probability,
            ).where(*result_window)
        ).all():
            key = (created.date(), name, version, code)
            meanings[code] = meaning
            buckets.setdefault(key, []).append((bool(positive), float(probability)))
    rates = tuple(
        DailyRate(
            day=day,
            model_name=name,
            model_version=version,
            finding_code=code,
            n_results=len(items),
            n_positive=sum(1 for pos, _ in items if pos),
            positive_rate=sum(1 for pos, _ in items if pos) / len(items),
            mean_probability=sum(p for _, p in items) / len(items),
            finding_meaning=meanings.get(code, ""),
        )
        for (day, name, version, code), items in sorted(buckets.items())
    )
    return Stats(
        since=since,
        until=end,
        studies_by_state=studies_by_state,
        deliveries_by_state=deliveries_by_state,
        studies_in_window=len(rows),
        latencies=tuple(StageLatency.of(s, stage_values[s]) for s in STAGES),
        positive_rate=rates,
        failures=tuple(
            FailureCount(reason=r, n_studies=n) for r, n in failures.most_common(top_failures)
        ),
    )
