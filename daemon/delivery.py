"""The outbox sender: C-STOREs due result objects to their destinations, with backoff."""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import DeliverySettings
from db.models import utcnow
from db.outbox import BackoffPolicy, DeliveryState, due_deliveries, record_attempt
from dicom_io.scu import Destination, SendError, send_datasets

log = logging.getLogger(__name__)


def backoff_policy(settings: DeliverySettings) -> BackoffPolicy:
    """Build the outbox retry policy from the settings."""
    return BackoffPolicy(
        base_s=settings.backoff_base_s,
        max_s=settings.backoff_max_s,
        max_attempts=settings.max_attempts,
    )


def deliver_due(sessions: sessionmaker[Session], settings: DeliverySettings) -> dict[str, int]:
    """Try every due outbox entry once; return counts by resulting state.

    Each attempt and its outcome is recorded (``delivery_attempts``, audit log). A refused or
    unreachable destination is retried with exponential backoff; a missing payload file is a
    permanent failure (dead letter).
    """
    policy = backoff_policy(settings)
    counts: dict[str, int] = {}
    for due in due_deliveries(sessions):
        started = utcnow()
        ok, error, retryable = False, None, True
        try:
            ds = dcmread(Path(due.payload_path))
            send_datasets(
                Destination(ae_title=due.ae_title, host=due.host, port=due.port),
                [ds],
                calling_ae=settings.calling_ae_title,
                timeout_s=settings.timeout_s,
            )
            ok = True
        except SendError as exc:
            error, retryable = str(exc), exc.retryable
        except FileNotFoundError as exc:
            error, retryable = f"result file missing: {exc.filename}", False
        except Exception as exc:  # noqa: BLE001 - recorded as a retryable failure
            error = f"{type(exc).__name__}: {exc}"
        state = record_attempt(
            sessions,
            due.delivery_id,
            started_at=started,
            ok=ok,
            error=error,
            retryable=retryable,
            policy=policy,
        )
        counts[state.value] = counts.get(state.value, 0) + 1
        level = logging.INFO if state is DeliveryState.SENT else logging.WARNING
        log.log(
            level,
            "delivery %s",
            state.value.lower(),
            extra={
                "destination": due.destination,
                "kind": due.kind,
                "sop_instance_uid": due.sop_instance_uid,
                "attempt": due.attempts + 1,
                "error": error,
            },
        )
    return counts
