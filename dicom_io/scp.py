"""The DICOM listener: Storage SCP and Verification SCP (pynetdicom).

Implements PS3.4 Annex A (Verification) and Annex B (Storage) over PS3.7 C-ECHO/C-STORE and
the PS3.8 upper layer. "Ack means durable": a C-STORE gets ``0x0000`` only after the instance
is on disk (fsync + link + directory fsync, :class:`dicom_io.spool.Spool`) *and* the sink
committed its row; otherwise the sender receives a failure status and will retry.

While a C-STORE request arrives, its data set is streamed into a temporary spool file
(:mod:`dicom_io.wire`, :mod:`dicom_io.incoming`): preamble and file meta (built from the
command set and the presentation context) first, then the fragments as received. A write
error there (``ENOSPC`` included) is kept and answered in step 1; a transfer cut short leaves
no file. Then, in order (:func:`handle_store`):

1. parse the data set -- every element but the pixel bytes, which are skipped
   (:func:`dicom_io.wire.read_data_set`; failure: ``0xC210`` cannot understand);
2. validate Study/Series/SOP Instance UIDs (PS3.5 9.1 syntax), SOP Instance UID equal to
   the command's Affected SOP Instance UID and SOP Class UID equal to the presentation
   context's abstract syntax (failure: ``0xA900`` data set does not match SOP class);
3. place the received bytes as a PS3.10 file, in the received transfer syntax, through the
   spool (any write error: ``0xA700`` out of resources; nothing half-written is left). A file
   already spooled for the SOP instance is never replaced: identical bytes are dropped, other
   bytes are kept aside (:meth:`Spool.place_incoming`, :meth:`Spool.place_encoded`);
4. ``sink.store(...)``; if it raises, the file this request created is removed (the original
   of a duplicate is never touched) and the answer is ``0xA700``;
5. ``0x0000``.

Before step 3 the free space of the spool's file system is checked: below
``min_free_bytes`` (plus the size of the data set) the answer is ``0xA700`` and nothing is
kept. (Below the reserve a data set is not streamed at all: it stays in memory and is never
written.) So the database, logs and quarantine keep room to work.

Association policy (PS3.8 9.3.4 reject reasons): a calling AE title outside
``allowed_calling_aes`` -- or allowed only from other source addresses, see
:mod:`dicom_io.peers` -- is rejected (rejected-permanent, service-user, reason 3); a called AE
title other than ours is rejected (reason 7); above ``max_associations`` concurrent
associations new ones are rejected (rejected-transient, service-provider presentation,
reason 2). Unsupported SOP classes are refused at presentation-context negotiation. With
``tls`` set, the listener only speaks DICOM over TLS (PS3.15 B.9, see :mod:`dicom_io.tls`).

Hostile and broken peers (:class:`_GuardedServer`): no peer holds a slot for long.

* one source address holds at most ``max_associations_per_peer`` connections; a further
  connection from it waits up to 0.25 s for one of them to end (a sender re-associating
  right after a release), else it is answered with A-ASSOCIATE-RJ (rejected-transient,
  service-provider presentation, local-limit-exceeded) and closed without taking a slot;
* a PDU (or the A-ASSOCIATE-RQ) that is not complete ``network_timeout_s`` after the last
  complete PDU -- a stalled or trickling sender -- ends the association: an established one
  with A-ABORT (service-provider, PS3.8 9.3.8), then the connection is closed and its slot
  freed. A handler still working for the peer (C-STORE being written) is never cut short;
* every accepted socket also has a read/write timeout of ``2 * network_timeout_s`` (the
  TLS handshake, which runs in the connection's thread, not the accept loop, included);
* a connection that ends before a valid A-ASSOCIATE-RQ (malformed AE title bytes, any
  undecodable PDU, A-ABORT or close instead of a request) frees its slot at once instead of
  after ``acse_timeout_s``.

Audit hook: ``on_event(kind, detail)`` is called (from pynetdicom threads) with ``kind`` one of
:class:`ListenerEventKind` and a JSON-serialisable ``detail`` dict holding only technical
identifiers (AE titles, peer host, UIDs, status) -- never patient names or IDs. The callback
must be quick and thread-safe; exceptions it raises are logged and swallowed. Every event is
also logged (INFO for associations, WARNING for failures) with the detail in ``extra``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicom_io import statuses, wire
from dicom_io.ae_titles import validate_ae_title
from dicom_io.incoming import IncomingFile
from dicom_io.peers import CallingAePolicy
from dicom_io.sop_classes import (
    STORAGE_SOP_CLASSES,
    STORAGE_TRANSFER_SYNTAXES,
    VERIFICATION_SOP_CLASS,
)
from dicom_io.spool import Placed, Spool, SpoolError
from dicom_io.tls import ServerTls
from dicom_io.uids import clean_uid

logger = logging.getLogger(__name__)

ERROR_COMMENT_MAX_CHARS = 64
"""Maximum length of (0000,0902) Error Comment (VR LO)."""

_LOCK_STRIPES = 64


class SinkUnavailable(Exception):  # noqa: N818 -- name fixed by the contract
    """Raised by an :class:`InstanceSink` when it cannot commit (e.g. database down).

    The listener answers ``0xA700`` (out of resources) so the sender retries later.
    """


class ListenerEventKind(StrEnum):
    """Closed vocabulary of listener audit events passed to ``on_event``."""

    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REJECTED = "association_rejected"
    ASSOCIATION_ABORTED = "association_aborted"
    CONTEXTS_REJECTED = "presentation_contexts_rejected"
    STORE_FAILED = "store_failed"


EventCallback = Callable[[str, dict[str, Any]], None]
"""Signature of the ``on_event`` audit hook: ``(kind, detail)``."""


@dataclass(frozen=True)
class ListenerConfig:
    """Listener settings (validated on construction).

    Parameters
    ----------
    ae_title
        Our (called) AE title.
    host
        Address to bind.
    port
        TCP port; 0 binds an ephemeral port (see :attr:`Listener.port`).
    allowed_calling_aes
        Calling AE titles allowed to associate, each optionally bound to a source address or
        network (``"PACS@10.1.2.3"``, see :mod:`dicom_io.peers`); empty accepts any.
    max_associations
        Maximum concurrent associations.
    max_associations_per_peer
        Maximum concurrent connections from one source address (capped at
        ``max_associations``); further ones are refused at once.
    max_pdu_bytes
        Maximum PDU length we receive (PS3.8 D.3.3.2.1); 0 means unlimited.
    acse_timeout_s, dimse_timeout_s, network_timeout_s
        Association negotiation, DIMSE message and network timeouts in seconds. A PDU not
        complete ``network_timeout_s`` after the previous one (idle, stalled or trickling
        peer) ends the association; sockets time out after ``2 * network_timeout_s``.
    min_free_bytes
        Free space the spool's file system must keep; below it C-STOREs get ``0xA700``.
    tls
        Serve DICOM over TLS with these settings; None serves plain TCP.
    """

    ae_title: str
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aes: tuple[str, ...] = ()
    max_associations: int = 16
    max_associations_per_peer: int = 8
    max_pdu_bytes: int = 0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    min_free_bytes: int = 0
    tls: ServerTls | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "ae_title"))
        policy = CallingAePolicy.from_entries(self.allowed_calling_aes)
        object.__setattr__(self, "allowed_calling_aes", tuple(str(r) for r in policy.rules))
        if self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {self.min_free_bytes}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, got {self.port}")
        if self.max_associations < 1:
            raise ValueError(f"max_associations must be >= 1, got {self.max_associations}")
        if self.max_associations_per_peer < 1:
            raise ValueError(
                f"max_associations_per_peer must be >= 1, got {self.max_associations_per_peer}"
            )
        if self.max_pdu_bytes != 0 and self.max_pdu_bytes < 4096:
            raise ValueError(f"max_pdu_bytes must be 0 or >= 4096, got {self.max_pdu_bytes}")
        for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def per_peer_limit(self) -> int:
        """The effective per-source-address connection limit."""
        return min(self.max_associations_per_peer, self.max_associations)


@dataclass(frozen=True)
class ReceivedInstance:
    """One instance durably written to the spool, handed to the sink."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    patient_id: str | None
    calling_ae: str
    peer_host: str
    path: Path
    size_bytes: int
    transfer_syntax_uid: str
    differs_from_spooled: bool = False
    """The spool held other bytes under this SOP instance's name: ``path`` is a kept-aside copy."""


