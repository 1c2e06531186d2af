"""Receiving C-STORE data sets close to the wire (PS3.8 upper layer, PS3.7 C-STORE).

Changes to how pynetdicom receives and answers, installed per association by the listener
(:func:`install`):

* **socket reads** (:class:`WireSocket`): a PDU is read with ``recv_into`` into one buffer
  of its length instead of 4 KiB ``recv`` calls appended to a ``bytearray``, and the reader
  waits on the socket instead of polling it every millisecond; a P-DATA-TF PDU is split into
  its fragments without copying them (:func:`read_pdu`);
* **responses sent at once**: a primitive queued for sending (the C-STORE response) wakes
  the reader's wait (:class:`Waker`) instead of waiting for its next poll;
* **streamed data sets**: the fragments (PS3.8 E.2 PDVs) of a C-STORE request's data set are
  appended to a spool file as they arrive (:class:`dicom_io.incoming.IncomingFile`, opened
  by the listener with the file meta built from the command set), through pynetdicom's own
  chunked-receive path (``_data_set_file``, which pynetdicom closes and unlinks after the
  handler). Nothing is collected in memory and the disk writes overlap the transfer;
* **header parse**: :func:`read_data_set` parses the data set up to Pixel Data, skips the
  pixel bytes and parses what follows, so every element but the pixels is checked as by a
  full decode, without copying megabytes of pixels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import select
import socket
import ssl
import struct
import time
import weakref
from collections.abc import Callable
from io import BytesIO
from typing import Any, BinaryIO, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dsutils import decode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from dicom_io.incoming import IncomingFile

logger = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
_FIRST_READ_BYTES = 1 << 20
"""A PDU read starts with a buffer of at most this size (then doubles as bytes arrive)."""

OpenIncoming = Callable[[Any, int, C_STORE_RQ], IncomingFile | None]
"""``(assoc, context_id, message) -> IncomingFile | None``: where a data set is streamed."""


class Waker:
    """Makes a ``select`` on :meth:`fileno` return now (a connected socket pair).

    The sockets are closed by :meth:`close` or, at the latest, when the waker is collected.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._closer = weakref.finalize(self, _close_sockets, self._reader, self._writer)

    def fileno(self) -> int:
        """Return the descriptor to ``select`` on (readable after :meth:`wake`)."""
        return self._reader.fileno()

    def wake(self) -> None:
        """Make :meth:`fileno` readable (a no-op once closed)."""
        with contextlib.suppress(OSError):  # buffer full (a wake is pending) or closed
            self._writer.send(b"\0")

    def drain(self) -> None:
        """Consume pending wakes."""
        with contextlib.suppress(OSError):  # nothing left (EAGAIN) or closed
            while self._reader.recv(4096):
                pass

    def close(self) -> None:
        """Close both sockets (idempotent)."""
        self._closer()


