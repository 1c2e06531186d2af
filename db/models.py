"""SQLAlchemy 2 typed mappings of radflag's tables.

Times are stored as timezone-aware UTC. Patient identifiers are stored only as a keyed hash
(:attr:`Study.patient_key`) unless the configuration asks for clear text.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)
"""A DICOM UID is at most 64 characters (PS3.5 9.1)."""


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that always comes back timezone-aware in UTC (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes; store UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return an aware UTC datetime."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of every radflag table."""

    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Study(Base):
    """A DICOM study as radflag sees it: its state in the pipeline and its lease."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    patient_key: Mapped[str | None] = mapped_column(String(128), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    """Accession Number (0008,0050) of the first instance that carried one (migration 0004)."""
    study_date: Mapped[str | None] = mapped_column(String(8))
    """Study Date (0008,0020), ``YYYYMMDD`` as received (migration 0004)."""
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    ready_at: Mapped[datetime | None]
    classified_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    processing_attempts: Mapped[int] = mapped_column(Integer, default=0)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    max_probability: Mapped[float | None] = mapped_column(Float)
    urgent: Mapped[bool | None] = mapped_column(Boolean)
    updated_at: Mapped[datetime]

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    results: Mapped[list[Result]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_studies_state_last_received", "state", "last_received_at"),)


class Instance(Base):
    """A received SOP instance and where its file lies in the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(64))
    received_at: Mapped[datetime]
    duplicate_count: Mapped[int] = mapped_column(Integer, default=0)
    quarantined: Mapped[bool] = mapped_column(Boolean, default=False)
    purged_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="instances")


class Result(Base):
    """One model's conclusion on one study, with the model's identity and timings."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    finding_code: Mapped[str] = mapped_column(String(64))
    finding_meaning: Mapped[str] = mapped_column(String(128))
    probability: Mapped[float] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    n_images: Mapped[int] = mapped_column(Integer)
    images: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Per-image probabilities: ``{"<SOP Instance UID>": probability}``."""
    timings_ms: Mapped[dict[str, Any]] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(32))
    sr_series_instance_uid: Mapped[str | None] = mapped_column(UID)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """1 for a study's first result of a model; +1 whenever the content (and UIDs) change."""
    content_key: Mapped[str | None] = mapped_column(String(64))
    """sha256 of sources + values (:meth:`dicom_io.revisions.ResultContent.key`)."""
    predecessor_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    """The SR this revision replaces (its Predecessor Documents Sequence)."""

    study: Mapped[Study] = relationship(back_populates="results")


class Delivery(Base):
    """An outbox entry: one result object to one destination, with its retry schedule."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    destination: Mapped[str] = mapped_column(String(64))
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    payload_path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    """The sender holding the entry while it is SENDING."""
    lease_expires_at: Mapped[datetime | None]
    """When a SENDING claim lapses (database clock) and the entry is due again."""

    attempt_history: Mapped[list[DeliveryAttempt]] = relationship(back_populates="delivery")


class DeliveryAttempt(Base):
    """One try at sending an outbox entry."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime]
    ok: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)

    delivery: Mapped[Delivery] = relationship(back_populates="attempt_history")


class AuditEvent(Base):
    """An append-only audit row (see :mod:`db.audit` for the event vocabulary)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    event_type: Mapped[str] = mapped_column(String(48), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    process_id: Mapped[str | None] = mapped_column(String(128))
    """The radflag process that wrote the row (:class:`Process`, migration 0003)."""

    study: Mapped[Study | None] = relationship()


class ModelRecord(Base):
    """A model (name, version, weights) the daemon has loaded, with its card (migration 0002).

    One row per distinct ``(name, version, weights_sha256)``: the same version with other
    weights is another model.
    """

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    first_used_at: Mapped[datetime]
    last_used_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("name", "version", "weights_sha256", name="uq_models_identity"),
    )


class Process(Base):
    """A ``radflag serve`` process of the cluster, alive or dead (migration 0003).

    ``heartbeat_at`` is renewed by the database clock every few seconds; a process whose
    heartbeat is older than one lease is dead and its work is reclaimed (:mod:`db.cluster`).
    """

    __tablename__ = "processes"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), index=True)
    pid: Mapped[int] = mapped_column(Integer)
    roles: Mapped[str] = mapped_column(String(128))
    """Comma-separated roles: ``listener,worker,sender,scheduler``."""
    identity: Mapped[str] = mapped_column(String(64))
    """Stable per host and configuration: a restart finds its own previous incarnations."""
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    stopped_at: Mapped[datetime | None]
    stop_reason: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
