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
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

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
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        refused_sop_class: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.refused_sop_class = refused_sop_class


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


def _requested_contexts(datasets: Sequence[Dataset]) -> dict[str, list[UID]]:
    wanted: dict[str, list[UID]] = {}
    for ds in datasets:
        sop_class = str(ds.get("SOPClassUID", ""))
        if not sop_class:
            raise SendError("a dataset has no SOPClassUID", retryable=False)
        syntaxes = wanted.setdefault(sop_class, [])
        ts = _transfer_syntax(ds)
        candidates = [ts, *_NATIVE_SYNTAXES] if ts in _NATIVE_SYNTAXES else [ts]
        for candidate in candidates:
            if candidate not in syntaxes:
                syntaxes.append(candidate)
    return wanted


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
    count = sum(1 for _ in contexts)
    if count > MAX_PRESENTATION_CONTEXTS:
        raise SendError(f"too many SOP classes for one association: {count}", retryable=False)
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(
        dest.host,
        dest.port,
        ae_title=dest.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)],
        tls_args=None if ssl_context is None else (ssl_context, dest.host),
    )
    if assoc.is_established:
        return assoc
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = None if primitive is None else primitive.result
        reason = "" if primitive is None else f" ({primitive.result_str}, {primitive.reason_str})"
        raise SendError(f"association rejected by {where}{reason}", retryable=result == 0x02)
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        refused = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        raise SendError(
            f"{where} accepted none of the proposed SOP classes/transfer syntaxes: {refused}",
            retryable=False,
            refused_sop_class=refused[0] if len(refused) == 1 else None,
        )
    how = " (TLS: handshake failed? check certificates)" if ssl_context is not None else ""
    if assoc.is_aborted:
        raise SendError(f"association aborted by {where}{how}", retryable=True)
    raise SendError(f"cannot connect to {where}{how}", retryable=True)


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
    prepared = [_with_transfer_syntax(ds) for ds in datasets]
    assoc = _associate(dest, prepared, calling_ae, timeout_s, ssl_context)
    released = False
    try:
        for ds in prepared:
            sop_uid = str(ds.get("SOPInstanceUID", ""))
            try:
                rsp = assoc.send_c_store(ds)
            except ValueError as exc:  # no accepted presentation context for this dataset
                raise SendError(
                    f"{dest.ae_title} did not accept {ds.get('SOPClassUID')} in "
                    f"{_transfer_syntax(ds)}: {exc}",
                    retryable=False,
                    refused_sop_class=str(ds.get("SOPClassUID", "")) or None,
                ) from exc
            if "Status" not in rsp:
                raise SendError(
                    f"no C-STORE response from {dest.ae_title} (timeout or abort)", retryable=True
                )
            status = int(rsp.Status)
            if not statuses.is_success_or_warning(status):
                comment = str(rsp.get("ErrorComment", "")).strip()
                raise SendError(
                    f"{dest.ae_title} answered 0x{status:04X} for {sop_uid}"
                    + (f": {comment}" if comment else ""),
                    retryable=statuses.is_retryable_failure(status),
                    status=status,
                    refused_sop_class=(
                        str(ds.get("SOPClassUID", ""))
                        if status == SOP_CLASS_NOT_SUPPORTED
                        else None
                    ),
                )
            if status != statuses.SUCCESS:
                logger.warning(
                    "C-STORE warning status",
                    extra={"status": status, "sop_instance_uid": sop_uid, "dest": dest.ae_title},
                )
        assoc.release()
        released = True
    finally:
        if not released and assoc.is_established:
            assoc.abort()
    logger.info(
        "datasets sent",
        extra={"count": len(prepared), "dest": dest.ae_title, "host": dest.host, "port": dest.port},
    )