class InstanceSink(Protocol):
    """Where the listener records received instances (the daemon's database adapter)."""

    def store(self, instance: ReceivedInstance) -> bool:
        """Commit the instance row.

        Returns
        -------
        bool
            True when new, False when the SOP instance was already known (duplicate).

        Raises
        ------
        SinkUnavailable
            When the row cannot be committed; the listener answers ``0xA700``.
        """
        ...


class _StripedLocks:
    """Serialise handling of the same SOP Instance UID across associations."""

    def __init__(self, stripes: int = _LOCK_STRIPES) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def for_key(self, key: str) -> threading.Lock:
        return self._locks[hash(key) % len(self._locks)]


@dataclass
class _Emitter:
    callback: EventCallback | None = None

    def __call__(self, kind: ListenerEventKind, detail: dict[str, Any]) -> None:
        level = logging.WARNING if kind is ListenerEventKind.STORE_FAILED else logging.INFO
        logger.log(level, "listener event: %s", kind.value, extra={"event": kind.value, **detail})
        if self.callback is None:
            return
        try:
            self.callback(kind.value, detail)
        except Exception:
            logger.exception("on_event callback failed", extra={"event": kind.value})


@dataclass
class StoreContext:
    """Dependencies of :func:`handle_store` (bound as handler args)."""

    spool: Spool
    sink: InstanceSink
    emit: Callable[[ListenerEventKind, dict[str, Any]], None] = field(default_factory=_Emitter)
    locks: _StripedLocks = field(default_factory=_StripedLocks)
    min_free_bytes: int = 0