def _close_sockets(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()


class WakingQueue(queue.Queue[Any]):
    """pynetdicom's DUL provider queue, waking the reader's wait on every ``put``."""

    def __init__(self, waker: Waker) -> None:
        super().__init__()
        self.waker = waker

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item``, then wake the reader so that it sends it now."""
        super().put(item, block, timeout)
        self.waker.wake()


class WireSocket(AssociationSocket):
    """pynetdicom's socket wrapper: fewer reads, waits on the socket instead of sleeping.

    * a PDU is read with ``recv_into`` into a buffer of its length;
    * :attr:`ready` waits up to ``WAIT_S`` for data (``select``) while the reader loop runs
      without its 1 ms sleep (:func:`install`): a PDU is read as soon as it arrives, an idle
      association still costs one wake-up per ``WAIT_S``; a primitive queued to be sent
      (a C-STORE response) ends the wait at once (:attr:`waker`, :class:`WakingQueue`), and
      it does not wait while state-machine events are pending (the A-ASSOCIATE-RQ read
      together with the connection's own event);
    * ``TCP_QUICKACK`` is re-armed after every read and send (Linux): senders that write a
      PDU in two parts (header, then body) without ``TCP_NODELAY`` are not held up by our
      delayed ACK (about 40 ms per request).
    """

    WAIT_S = 0.001
    waker: Waker | None = None
    """Set by :func:`install`; its wakes end :attr:`ready`'s wait."""

    @property
    def ready(self) -> bool:
        """Return True when data can be read; wait up to ``WAIT_S`` for it."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            time.sleep(self.WAIT_S)  # keeps the reader loop paced until it ends
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes select() cannot see
        waker = self.waker
        watched: list[Any] = [sock] if waker is None else [sock, waker]
        # The reader loop handles one event per turn: with events pending, only look.
        wait_s = self.WAIT_S if self.event_queue.empty() else 0
        try:
            readable, _, _ = select.select(watched, [], [], wait_s)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport closed, as pynetdicom
            return False
        if waker is not None and waker in readable:
            waker.drain()
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only when the peer closed the connection)."""
        sock = self.socket
        if sock is None:
            return bytearray()
        # The buffer grows (doubling) as bytes arrive: a PDU header announcing 4 GiB from a
        # hostile peer allocates only what the peer actually sends.
        buffer = bytearray(min(nr_bytes, _FIRST_READ_BYTES))
        got = 0
        while got < nr_bytes:
            if got == len(buffer):
                buffer.extend(bytes(min(len(buffer), nr_bytes - got)))
            with memoryview(buffer) as view, view[got:] as free:
                n = sock.recv_into(free)
            if n == 0:
                break
            got += n
        del buffer[got:]
        _quick_ack(sock)
        return buffer

    def send(self, bytestream: bytes) -> None:
        """Send as pynetdicom does, then re-arm quick ACKs."""
        super().send(bytestream)
        if self.socket is not None:
            _quick_ack(self.socket)

    def close(self) -> None:
        """Close the connection as pynetdicom does, and the waker."""
        super().close()
        if self.waker is not None:
            self.waker.close()


def _quick_ack(sock: socket.socket) -> None:
    if _QUICKACK is None:
        return
    with contextlib.suppress(OSError):  # the connection is closing
        sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


def install(assoc: Any, open_incoming: OpenIncoming | None) -> None:
    """Use :class:`WireSocket` and stream C-STORE data sets (when ``open_incoming``)."""
    sock = assoc.dul.socket
    if type(sock) is AssociationSocket:
        sock.__class__ = WireSocket
        waker = cast(WireSocket, sock).waker = Waker()
        assoc.dul.to_provider_queue = WakingQueue(waker)  # (empty: not started yet)
        assoc.dul._run_loop_delay = 0  # WireSocket.ready waits on the socket instead
        assoc.dul._read_pdu_data = functools.partial(read_pdu, assoc.dul)
    if open_incoming is None:
        return
    dimse = assoc.dimse
    receive = dimse.receive_primitive  # pynetdicom's, bound

    def receive_primitive(primitive: P_DATA) -> None:
        items = primitive.presentation_data_value_list
        if len(items) == 1:
            _attach(assoc, items[0], open_incoming)
            receive(primitive)
            return
        for item in items:  # one PDV at a time: a data set may start after its command
            single = P_DATA()
            single.presentation_data_value_list.append(item)  # (the setter wants lists)
            _attach(assoc, item, open_incoming)
            receive(single)

    dimse.receive_primitive = receive_primitive


def uninstall(assoc: Any) -> None:
    """Close what :func:`install` opened (the waker); call once the association has ended.

    pynetdicom closes an acceptor's connection without :meth:`WireSocket.close` on a normal
    release, so the waker would otherwise stay open until the garbage collector finds it.
    """
    sock = assoc.dul.socket
    if isinstance(sock, WireSocket) and sock.waker is not None:
        sock.waker.close()


_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))


