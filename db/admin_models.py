"""The registry of models radflag has used (table ``models``).

The daemon records each loaded model (name, version, weights sha256 and its model card) at
start; results carry the same identity, so an administrator can tell which card (intended
use, threshold, training data, metrics) stood behind any result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db.models import ModelRecord, Result, utcnow


@dataclass(frozen=True)
class ModelIdentity:
    """A model as loaded: identity plus its card (JSON-serialisable)."""

    name: str
    version: str
    weights_sha256: str
    card: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelUsage:
    """A registered model and how much it has been used."""

    name: str
    version: str
    weights_sha256: str
    card: dict[str, Any]
    first_used_at: datetime
    last_used_at: datetime
    n_results: int
    last_result_at: datetime | None


def record_models_in_use(
    sessions: sessionmaker[Session], models: list[ModelIdentity], *, now: datetime | None = None
) -> None:
    """Insert unknown models and refresh ``last_used_at`` (and the card) of known ones.

    Safe when two daemons start at once: the loser of an insert race retries and updates.
    """
    when = now or utcnow()
    for attempt in range(3):
        try:
            with sessions.begin() as session:
                _upsert(session, models, when)
            return
        except IntegrityError:
            if attempt == 2:
                raise


def _upsert(session: Session, models: list[ModelIdentity], when: datetime) -> None:
    for m in models:
        row = session.scalars(
            select(ModelRecord).where(
                ModelRecord.name == m.name,
                ModelRecord.version == m.version,
                ModelRecord.weights_sha256 == m.weights_sha256,
            )
        ).first()
        if row is None:
            session.add(
                ModelRecord(
                    name=m.name,
                    version=m.version,
                    weights_sha256=m.weights_sha256,
                    card=dict(m.card),
                    first_used_at=when,
                    last_used_at=when,
                )
            )
            session.flush()
        else:
            row.last_used_at = max(row.last_used_at, when)
            row.card = dict(m.card)


def list_models(sessions: sessionmaker[Session]) -> list[ModelUsage]:
    """Return every registered model with its result count, most recently used first."""
    with sessions() as session:
        usage = {
            (name, version, sha): (int(n), last)
            for name, version, sha, n, last in session.execute(
                select(
                    Result.model_name,
                    Result.model_version,
                    Result.weights_sha256,
                    func.count(),
                    func.max(Result.created_at),
                ).group_by(Result.model_name, Result.model_version, Result.weights_sha256)
            ).all()
        }
        rows = session.scalars(
            select(ModelRecord).order_by(ModelRecord.last_used_at.desc(), ModelRecord.id)
        ).all()
        out: list[ModelUsage] = []
        for r in rows:
            n, last = usage.get((r.name, r.version, r.weights_sha256), (0, None))
            out.append(
                ModelUsage(
                    name=r.name,
                    version=r.version,
                    weights_sha256=r.weights_sha256,
                    card=dict(r.card),
                    first_used_at=r.first_used_at,
                    last_used_at=r.last_used_at,
                    n_results=n,
                    last_result_at=last,
                )
            )
        return out