def _status(code: int, comment: str | None = None) -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    if comment:
        rsp.ErrorComment = comment[:ERROR_COMMENT_MAX_CHARS]
    return rsp


def _peer(event: evt.Event) -> tuple[str, str]:
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    # Before negotiation (EVT_REQUESTED) only the A-ASSOCIATE-RQ primitive has the title.
    title = primitive.calling_ae_title if primitive is not None else None
    return str(title or requestor.ae_title).strip(), str(requestor.address)


def _text_or_none(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def handle_store(event: evt.Event, ctx: StoreContext) -> Dataset:
    """Handle one C-STORE request (PS3.4 B.2, PS3.7 9.1.1); never raises.

    Parameters
    ----------
    event
        pynetdicom ``EVT_C_STORE`` event.
    ctx
        Spool, sink, audit emitter and per-UID locks.

    Returns
    -------
    Dataset
        Response status (``Status`` and, on failure, ``ErrorComment``).
    """
    calling_ae, peer_host = _peer(event)
    detail: dict[str, Any] = {"calling_ae": calling_ae, "peer_host": peer_host}

    def fail(code: int, reason: str) -> Dataset:
        ctx.emit(ListenerEventKind.STORE_FAILED, {**detail, "status": code, "reason": reason})
        return _status(code, reason)

    try:
        return _handle_store(event, ctx, detail, fail)
    except Exception:  # a bug must not reach pynetdicom (which would answer 0xC211)
        logger.exception("unexpected error in C-STORE handler", extra=detail)
        return fail(statuses.PROCESSING_FAILURE, "internal error")


def _handle_store(
    event: evt.Event,
    ctx: StoreContext,
    detail: dict[str, Any],
    fail: Callable[[int, str], Dataset],
) -> Dataset:
    request = cast(C_STORE, event.request)
    calling_ae: str = detail["calling_ae"]
    context_sop_class = str(event.context.abstract_syntax)
    transfer_syntax = str(event.context.transfer_syntax)
    detail["sop_instance_uid"] = str(request.AffectedSOPInstanceUID or "")

    # 1. decode (the data set was streamed to a spool file, or is in memory)
    incoming = wire.incoming_of(request)
    if incoming is not None and incoming.error is not None:
        logger.error("spool write failed while receiving: %s", incoming.error, extra=detail)
        reason = "out of disk space" if incoming.out_of_space else "spool write failed"
        return fail(statuses.OUT_OF_RESOURCES, reason)
    try:
        ds = _received_data_set(event, incoming, transfer_syntax)
        sop_class = clean_uid(ds.get("SOPClassUID"))
        sop_uid = clean_uid(ds.get("SOPInstanceUID"))
        study_uid = clean_uid(ds.get("StudyInstanceUID"))
        series_uid = clean_uid(ds.get("SeriesInstanceUID"))
        modality = _text_or_none(ds, "Modality")
        patient_id = _text_or_none(ds, "PatientID")
    except Exception as exc:
        logger.debug("C-STORE data set decode failed", exc_info=True, extra=detail)
        return fail(statuses.CANNOT_UNDERSTAND, f"cannot decode data set: {type(exc).__name__}")

    # 2. validate
    if sop_class != context_sop_class:
        return fail(
            statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPClassUID missing or differs from presentation context",
        )
    if sop_uid is None or sop_uid != str(request.AffectedSOPInstanceUID).strip("\x00 "):
        return fail(
            statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPInstanceUID missing, invalid or differs from command",
        )
    if study_uid is None:
        return fail(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID missing/invalid")
    if series_uid is None:
        return fail(statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SeriesInstanceUID missing/invalid")
    detail["sop_instance_uid"] = sop_uid

    # 3. write, 4. commit -- serialised per SOP Instance UID so that concurrent duplicates
    # cannot remove a file another association has just committed.
    path = ctx.spool.path_for(study_uid, series_uid, sop_uid)
    raw = request.DataSet
    if ctx.min_free_bytes and not _has_room(ctx, raw, incoming):
        logger.error(
            "spool file system below its free-space reserve",
            extra={**detail, "min_free_bytes": ctx.min_free_bytes},
        )
        return fail(statuses.OUT_OF_RESOURCES, "out of disk space")
    with ctx.locks.for_key(sop_uid):
        try:
            placed = _place(event, ctx, incoming, path, calling_ae)
        except SpoolError as exc:
            reason = "out of disk space" if exc.out_of_space else "spool write failed"
            logger.error("spool write failed: %s", exc, extra=detail)
            return fail(statuses.OUT_OF_RESOURCES, reason)
        size = placed.size
        instance = ReceivedInstance(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            modality=modality,
            patient_id=patient_id,
            calling_ae=calling_ae,
            peer_host=detail["peer_host"],
            path=placed.path,
            size_bytes=size,
            transfer_syntax_uid=transfer_syntax,
            differs_from_spooled=placed.kept_aside,
        )
        try:
            is_new = ctx.sink.store(instance)
        except SinkUnavailable as exc:
            _remove_if_new(placed.path, not placed.created)
            logger.error("instance sink unavailable: %s", exc, extra=detail)
            return fail(statuses.OUT_OF_RESOURCES, "cannot record instance, retry later")
        except Exception:
            _remove_if_new(placed.path, not placed.created)
            logger.exception("instance sink failed", extra=detail)
            return fail(statuses.OUT_OF_RESOURCES, "cannot record instance, retry later")

    logger.debug(
        "instance stored",
        extra={**detail, "duplicate": not is_new, "size_bytes": size, "path": str(path)},
    )
    return _status(statuses.SUCCESS)


def _received_data_set(
    event: evt.Event, incoming: IncomingFile | None, transfer_syntax: str
) -> Dataset:
    """Parse the received data set without copying its pixels (:func:`wire.read_data_set`)."""
    if incoming is not None:
        with incoming.path.open("rb") as fh:
            fh.seek(incoming.data_offset)
            return wire.read_data_set(fh, transfer_syntax)
    raw = cast(C_STORE, event.request).DataSet
    if isinstance(raw, BytesIO):
        raw.seek(0)
        return wire.read_data_set(raw, transfer_syntax)
    return event.dataset


def _has_room(ctx: StoreContext, raw: object, incoming: IncomingFile | None) -> bool:
    """Return True when the data set leaves ``min_free_bytes`` free on the spool's disk.

    A streamed data set is already on disk: the reserve must still be free after it.
    """
    free = ctx.spool.free_bytes()
    if incoming is not None:
        return free >= ctx.min_free_bytes
    incoming_bytes = raw.getbuffer().nbytes if isinstance(raw, BytesIO) else 0
    return free >= ctx.min_free_bytes + incoming_bytes


def _place(
    event: evt.Event, ctx: StoreContext, incoming: IncomingFile | None, path: Path, ae: str
) -> Placed:
    """Place the received bytes at ``path`` (streamed file, in-memory bytes, or re-encoded)."""
    if incoming is not None:
        return ctx.spool.place_incoming(incoming, path)
    file_meta = event.file_meta
    file_meta.SourceApplicationEntityTitle = ae or "UNKNOWN"
    raw = cast(C_STORE, event.request).DataSet
    if isinstance(raw, BytesIO):
        with raw.getbuffer() as buffer:
            return ctx.spool.place_encoded(file_meta, buffer, path)
    # chunked receive mode or unusual primitive: re-encode the decoded data set
    return ctx.spool.place(event.dataset, file_meta, path)


def _remove_if_new(path: Path, existed_before: bool) -> None:
    if existed_before:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.exception("cannot remove uncommitted spool file", extra={"path": str(path)})


def handle_echo(event: evt.Event) -> int:
    """Answer C-ECHO (PS3.4 Annex A, PS3.7 9.1.5) with success."""
    return statuses.SUCCESS


def handle_conn_open(event: evt.Event) -> None:
    """Set ``TCP_NODELAY`` on an accepted connection (small PDUs/responses are not delayed)."""
    try:
        dul_socket = event.assoc.dul.socket
        sock = None if dul_socket is None else dul_socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        logger.debug("cannot set TCP_NODELAY", exc_info=True)


def handle_conn_close(event: evt.Event) -> None:
    """Remove the spool file of a data set cut short by the end of the connection."""
    wire.discard_incoming(event.assoc)


def _rejection_reason(event: evt.Event, config: ListenerConfig, policy: CallingAePolicy) -> str:
    calling_ae, peer_host = _peer(event)
    primitive = event.assoc.requestor.primitive
    called_ae = "" if primitive is None else str(primitive.called_ae_title or "").strip()
    if called_ae and called_ae != config.ae_title:
        return "called AE title not recognized"
    refused = policy.rejection(calling_ae, peer_host)
    if refused is not None:
        return refused
    return "local limit exceeded or negotiation failure"


REJECT_PERMANENT = 0x01
"""A-ASSOCIATE-RJ result: rejected-permanent (PS3.8 9.3.4)."""
SOURCE_SERVICE_USER = 0x01
"""A-ASSOCIATE-RJ source: DICOM UL service-user (PS3.8 9.3.4)."""
REASON_CALLING_AE_NOT_RECOGNIZED = 0x03
"""A-ASSOCIATE-RJ reason (source service-user): calling-AE-title-not-recognized."""


def _limit_reject_pdu() -> bytes:
    pdu = A_ASSOCIATE_RJ()
    pdu.result = REJECT_TRANSIENT
    pdu.source = SOURCE_SERVICE_PROVIDER_PRESENTATION
    pdu.reason_diagnostic = REASON_LOCAL_LIMIT_EXCEEDED
    return bytes(pdu.encode())


def _provider_abort_pdu() -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = ABORT_SOURCE_SERVICE_PROVIDER
    pdu.reason_diagnostic = 0x00  # reason-not-specified
    return bytes(pdu.encode())


REJECT_TRANSIENT = 0x02
"""A-ASSOCIATE-RJ result: rejected-transient (PS3.8 9.3.4)."""
SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
"""A-ASSOCIATE-RJ source: DICOM UL service-provider, presentation related (PS3.8 9.3.4)."""
REASON_LOCAL_LIMIT_EXCEEDED = 0x02
"""A-ASSOCIATE-RJ reason (source 3): local-limit-exceeded (PS3.8 9.3.4)."""
ABORT_SOURCE_SERVICE_PROVIDER = 0x02
"""A-ABORT source: DICOM UL service-provider (PS3.8 9.3.8)."""
LIMIT_REJECT_PDU = _limit_reject_pdu()
"""A-ASSOCIATE-RJ sent to a connection above the per-peer limit."""
PROVIDER_ABORT_PDU = _provider_abort_pdu()
"""A-ABORT sent when a stalled established association is ended."""

_REFUSE_DRAIN_S = 1.0
"""How long a refused connection is read (and discarded) after the A-ASSOCIATE-RJ."""
_ADMIT_GRACE_S = 0.25
"""How long a connection above its peer's limit waits for one of the peer's slots to free."""
_STALL_GRACE_S = 0.5
"""How long past its network timeout an association may take to end by itself."""
_POLL_S = 0.25
"""Accept-loop poll interval; the stall watchdog runs once per poll."""
_BEFORE_REQUEST = frozenset({"Sta2", "Sta13"})
"""PS3.8 states of an acceptor that has not (successfully) received an A-ASSOCIATE-RQ."""
_NOTHING_TO_ABORT = frozenset({"Sta1", "Sta2", "Sta13"})
"""PS3.8 states in which a stalled connection is closed without an A-ABORT (cf. AA-2)."""


class _BusyAssociations:
    """Associations whose handler is working for the peer (never ended as stalled)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, assoc: Any) -> None:
        with self._lock:
            self._busy.add(assoc)

    def discard(self, assoc: Any) -> None:
        with self._lock:
            self._busy.discard(assoc)

    def __contains__(self, assoc: object) -> bool:
        with self._lock:
            return assoc in self._busy


def handle_store_marked(event: evt.Event, ctx: StoreContext, busy: _BusyAssociations) -> Dataset:
    """:func:`handle_store`, with the association marked busy while it runs."""
    busy.add(event.assoc)
    try:
        return handle_store(event, ctx)
    finally:
        busy.discard(event.assoc)


def release_unrequested(event: evt.Event) -> None:
    """Free at once the slot of a connection that ended before a valid A-ASSOCIATE-RQ.

    Bound to ``EVT_FSM_TRANSITION``. When the upper-layer state machine (PS3.8 9.2) of an
    acceptor goes idle (Sta1) from "awaiting A-ASSOCIATE-RQ" (Sta2) or "awaiting transport
    close" (Sta13) without a request -- an undecodable PDU such as malformed AE title bytes
    (AA-1), an A-ABORT, a closed or timed-out connection -- pynetdicom's acceptor thread
    would still wait ``acse_timeout_s`` for the request. An empty item on the DUL's
    user queue ends that wait now (it reads as "no request").
    """
    if event.next_state != "Sta1" or event.current_state not in _BEFORE_REQUEST:
        return
    assoc = event.assoc
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(cast(Any, None))


class _ConnectionHandler(RequestHandler):
    """pynetdicom's request handler, kept alive until its association ends.

    The server's per-peer accounting then follows the connection's lifetime exactly.
    """

    def handle(self) -> None:
        """Create, start and wait for the acceptor association (as ``RequestHandler``)."""
        assoc = self._create_association()
        wire.install(assoc, cast(_GuardedServer, self.server).policy.open_incoming)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        try:
            assoc.start()
            assoc.join()
        finally:
            wire.uninstall(assoc)


@dataclass(frozen=True)
class _ConnectionPolicy:
    per_peer_limit: int
    network_timeout_s: float
    busy: _BusyAssociations
    on_refused: Callable[[str], None]
    open_incoming: wire.OpenIncoming | None = None

    @property
    def socket_timeout_s(self) -> float:
        return 2 * self.network_timeout_s


class _GuardedServer(ThreadedAssociationServer):
    """Association server that no peer can starve (PS3.8 upper layer over TCP).

    Extends pynetdicom's server through its documented hooks (``AE.make_server`` with a
    server class and request handler; ``socketserver`` ``get_request``, ``process_request``
    and ``service_actions``): socket timeouts, the TLS handshake in the connection's own
    thread, a per-source-address connection limit and a watchdog for stalled PDUs.
    """

    daemon_threads = True
    block_on_close = False  # stop() aborts what is left; never wait on a stalled peer

    def __init__(self, *args: Any, policy: _ConnectionPolicy, **kwargs: Any) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._per_peer: Counter[str] = Counter()
        self._expired_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        kwargs["request_handler"] = _ConnectionHandler
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept; give the socket its timeout; defer the TLS handshake to the thread."""
        listening = cast(socket.socket, self.socket)
        sock, address = listening.accept()
        sock.settimeout(self.policy.socket_timeout_s)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a thread; above the per-peer limit, see :meth:`_overflow`."""
        host = str(client_address[0])
        if not self._admit(host):
            threading.Thread(
                target=self._overflow, args=(request, client_address), daemon=True
            ).start()
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(host)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run the TLS handshake (bounded by the socket timeout), then the association."""
        try:
            if isinstance(request, ssl.SSLSocket) and not self._handshake(request):
                return
            super().process_request_thread(request, client_address)
        finally:
            self._release(str(client_address[0]))

    def service_actions(self) -> None:
        """Once per accept-loop poll: end associations stalled past the network timeout."""
        super().service_actions()
        now = time.monotonic()
        for assoc in self.active_associations:
            if assoc in self.policy.busy or not assoc.dul.idle_timer_expired():
                self._expired_since.pop(assoc, None)
                continue
            since = self._expired_since.setdefault(assoc, now)
            if now - since >= _STALL_GRACE_S:
                _end_stalled(assoc)
                self._expired_since[assoc] = float("inf")  # once

    def _admit(self, host: str) -> bool:
        with self._lock:
            if self._per_peer[host] >= self.policy.per_peer_limit:
                return False
            self._per_peer[host] += 1
            return True

    def _overflow(self, request: Any, client_address: Any) -> None:
        """Serve a connection above the per-peer limit if a slot of its peer frees soon.

        A sender that opens its next association right after a release may arrive before
        the previous connection's thread has ended; it waits up to ``_ADMIT_GRACE_S``.
        Otherwise it is refused (:meth:`_refuse`).
        """
        host = str(client_address[0])
        deadline = time.monotonic() + _ADMIT_GRACE_S
        while time.monotonic() < deadline:
            time.sleep(0.01)
            if self._admit(host):
                self.process_request_thread(request, client_address)
                return
        self._refuse(request, host, plain=not isinstance(request, ssl.SSLSocket))

    def _release(self, host: str) -> None:
        with self._lock:
            self._per_peer[host] -= 1
            if self._per_peer[host] <= 0:
                del self._per_peer[host]

    def _handshake(self, request: ssl.SSLSocket) -> bool:
        try:
            request.do_handshake()
        except OSError as exc:
            logger.info("TLS handshake failed: %s", type(exc).__name__)
            self.shutdown_request(request)
            return False
        return True

    def _refuse(self, request: socket.socket, host: str, plain: bool) -> None:
        """A-ASSOCIATE-RJ (transient, local-limit-exceeded), drain briefly, close."""
        self.policy.on_refused(host)
        try:
            request.settimeout(_REFUSE_DRAIN_S)
            if plain:  # a TLS peer is not worth a handshake: it only sees the close
                request.sendall(LIMIT_REJECT_PDU)
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _REFUSE_DRAIN_S
            while time.monotonic() < deadline and request.recv(4096):
                pass
        except OSError:
            pass
        finally:
            request.close()


def _end_stalled(assoc: Any) -> None:
    """End an association whose PDU has not completed in time (A-ABORT, then close)."""
    logger.warning(
        "ending a stalled association (network timeout)",
        extra={"state": str(assoc.dul.state_machine.current_state), **_peer_of(assoc)},
    )
    _end_connection(assoc)


def _end_connection(assoc: Any) -> None:
    """Send A-ABORT (service-provider, PS3.8 9.3.8) if associated, then shut the socket.

    Shutting the socket down wakes pynetdicom's reader blocked in ``recv``; the state
    machine then sees the transport closed (Evt17) and frees the slot.
    """
    dul_socket = assoc.dul.socket
    sock = None if dul_socket is None else dul_socket.socket
    if sock is None:
        return
    # pynetdicom may already have marked it not established (its own idle abort is queued
    # behind the blocked read), so ask the state machine: Sta1/Sta2/Sta13 have nothing to abort.
    state = str(assoc.dul.state_machine.current_state)
    if state not in _NOTHING_TO_ABORT and not isinstance(sock, ssl.SSLSocket):
        with contextlib.suppress(OSError):
            sock.send(PROVIDER_ABORT_PDU, socket.MSG_DONTWAIT)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Listener:
    """Storage + Verification SCP running in background threads.

    Parameters
    ----------
    config
        Network and association policy.
    spool
        Where received files are written.
    sink
        Records received instances; see :class:`InstanceSink`.
    on_event
        Optional audit hook ``(kind, detail)``; see the module docstring.
    """

    def __init__(
        self,
        config: ListenerConfig,
        spool: Spool,
        sink: InstanceSink,
        *,
        on_event: EventCallback | None = None,
    ) -> None:
        self.config = config
        self._emit = _Emitter(on_event)
        self._policy = CallingAePolicy.from_entries(config.allowed_calling_aes)
        self._store_ctx = StoreContext(
            spool=spool, sink=sink, emit=self._emit, min_free_bytes=config.min_free_bytes
        )
        self._busy = _BusyAssociations()
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None

    def _make_ae(self) -> AE:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.maximum_pdu_size = cfg.max_pdu_bytes
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        # Calling AE titles (and their source addresses) are checked in _on_requested.
        ae.require_calling_aet = []
        ae.require_called_aet = True
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
        ae.add_supported_context(
            VERIFICATION_SOP_CLASS, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        return ae

    def start(self) -> None:
        """Bind and start serving in background threads (non-blocking).

        Raises
        ------
        RuntimeError
            If already started.
        OSError
            If the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("listener already started")
        ae = self._make_ae()
        ssl_context = None if self.config.tls is None else self.config.tls.context()
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, handle_conn_open),
            (evt.EVT_CONN_CLOSE, handle_conn_close),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store_marked, [self._store_ctx, self._busy]),
            (evt.EVT_FSM_TRANSITION, release_unrequested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        server = ae.make_server(
            (self.config.host, self.config.port),
            evt_handlers=handlers,
            ssl_context=ssl_context,
            server_class=_GuardedServer,
            policy=_ConnectionPolicy(
                per_peer_limit=self.config.per_peer_limit,
                network_timeout_s=self.config.network_timeout_s,
                busy=self._busy,
                on_refused=self._on_refused,
                open_incoming=self._open_incoming,
            ),
        )
        ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": _POLL_S},
            name="radflag-listener",
            daemon=True,
        ).start()
        self._ae, self._server = ae, server
        logger.info(
            "listener started",
            extra={
                "ae_title": self.config.ae_title,
                "host": self.config.host,
                "port": self.port,
                "tls": ssl_context is not None,
            },
        )

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful when ``config.port`` is 0)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    @property
    def active_associations(self) -> int:
        """Number of associations currently being served."""
        return 0 if self._server is None else len(self._server.active_associations)

    def stop(self, grace_s: float = 30) -> None:
        """Stop accepting, let in-flight associations finish (up to ``grace_s``), then abort.

        Parameters
        ----------
        grace_s
            Seconds to wait for running associations before aborting them (A-ABORT).
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + max(grace_s, 0.0)
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:  # A-ABORT and close; never wait on a reader blocked in recv
            logger.warning("aborting association at shutdown", extra={"peer": _peer_of(assoc)})
            _end_connection(assoc)
        for assoc in remaining:
            assoc.join(timeout=5)
        logger.info("listener stopped", extra={"aborted": len(remaining)})

    def _open_incoming(
        self, assoc: Any, context_id: int, message: C_STORE_RQ
    ) -> IncomingFile | None:
        """Open the spool file a C-STORE data set is streamed to (None: keep it in memory).

        The file meta (PS3.10 7.1) is the one pynetdicom builds from the command set and the
        presentation context, plus our Source Application Entity Title. Below the free-space
        reserve, or when the file cannot be created, the data set stays in memory and the
        handler answers as before (``0xA700`` without writing).
        """
        spool = self._store_ctx.spool
        try:
            if self.config.min_free_bytes and spool.free_bytes() < self.config.min_free_bytes:
                return None
            command = message.command_set
            context = next(cx for cx in assoc.accepted_contexts if cx.context_id == context_id)
            meta = create_file_meta(
                sop_class_uid=command.AffectedSOPClassUID,
                sop_instance_uid=command.AffectedSOPInstanceUID,
                transfer_syntax=context.transfer_syntax[0],
            )
            meta.SourceApplicationEntityTitle = _peer_of(assoc).get("calling_ae") or "UNKNOWN"
            return spool.open_incoming(meta)
        except Exception:  # never in pynetdicom's reader thread: fall back to memory
            logger.debug("cannot stream the data set to the spool", exc_info=True)
            return None

    # -- association policy and notification handlers (audit) --------------------------

    def _on_requested(self, event: evt.Event) -> None:
        """Reject a calling AE title not allowed from the peer's address (PS3.8 9.3.4).

        Runs in the association's thread before pynetdicom's own negotiation; sending
        A-ASSOCIATE-RJ from ``EVT_REQUESTED`` is pynetdicom's documented way to refuse.
        """
        calling_ae, peer_host = _peer(event)
        if self._policy.rejection(calling_ae, peer_host) is None:
            return
        assoc = event.assoc
        assoc.acse.send_reject(
            REJECT_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNIZED
        )
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        calling_ae, peer_host = _peer(event)
        base = {"calling_ae": calling_ae, "peer_host": peer_host}
        self._emit(ListenerEventKind.ASSOCIATION_ACCEPTED, base)
        rejected = [str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts]
        if rejected:
            self._emit(ListenerEventKind.CONTEXTS_REJECTED, {**base, "abstract_syntaxes": rejected})

    def _on_rejected(self, event: evt.Event) -> None:
        calling_ae, peer_host = _peer(event)
        self._emit(
            ListenerEventKind.ASSOCIATION_REJECTED,
            {
                "calling_ae": calling_ae,
                "peer_host": peer_host,
                "reason": _rejection_reason(event, self.config, self._policy),
            },
        )

    def _on_refused(self, peer_host: str) -> None:
        self._emit(
            ListenerEventKind.ASSOCIATION_REJECTED,
            {
                "calling_ae": "",
                "peer_host": peer_host,
                "reason": "per-peer association limit exceeded",
            },
        )

    def _on_aborted(self, event: evt.Event) -> None:
        calling_ae, peer_host = _peer(event)
        self._emit(
            ListenerEventKind.ASSOCIATION_ABORTED,
            {"calling_ae": calling_ae, "peer_host": peer_host},
        )


def _peer_of(assoc: Any) -> Mapping[str, str]:
    try:
        return {"calling_ae": str(assoc.requestor.ae_title), "peer_host": assoc.requestor.address}
    except AttributeError:
        return {}
