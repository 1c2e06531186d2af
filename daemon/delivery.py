"""The outbox sender: C-STOREs due result objects to their destinations, with backoff.

A destination that refuses Comprehensive 3D SR Storage (no accepted presentation context, or
status 0x0122) gets the same report as Comprehensive SR (PS3.3 A.35.3): the refused attempt is
recorded, the entry is pointed at the converted file and is due again at once.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import DeliverySettings
from db.models import utcnow
from db.outbox import (
    BackoffPolicy,
    DeliveryState,
    DueDelivery,
    due_deliveries,
    record_attempt,
    replace_payload,
)
from dicom_io.scu import Destination, SendError, send_datasets
from dicom_io.spool import Spool, SpoolError
from dicom_io.sr import SRStorageClass, as_comprehensive_sr

log = logging.getLogger(__name__)


def backoff_policy(settings: DeliverySettings) -> BackoffPolicy:
    """Build the outbox retry policy from the settings."""
    return BackoffPolicy(
        base_s=settings.backoff_base_s,
        max_s=settings.backoff_max_s,
        max_attempts=settings.max_attempts,
    )


def deliver_due(
    sessions: sessionmaker[Session],
    settings: DeliverySettings,
    results: Spool,
    tls_contexts: Mapping[str, ssl.SSLContext] | None = None,
) -> dict[str, int]:
    """Try every due outbox entry once; return counts by resulting state.

    ``results`` is the spool the result objects lie in; a Comprehensive SR fallback is
    written there, next to the refused 3D SR.

    ``tls_contexts`` maps destination names to the client TLS context their sends use
    (destinations with ``tls = true``); the others are sent over plain TCP.

    Each attempt and its outcome is recorded (``delivery_attempts``, audit log). A refused or
    unreachable destination is retried with exponential backoff; a missing payload file is a
    permanent failure (dead letter).
    """
    policy = backoff_policy(settings)
    counts: dict[str, int] = {}
    for due in due_deliveries(sessions):
        started = utcnow()
        ok, error, retryable = False, None, True
        fallback: tuple[str, str] | None = None
        ds = None
        try:
            ds = dcmread(Path(due.payload_path))
            send_datasets(
                Destination(ae_title=due.ae_title, host=due.host, port=due.port),
                [ds],
                calling_ae=settings.calling_ae_title,
                timeout_s=settings.timeout_s,
                ssl_context=(tls_contexts or {}).get(due.destination),
            )
            ok = True
        except SendError as exc:
            error, retryable = str(exc), exc.retryable
            if ds is not None:
                fallback = _comprehensive_fallback(due, ds, exc, results)
            if fallback is not None:
                error = f"{error}; falling back to Comprehensive SR {fallback[0]}"
                retryable = True
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
        if fallback is not None and state is DeliveryState.PENDING:
            replace_payload(
                sessions,
                due.delivery_id,
                payload_path=fallback[1],
                sop_instance_uid=fallback[0],
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


def _comprehensive_fallback(
    due: DueDelivery, original: Dataset, exc: SendError, results: Spool
) -> tuple[str, str] | None:
    """Write the Comprehensive SR variant of a refused 3D SR; return ``(sop_uid, path)``.

    The variant is written the way every result object is (:meth:`Spool.write`: temporary
    name, fsync, atomic rename), at the spool path its UIDs give.
    """
    if exc.refused_sop_class != SRStorageClass.COMPREHENSIVE_3D.value or due.kind != "SR":
        return None
    try:
        converted = as_comprehensive_sr(original)
        sop_uid = str(converted.SOPInstanceUID)
        target = results.path_for(due.study_instance_uid, str(converted.SeriesInstanceUID), sop_uid)
        results.write(converted, converted.file_meta, target)
    except (SpoolError, ValueError) as conversion_error:
        log.error(
            "cannot convert the SR for a destination that refuses Comprehensive 3D SR",
            extra={"destination": due.destination, "error": str(conversion_error)},
        )
        return None
    log.warning(
        "destination refuses Comprehensive 3D SR; sending Comprehensive SR instead",
        extra={"destination": due.destination, "sop_instance_uid": sop_uid},
    )
    return sop_uid, str(target)
