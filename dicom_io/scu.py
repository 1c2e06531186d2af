"""C-STORE client: send result objects to a destination (PS3.4 Annex B, PS3.7 9.1.1).

All datasets go over one association. Each dataset is sent in its own transfer syntax (from
``file_meta``; Explicit VR Little Endian when absent); for native syntaxes Implicit VR Little
Endian is proposed as a fallback (PS3.5 A.1, the default every SCP supports). Errors become
:class:`SendError` with ``retryable`` telling whether retrying later may help; the caller's
state machine decides what to do.

With an :class:`ssl.SSLContext` the association runs over TLS (PS3.15 B.9, see
:mod:`dicom_io.tls`); the server certificate is verified against ``dest.host``. A failed
handshake (bad or unknown certificate) is retryable: it is usually a configuration matter
fixed on one side without touching the queued result.
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from dicom_io import statuses
from dicom_io.ae_titles import validate_ae_title

logger = logging.getLogger(__name__)

MAX_PRESENTATION_CONTEXTS = 128
"""Upper bound on presentation contexts per association (PS3.8 9.3.2.2, odd IDs 1-255)."""

_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

SOP_CLASS_NOT_SUPPORTED = 0x0122
"""C-STORE status "Refused: SOP Class not supported" (PS3.7 C.4.1.1.4)."""


@dataclass(frozen=True)
class Destination:
    """A remote Storage SCP.

    Parameters
    ----------
    ae_title
        Called AE title (1-16 characters).
    host
        Host name or address.
    port
        TCP port (1-65535).
    """

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", validate_ae_title(self.ae_title, "ae_title"))
        if not self.host.strip():
            raise ValueError("host must not be empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535, got {self.port}")


class SendError(Exception):
    """Sending failed.

    Parameters
    ----------
    message
        Description (no patient identifiers).
    retryable
        True when the same send may succeed later (connection refused, timeout, abort,
        transient rejection, out-of-resources status); False for permanent refusals
        (permanent rejection, unsupported SOP class, data set errors).
    status
        The failing DIMSE status, when the failure is a C-STORE response.
    refused_sop_class
        The SOP Class UID the destination does not take (no accepted presentation context,
        or status 0x0122 "SOP class not supported"), so the caller may send another class.
    association_failed
        True when the association itself failed (could not connect, timed out, rejected,
        aborted): the remaining objects for this destination cannot go either.
    refused_transfer_syntax
        The transfer syntax the destination did not accept for this SOP class while it
        accepts a native one, so the caller may send the uncompressed object instead.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        refused_sop_class: str | None = None,
        association_failed: bool = False,
        refused_transfer_syntax: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.refused_sop_class = refused_sop_class
        self.association_failed = association_failed
        self.refused_transfer_syntax = refused_transfer_syntax