def read_pdu(dul: Any) -> None:
    """Read one PDU from the socket and queue it with its state-machine event (PS3.8 9.2).

    Replaces ``DULServiceProvider._read_pdu_data`` with the same events (Evt17 transport
    closed, Evt19 invalid PDU, else the PDU's own). A P-DATA-TF is split into its PDV items
    (PS3.8 9.3.5) as views of the received buffer (:func:`decode_p_data`): no fragment is
    copied on its way to the spool file. Other PDUs are decoded by pynetdicom.
    """
    sock = dul.socket
    try:
        header = sock.recv(6)
        if len(header) < 6:
            raise ConnectionResetError("connection closed before the PDU header")
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            logger.error("unknown PDU type received: 0x%02X", pdu_type)
            dul.event_queue.put("Evt19")
            return
        body = sock.recv(length)
        if len(body) != length:
            raise ConnectionResetError("connection closed before the end of the PDU")
    except (OSError, TimeoutError) as exc:
        logger.debug("connection closed while reading a PDU: %s", type(exc).__name__)
        dul.event_queue.put("Evt17")
        return
    try:
        if pdu_type == _P_DATA_TF:
            pdu: Any = decode_p_data(body)
            evt.trigger(dul.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
            event = "Evt10"
        else:
            pdu, event = dul._decode_pdu(header + body)
    except Exception:
        logger.exception("cannot decode a received PDU")
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


def decode_p_data(body: bytearray) -> P_DATA_TF:
    """Decode a P-DATA-TF PDU's items (after its 6-byte header) without copying them.

    Raises
    ------
    ValueError
        When an item's length does not fit the PDU (PS3.8 9.3.5.1).
    """
    pdu = P_DATA_TF()
    view = memoryview(body)
    offset = 0
    while offset < len(view):
        if len(view) - offset < 6:
            raise ValueError("truncated presentation data value item")
        (item_length,) = struct.unpack_from(">L", view, offset)
        end = offset + 4 + item_length
        if item_length < 2 or end > len(view):
            raise ValueError(f"presentation data value item length {item_length} invalid")
        item = PresentationDataValueItem()
        item.presentation_context_id = view[offset + 4]
        item.presentation_data_value = cast(bytes, view[offset + 5 : end])
        pdu.presentation_data_value_items.append(item)
        offset = end
    return pdu


def _attach(assoc: Any, item: tuple[int, bytes], open_incoming: OpenIncoming) -> None:
    """Before a C-STORE request's first data fragment, give its message a spool file."""
    message: DIMSEMessage | None = assoc.dimse.message
    context_id, data = item
    if message is None or not data or data[0] & 1:  # no message yet, or a command fragment
        return
    if not isinstance(message, C_STORE_RQ) or message._data_set_file is not None:
        return
    if cast(BytesIO, message.data_set).tell():  # already buffering (never expected)
        return
    incoming = open_incoming(assoc, context_id, message)
    if incoming is not None:
        message._data_set_file = cast(Any, incoming)
        message._data_set_path = incoming.path


def discard_incoming(assoc: Any) -> None:
    """Remove the spool file of a data set whose transfer ended early (abort, close)."""
    dimse = getattr(assoc, "dimse", None)
    message = getattr(dimse, "message", None)
    incoming = getattr(message, "_data_set_file", None)
    if isinstance(incoming, IncomingFile):
        incoming.discard()


def incoming_of(request: Any) -> IncomingFile | None:
    """Return the spool file a C-STORE request's data set was streamed to, if any."""
    incoming = getattr(request, "_dataset_file", None)
    return incoming if isinstance(incoming, IncomingFile) else None


def read_data_set(fp: BinaryIO, transfer_syntax: str) -> Dataset:
    """Parse a data set from ``fp``'s position, skipping the Pixel Data value.

    Elements before and after Pixel Data are parsed as a full decode would parse them (a
    malformed one raises); a Pixel Data of defined length is skipped with a seek, one of
    undefined length (encapsulated) is parsed. A deflated data set is inflated and parsed
    whole.

    Parameters
    ----------
    fp
        Positioned at the first data set element.
    transfer_syntax
        The presentation context's transfer syntax UID.

    Returns
    -------
    Dataset
        Every element except a Pixel Data of defined length.
    """
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return decode(BytesIO(fp.read()), False, True, deflated=True)
    pixels: dict[str, Any] = {}

    def at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag != PIXEL_DATA:
            return False
        pixels.update(vr=vr, length=length)
        return True

    ds = read_dataset(fp, implicit, little, stop_when=at_pixel_data)
    if not pixels or pixels["length"] == _UNDEFINED_LENGTH:
        if pixels:
            ds.update(read_dataset(fp, implicit, little))
        return ds
    header = 8 if implicit or pixels["vr"] not in _LONG_LENGTH_VRS else 12
    fp.seek(header + pixels["length"], 1)
    ds.update(read_dataset(fp, implicit, little))
    return ds
