"""Response models of the admin API (they make its OpenAPI description).

Only UIDs identify studies here: no patient name, ID or key (the database stores the patient ID
only as a keyed hash, and even that is not exposed).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class CheckOut(_Out):
    """One readiness check."""

    name: str
    ok: bool
    detail: str


class ReadyOut(_Out):
    """``/readyz``: every check; the status is ``ready`` only when all passed."""

    status: str
    checks: list[CheckOut]


class HealthOut(_Out):
    """``/healthz``: the process answers and is not stopping."""

    status: str


class LoadedModelOut(_Out):
    """A model the running daemon has loaded."""

    name: str
    version: str
    weights_sha256: str
    device: str
    threshold: float
    finding: str


class OverviewOut(_Out):
    """The dashboard's header: counts now, and what this daemon runs."""

    version: str
    started_at: datetime
    now: datetime
    studies_by_state: dict[str, int]
    deliveries_by_state: dict[str, int]
    queue_depth: int
    outbox_backlog: int
    dead_letters: int
    loaded_models: list[LoadedModelOut]
    warnings: list[str] = []
    """Start-up warnings: no destination configured, or none answered C-ECHO."""


class StudyOut(_Out):
    """A recent study with its flag (the highest-probability current result)."""

    study_instance_uid: str
    state: str
    calling_ae: str | None
    n_instances: int
    finding: str | None
    probability: float | None
    positive: bool | None
    model: str | None
    first_received_at: datetime
    last_received_at: datetime
    classified_at: datetime | None
    finished_at: datetime | None
    failure_reason: str | None
    accession_number: str | None = None
    """Accession Number (0008,0050): matches the study to the RIS order."""
    study_date: str | None = None
    """Study Date (0008,0020), ``YYYYMMDD``."""
    threshold: float | None = None
    decision: str | None = None
    """``PRESENT`` or ``ABSENT`` for the finding; None without a result."""
    delivered: str = "-"
    """``sent/total`` outbox entries (``no destination`` when results went nowhere)."""
    deliveries_sent: int = 0
    deliveries_total: int = 0
    deliveries_dead: int = 0
    reason: str | None = None
    """Why the study ended NOT_APPLICABLE, FAILED or DELIVERY_FAILED."""


class FailureOut(_Out):
    """A study in ``FAILED`` or ``DELIVERY_FAILED``."""

    study_instance_uid: str
    state: str
    calling_ae: str | None
    n_instances: int
    processing_attempts: int
    failure_reason: str | None
    last_received_at: datetime
    finished_at: datetime | None
    updated_at: datetime


class DeadLetterOut(_Out):
    """An outbox entry given up after its last attempt (``DEAD``)."""

    delivery_id: int
    study_instance_uid: str
    destination: str
    kind: str
    sop_instance_uid: str
    state: str
    attempts: int
    last_error: str | None
    created_at: datetime


class HourOut(_Out):
    """Throughput of one UTC hour."""

    hour: datetime
    received_instances: int
    classified_studies: int
    delivered_objects: int
    failed_studies: int
    dead_letters: int


class ThroughputOut(_Out):
    """Hourly throughput of a window, oldest hour first."""

    hours: int
    buckets: list[HourOut]


class StageLatencyOut(_Out):
    """Latency percentiles of one pipeline stage, seconds (None without data)."""

    stage: str
    n: int
    p50_s: float | None
    p90_s: float | None
    p95_s: float | None
    p99_s: float | None
    max_s: float | None


class LatencyOut(_Out):
    """Per-stage latencies of the studies first received in the window."""

    since: datetime
    until: datetime
    studies_in_window: int
    latencies: list[StageLatencyOut]


class ModelUsageOut(_Out):
    """A model radflag has used, its card and how many results it produced."""

    name: str
    version: str
    weights_sha256: str
    loaded: bool
    first_used_at: datetime
    last_used_at: datetime
    n_results: int
    last_result_at: datetime | None
    card: dict[str, Any]