def _transfer_syntax(ds: Dataset) -> UID:
    file_meta = getattr(ds, "file_meta", None)
    ts = None if file_meta is None else file_meta.get("TransferSyntaxUID")
    return UID(str(ts)) if ts else ExplicitVRLittleEndian


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """Return ``ds`` or a shallow copy carrying a file meta Transfer Syntax UID."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and file_meta.get("TransferSyntaxUID"):
        return ds
    out = copy.copy(ds)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.file_meta = meta
    return out


def _requested_contexts(datasets: Sequence[Dataset]) -> list[tuple[str, list[UID]]]:
    """Presentation contexts to propose (PS3.8 9.3.2.2).

    Per SOP class one context with the native syntaxes (Explicit, then Implicit VR Little
    Endian) and one per compressed syntax in use, so a destination that refuses the
    compressed syntax still accepts the class and gets the uncompressed object instead.
    """
    native: dict[str, list[UID]] = {}
    compressed: list[tuple[str, list[UID]]] = []
    for ds in datasets:
        sop_class = str(ds.get("SOPClassUID", ""))
        if not sop_class:
            raise SendError("a dataset has no SOPClassUID", retryable=False)
        native.setdefault(sop_class, list(_NATIVE_SYNTAXES))
        ts = _transfer_syntax(ds)
        if ts not in _NATIVE_SYNTAXES and (sop_class, [ts]) not in compressed:
            compressed.append((sop_class, [ts]))
    return [*native.items(), *compressed]


def _set_nodelay(event: evt.Event) -> None:
    dul_socket = event.assoc.dul.socket
    sock = None if dul_socket is None else dul_socket.socket
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            logger.debug("cannot set TCP_NODELAY", exc_info=True)


def _associate(
    dest: Destination,
    datasets: Sequence[Dataset],
    calling_ae: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Association:
    ae = AE(ae_title=validate_ae_title(calling_ae, "calling_ae"))
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.maximum_pdu_size = 0
    contexts = _requested_contexts(datasets)
    count = len(contexts)
    if count > MAX_PRESENTATION_CONTEXTS:
        raise SendError(f"too many SOP classes for one association: {count}", retryable=False)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    started = time.monotonic()
    connected: list[bool] = []
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        evt_handlers=[
            (evt.EVT_CONN_OPEN, _set_nodelay),
            (evt.EVT_CONN_OPEN, lambda _event: connected.append(True)),
        ],
        tls_args=None if ssl_context is None else (ssl_context, dest.host),
    )
    if assoc.is_established:
        return assoc
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = None if primitive is None else primitive.result
        reason = "" if primitive is None else f" ({primitive.result_str}, {primitive.reason_str})"
        raise SendError(
            f"association rejected by {where}{reason}",
            retryable=result == 0x02,
            association_failed=True,
        )
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        refused = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        raise SendError(
            f"{where} refused every proposed SOP class/transfer syntax: {refused}",
            retryable=False,
            refused_sop_class=refused[0] if len(refused) == 1 else None,
            association_failed=True,
        )
    how = " (TLS: handshake failed? check certificates)" if ssl_context is not None else ""
    elapsed_s = time.monotonic() - started
    if not connected:
        raise SendError(
            _connect_failure(where, elapsed_s, timeout_s) + how,
            retryable=True,
            association_failed=True,
        )
    if assoc.is_aborted and elapsed_s >= 0.9 * timeout_s:
        raise SendError(
            f"timed out after {elapsed_s:.1f} s waiting for {where} to answer the association "
            f"request{how}",
            retryable=True,
            association_failed=True,
        )
    if assoc.is_aborted:
        raise SendError(
            f"association aborted by {where}{how}", retryable=True, association_failed=True
        )
    raise SendError(
        _connect_failure(where, elapsed_s, timeout_s) + how,
        retryable=True,
        association_failed=True,
    )


def _connect_failure(where: str, elapsed_s: float, timeout_s: float) -> str:
    """Say whether connecting timed out (no answer) or failed at once (refused/unreachable)."""
    if elapsed_s >= 0.9 * timeout_s:
        return f"timed out after {elapsed_s:.1f} s connecting to {where} (no answer)"
    return f"connection to {where} refused or unreachable (after {elapsed_s:.1f} s)"


def status_text(status: int) -> str:
    """Return ``0xXXXX (Category)`` for a DIMSE status (PS3.7 Annex C)."""
    return f"0x{status:04X} ({code_to_category(status)})"


class StoreAssociation:
    """An established association that carries any number of C-STOREs (PS3.7 9.1.1).

    Each :meth:`store` raises :class:`SendError` for its own object; a failure of the
    association itself (abort, timeout) has ``association_failed`` set.
    """

    def __init__(self, assoc: Association, dest: Destination) -> None:
        self._assoc = assoc
        self._dest = dest

    @property
    def is_alive(self) -> bool:
        """True while the association is established."""
        return bool(self._assoc.is_established)

    def accepts(self, sop_class_uid: str, transfer_syntax_uid: str) -> bool:
        """Return True when a context for this class and syntax was accepted."""
        return any(
            str(cx.abstract_syntax) == sop_class_uid
            and str(cx.transfer_syntax[0]) == transfer_syntax_uid
            for cx in self._assoc.accepted_contexts
        )

    def store(self, ds: Dataset) -> int:
        """C-STORE ``ds``; return the (success or warning) status."""
        ds = _with_transfer_syntax(ds)
        sop_class, ts = str(ds.get("SOPClassUID", "")), str(_transfer_syntax(ds))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        name = self._dest.ae_title
        if not self.is_alive:
            raise SendError(
                f"association with {name} ended before {sop_uid} (aborted or timed out)",
                retryable=True,
                association_failed=True,
            )
        if not self.accepts(sop_class, ts):
            native_ok = any(self.accepts(sop_class, str(n)) for n in _NATIVE_SYNTAXES)
            raise SendError(
                f"{name} refused transfer syntax {UID(ts).name} for {UID(sop_class).name}"
                if native_ok
                else f"{name} refused SOP class {UID(sop_class).name} ({sop_class})",
                retryable=False,
                refused_sop_class=None if native_ok else sop_class,
                refused_transfer_syntax=ts if native_ok else None,
            )
        rsp = self._assoc.send_c_store(ds)
        if "Status" not in rsp:
            raise SendError(
                f"no C-STORE response from {name} for {sop_uid} (timed out or aborted)",
                retryable=True,
                association_failed=True,
            )
        status = int(rsp.Status)
        if not statuses.is_success_or_warning(status):
            comment = str(rsp.get("ErrorComment", "")).strip()
            raise SendError(
                f"{name} rejected {sop_uid} with status {status_text(status)}"
                + (f": {comment}" if comment else ""),
                retryable=statuses.is_retryable_failure(status),
                status=status,
                refused_sop_class=sop_class if status == SOP_CLASS_NOT_SUPPORTED else None,
            )
        if status != statuses.SUCCESS:
            logger.warning(
                "C-STORE warning status",
                extra={"status": status, "sop_instance_uid": sop_uid, "dest": name},
            )
        return status


@contextmanager
def open_association(
    dest: Destination,
    datasets: Sequence[Dataset],
    *,
    calling_ae: str = "RADFLAG",
    timeout_s: float = 30,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[StoreAssociation]:
    """Open one association able to carry ``datasets``; release it (or abort) on exit.

    Raises
    ------
    SendError
        With ``association_failed`` when it cannot be established (refused, timed out,
        rejected with reason, or none of the proposed contexts accepted).
    """
    prepared = [_with_transfer_syntax(ds) for ds in datasets]
    assoc = _associate(dest, prepared, calling_ae, timeout_s, ssl_context)
    clean = False
    try:
        yield StoreAssociation(assoc, dest)
        clean = True
    finally:
        if assoc.is_established:
            if clean:
                assoc.release()
            else:
                assoc.abort()


def send_datasets(
    dest: Destination,
    datasets: Sequence[Dataset],
    *,
    calling_ae: str = "RADFLAG",
    timeout_s: float = 30,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Send ``datasets`` to ``dest`` with C-STORE over one association.

    Success and warning statuses (PS3.4 B.2.3) count as stored.

    Parameters
    ----------
    dest
        The Storage SCP.
    datasets
        Instances to send (each with SOP Class/Instance UIDs).
    calling_ae
        Our AE title.
    timeout_s
        Connection, ACSE, DIMSE and network timeout in seconds.
    ssl_context
        Client TLS context (e.g. :meth:`dicom_io.tls.ClientTls.context`); None sends over
        plain TCP.

    Raises
    ------
    SendError
        On connection failure, rejection, abort, unaccepted SOP class or a failure status;
        ``retryable`` says whether a later retry may succeed. Nothing is sent after the
        first failure.
    """
    if not datasets:
        return
    with open_association(
        dest, datasets, calling_ae=calling_ae, timeout_s=timeout_s, ssl_context=ssl_context
    ) as session:
        for ds in datasets:
            session.store(ds)
    logger.info(
        "datasets sent",
        extra={"count": len(datasets), "dest": dest.ae_title, "host": dest.host, "port": dest.port},
    )
