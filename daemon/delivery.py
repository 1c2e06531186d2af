"""The outbox sender: claimed result objects go out, one association per destination.

Each round (:meth:`Sender.run_round`: periodic, and at once when a study's outbox rows are
committed or a destination's association ends, :mod:`daemon.sendloop`) claims the due
entries of destinations that are not being served yet (:func:`db.outbox.claim_due`, SKIP
LOCKED + lease) and hands each destination's entries to a bounded thread pool: one
association carries all of them (PS3.7 9.1.1, :func:`dicom_io.scu.open_association`), and
each attempt is recorded against the claim as soon as its C-STORE response is in.
Destinations are served concurrently, and a round never waits for a slow one, so a dead
destination (connect timeout) delays nobody else; its entries back off with jitter
(:class:`db.outbox.BackoffPolicy`).

Fallbacks before an entry is declared dead:

- a destination that accepts the SOP class but not the compressed transfer syntax gets the
  uncompressed object (same SOP Instance UID) in the same association;
- a destination that refuses Comprehensive 3D SR Storage (no accepted presentation context,
  or status 0x0122) gets the same report as Comprehensive SR (PS3.3 A.35.3): the refused
  attempt is recorded, the entry is pointed at the converted file and is due again at once.

Stopping (SIGTERM): a C-STORE in flight finishes and is recorded, the destination's other
claimed entries are released unsent (:func:`db.outbox.release_claims`). After SIGKILL the
claims lapse and any sender re-sends them with the same UIDs.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import DeliverySettings
from db.models import utcnow
from db.outbox import (
    BackoffPolicy,
    DeliveryState,
    DueDelivery,
    claim_due,
    due_destinations,
    record_attempt,
    release_claims,
    renew_claims,
    replace_payload,
)
from dicom_io.scu import Destination, SendError, StoreAssociation, open_association
from dicom_io.spool import Spool, SpoolError
from dicom_io.sr import SRStorageClass, as_comprehensive_sr

log = logging.getLogger(__name__)

_GroupKey = tuple[str, str, str, int]
"""(destination name, called AE title, host, port): what one association serves."""


def backoff_policy(settings: DeliverySettings) -> BackoffPolicy:
    """Build the outbox retry policy from the settings."""
    return BackoffPolicy(
        base_s=settings.backoff_base_s,
        max_s=settings.backoff_max_s,
        max_attempts=settings.max_attempts,
        jitter=settings.backoff_jitter,
    )


class Sender:
    """Serves the outbox: destinations concurrently (bounded), one association each.

    Parameters
    ----------
    sessions
        Session factory of the radflag database.
    settings
        The ``[delivery]`` settings.
    results
        The spool the result objects lie in (Comprehensive SR fallbacks are written there).
    owner
        This sender's identity on its claims (unique per process).
    tls_contexts
        Destination name -> client TLS context (destinations with ``tls = true``).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: DeliverySettings,
        results: Spool,
        owner: str,
        tls_contexts: Mapping[str, ssl.SSLContext] | None = None,
    ) -> None:
        self._sessions = sessions
        self._settings = settings
        self._results = results
        self._owner = owner
        self._tls = dict(tls_contexts or {})
        self._policy = backoff_policy(settings)
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_parallel_destinations, thread_name_prefix="sender"
        )
        self._lock = threading.Lock()
        self._busy: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._on_free: Callable[[], None] | None = None

    def notify_free(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever a destination's association ends (its slot is free).

        The daemon starts the next round then (:meth:`daemon.sendloop.RoundLoop.kick`), so
        entries that became due while the destination was busy do not wait for the next tick.
        """
        self._on_free = callback

    # -- scheduling -------------------------------------------------------------------------
    def run_round(self) -> dict[str, int]:
        """Start serving every due destination not already in progress; never blocks on sends.

        Returns
        -------
        dict
            Entries that reached each state since the previous call (for metrics).
        """
        if not self._stopping.is_set():
            for key, entries in self._claim().items():
                with self._lock:
                    self._busy[key[0]] += 1
                try:
                    self._pool.submit(self._serve, key, entries)
                except RuntimeError:  # stopped meanwhile: give the claims back
                    self._done(key, [d.delivery_id for d in entries])
        return self.take_counts()

    def take_counts(self) -> dict[str, int]:
        """Return and reset the per-state counts of entries recorded so far."""
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts

    def _claim(self) -> dict[_GroupKey, list[DueDelivery]]:
        with self._lock:
            busy = {name for name, n in self._busy.items() if n > 0}
            free = self._settings.max_parallel_destinations - len(busy)
        if free <= 0:
            return {}
        wanted = [d for d in due_destinations(self._sessions) if d not in busy][:free]
        if not wanted:
            return {}
        groups: dict[_GroupKey, list[DueDelivery]] = {}
        claimed = claim_due(
            self._sessions,
            self._owner,
            lease_s=self._settings.claim_lease_s,
            destinations=wanted,
            limit=self._settings.max_per_association * len(wanted),
        )
        for due in claimed:
            groups.setdefault((due.destination, due.ae_title, due.host, due.port), []).append(due)
        return groups

    def idle(self) -> bool:
        """Return True when no destination is being served."""
        with self._lock:
            return not any(self._busy.values())

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Finish in-flight C-STOREs, release the other claims; True when all ended in time."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._pool.shutdown(wait=False, cancel_futures=True)
        return self.idle()

    # -- one destination --------------------------------------------------------------------
    def _serve(self, key: _GroupKey, entries: list[DueDelivery]) -> None:
        todo = list(entries)
        ended_normally = False
        try:
            self._send_group(key, todo)
            ended_normally = True
        except Exception:  # noqa: BLE001 - never lose claims to a bug: give them back
            log.exception("sender failed; releasing its claims", extra={"destination": key[0]})
        finally:
            self._done(key, [d.delivery_id for d in todo])
        # After a bug the released entries wait for the periodic round (no hot loop).
        if ended_normally and self._on_free is not None and not self._stopping.is_set():
            self._on_free()

    def _done(self, key: _GroupKey, unsent: list[int]) -> None:
        """Release what was not sent (its lease lapses if even that fails); free the slot."""
        try:
            release_claims(self._sessions, unsent, self._owner, reason="not sent")
        except Exception:  # noqa: BLE001 - e.g. database down: the lease lapses instead
            log.exception("cannot release claims", extra={"destination": key[0]})
        finally:
            with self._lock:
                self._busy[key[0]] -= 1

    def _send_group(self, key: _GroupKey, todo: list[DueDelivery]) -> None:
        """Send ``todo`` over one association; remove each entry from it once recorded."""
        loaded: list[tuple[DueDelivery, Dataset]] = []
        for due in list(todo):
            try:
                loaded.append((due, dcmread(self._results.resolve(due.payload_path))))
            except FileNotFoundError as exc:
                self._record(todo, due, utcnow(), f"result file missing: {exc.filename}", False)
        if not loaded or self._stopping.is_set():
            return
        dest = Destination(ae_title=key[1], host=key[2], port=key[3])
        started = utcnow()
        try:
            with open_association(
                dest,
                [ds for _, ds in loaded],
                calling_ae=self._settings.calling_ae_title,
                timeout_s=self._settings.timeout_s,
                ssl_context=self._tls.get(key[0]),
            ) as assoc:
                self._store_all(assoc, todo, loaded)
        except SendError as exc:
            self._fail_remaining(todo, loaded, started, exc)

    def _store_all(
        self,
        assoc: StoreAssociation,
        todo: list[DueDelivery],
        loaded: list[tuple[DueDelivery, Dataset]],
    ) -> None:
        renewed = time.monotonic()
        for due, ds in loaded:
            if self._stopping.is_set():
                return  # the rest is released by _serve
            if time.monotonic() - renewed > self._settings.claim_lease_s / 3:
                renew_claims(
                    self._sessions,
                    [d.delivery_id for d in todo],
                    self._owner,
                    lease_s=self._settings.claim_lease_s,
                )
                renewed = time.monotonic()
            started = utcnow()
            try:
                self._store_one(assoc, due, ds)
            except SendError as exc:
                if exc.association_failed:
                    raise
                fallback = _comprehensive_fallback(due, ds, exc, self._results)
                self._record(todo, due, started, _describe(exc, fallback), exc.retryable, fallback)
                continue
            self._record(todo, due, started, None, True)

    def _store_one(self, assoc: StoreAssociation, due: DueDelivery, ds: Dataset) -> None:
        """C-STORE one object; a refused compressed syntax falls back to the native file."""
        try:
            assoc.store(ds)
        except SendError as exc:
            native = self._uncompressed(due, ds) if exc.refused_transfer_syntax else None
            if native is None:
                raise
            log.warning(
                "destination refuses the transfer syntax; sending uncompressed",
                extra={
                    "destination": due.destination,
                    "transfer_syntax": exc.refused_transfer_syntax,
                },
            )
            assoc.store(native)

    def _uncompressed(self, due: DueDelivery, ds: Dataset) -> Dataset | None:
        """Return the native-syntax file of the same object (written next to it), if any."""
        canonical = self._results.path_for(
            due.study_instance_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        )
        if canonical == self._results.resolve(due.payload_path) or not canonical.exists():
            return None
        return dcmread(canonical)

    def _fail_remaining(
        self,
        todo: list[DueDelivery],
        loaded: list[tuple[DueDelivery, Dataset]],
        started: datetime,
        exc: SendError,
    ) -> None:
        """Record the failed association as the attempt of every entry not yet recorded."""
        remaining = {d.delivery_id for d in todo}
        for due, ds in loaded:
            if due.delivery_id not in remaining:
                continue
            fallback = _comprehensive_fallback(due, ds, exc, self._results)
            self._record(todo, due, started, _describe(exc, fallback), exc.retryable, fallback)

    def _record(
        self,
        todo: list[DueDelivery],
        due: DueDelivery,
        started: datetime,
        error: str | None,
        retryable: bool,
        fallback: tuple[str, str] | None = None,
    ) -> None:
        ok = error is None
        state = record_attempt(
            self._sessions,
            due.delivery_id,
            started_at=started,
            ok=ok,
            error=error,
            retryable=retryable or fallback is not None,
            policy=self._policy,
            owner=self._owner,
        )
        todo[:] = [d for d in todo if d.delivery_id != due.delivery_id]
        if fallback is not None and state is DeliveryState.PENDING:
            replace_payload(
                self._sessions,
                due.delivery_id,
                payload_path=fallback[1],
                sop_instance_uid=fallback[0],
            )
        with self._lock:
            self._counts[state.value] += 1
        log.log(
            logging.INFO if state is DeliveryState.SENT else logging.WARNING,
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


def _describe(exc: SendError, fallback: tuple[str, str] | None) -> str:
    if fallback is None:
        return str(exc)
    return f"{exc}; falling back to Comprehensive SR {fallback[0]}"


def deliver_due(
    sessions: sessionmaker[Session],
    settings: DeliverySettings,
    results: Spool,
    tls_contexts: Mapping[str, ssl.SSLContext] | None = None,
    *,
    owner: str = "deliver-once",
) -> dict[str, int]:
    """Run one sender round and wait for it: every due entry is tried once.

    Returns
    -------
    dict
        Counts of the entries' resulting states.
    """
    sender = Sender(sessions, settings, results, owner, tls_contexts)
    sender.run_round()
    while not sender.idle():
        time.sleep(0.02)
    sender.stop()
    return sender.take_counts()


def _comprehensive_fallback(
    due: DueDelivery, original: Dataset, exc: SendError, results: Spool
) -> tuple[str, str] | None:
    """Write the Comprehensive SR variant of a refused 3D SR; return ``(sop_uid, path)``.

    The variant is written the way every result object is (:meth:`Spool.write`: temporary
    name, fsync, atomic rename), at the spool path its UIDs give.
    """
    if exc.refused_sop_class != SRStorageClass.COMPREHENSIVE_3D.value or due.kind != "SR":
        return None
    if str(original.get("SOPClassUID", "")) != SRStorageClass.COMPREHENSIVE_3D.value:
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
    return sop_uid, results.relative(target)
