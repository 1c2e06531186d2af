"""Receiving close to the wire: header parse, P-DATA-TF split, streamed data sets."""

from __future__ import annotations

import select
import socket
import struct
import time
import tracemalloc
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA

from dicom_io import statuses
from dicom_io.spool import INCOMING_PREFIX, TEMP_SUFFIX
from dicom_io.wire import Waker, WireSocket, decode_p_data, read_data_set
from tests.conftest import shared_path
from tests.dicom_io.conftest import SCP_AE, RunningListener, make_dx

PIXEL_DATA = Tag(0x7FE0, 0x0010)


def _data_set_part(path: Path) -> tuple[bytes, str]:
    """The encoded data set of a PS3.10 file (after the file meta) and its transfer syntax."""
    ds = dcmread(path, stop_before_pixels=True)
    raw = path.read_bytes()
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[meta_end:], str(ds.file_meta.TransferSyntaxUID)


def _zoo() -> list[Path]:
    return sorted(shared_path("dicom", "transfer-syntax-zoo", "files").glob("*.dcm"))


@pytest.mark.shared
def test_header_parse_equals_full_decode_on_real_files() -> None:
    files = _zoo()
    assert files
    for path in files:
        full = dcmread(path)
        raw, syntax = _data_set_part(path)
        parsed = read_data_set(BytesIO(raw), syntax)
        whole = syntax == DeflatedExplicitVRLittleEndian or full[PIXEL_DATA].is_undefined_length
        expected = {e.tag for e in full if e.tag != PIXEL_DATA or whole}
        assert {e.tag for e in parsed} == expected, path.name
        for tag in expected - {PIXEL_DATA}:
            assert parsed[tag].value == full[tag].value, (path.name, tag)


def _encode(ds: Dataset, implicit: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_elements_after_the_pixels_are_parsed(syntax: str) -> None:
    ds = make_dx(rows=8, columns=8)
    ds.add_new(0x00091010, "LO", "private creator")  # (just an element before)
    ds.DataSetTrailingPadding = b"\x00" * 6  # (FFFC,FFFC), after Pixel Data
    raw = _encode(ds, implicit=syntax == ImplicitVRLittleEndian)

    parsed = read_data_set(BytesIO(raw), syntax)

    assert PIXEL_DATA not in parsed
    assert parsed.SOPInstanceUID == ds.SOPInstanceUID
    assert Tag(0xFFFC, 0xFFFC) in parsed


def test_a_broken_element_after_the_pixels_fails_as_a_full_decode_does() -> None:
    raw = _encode(make_dx(rows=8, columns=8))
    # A sequence of undefined length whose first item has no item tag (cf. test_security).
    raw += b"\xfd\x7f\x10\x00SQ\x00\x00\xff\xff\xff\xff\x12\x34\x56\x78\x08\x00\x00\x00abcdefgh"

    with pytest.raises(Exception):  # noqa: B017,PT011 -- whatever pydicom raises
        ds = read_data_set(BytesIO(raw), ExplicitVRLittleEndian)
        [elem.value for elem in ds]
    with pytest.raises(Exception):  # noqa: B017,PT011 -- the full decode fails alike
        full = dcmread(BytesIO(raw), force=True)
        [elem.value for elem in full]


def _pdv(context_id: int, control: int, payload: bytes) -> bytes:
    return struct.pack(">LBB", len(payload) + 2, context_id, control) + payload


def test_p_data_items_are_views_of_the_received_pdu() -> None:
    body = bytearray(_pdv(1, 0x03, b"command") + _pdv(3, 0x02, b"data set bytes"))

    pdu = decode_p_data(body)

    items = [
        (i.presentation_context_id, bytes(i.presentation_data_value or b""))
        for i in pdu.presentation_data_value_items
    ]
    assert items == [(1, b"\x03command"), (3, b"\x02data set bytes")]
    assert isinstance(pdu.presentation_data_value_items[1].presentation_data_value, memoryview)


@pytest.mark.parametrize(
    "tail", [b"\x00\x00\x00\x09\x01\x02", b"\x00\x00\x00\x01\x01\x02", b"\x00\x00"]
)
def test_p_data_item_lengths_that_do_not_fit_are_refused(tail: bytes) -> None:
    with pytest.raises(ValueError, match="presentation data value item"):
        decode_p_data(bytearray(_pdv(1, 0x03, b"ok") + tail))


def _store_request(ds: Dataset) -> C_STORE_RQ:
    """Return a C-STORE-RQ (PS3.7 9.3.1.1) carrying ``ds`` in Explicit VR Little Endian."""
    request = C_STORE_RQ()
    request.command_set.MessageID = 1
    request.command_set.AffectedSOPClassUID = ds.SOPClassUID
    request.command_set.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.command_set.Priority = 0
    request.command_set.CommandField = 0x0001
    request.command_set.CommandDataSetType = 0x0000
    request.data_set = BytesIO(encode(ds, False, True) or b"")
    return request


def _store_in_one_p_data(port: int, ds: Dataset) -> int:
    """C-STORE whose command and data set travel in ONE P-DATA-TF PDU (two PDVs)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    assert assoc.is_established
    try:
        context = assoc.accepted_contexts[0]
        request = _store_request(ds)
        merged = P_DATA()
        for primitive in request.encode_msg(int(context.context_id or 1), 0):
            merged.presentation_data_value_list.extend(primitive.presentation_data_value_list)
        assert len(merged.presentation_data_value_list) == 2
        assoc._reactor_checkpoint.clear()  # as pynetdicom's send_c_store: we read the answer
        while not assoc._is_paused:
            time.sleep(0.001)
        assoc.dul.send_pdu(merged)
        _, response = assoc.dimse.get_msg(block=True)
        return int(getattr(response, "Status", -1))
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()


def test_command_and_data_set_in_one_pdu_are_stored(running_listener: RunningListener) -> None:
    ds = make_dx(rows=16, columns=16)
    del ds.file_meta

    status = _store_in_one_p_data(running_listener.port, ds)

    assert status == statuses.SUCCESS
    [instance] = running_listener.sink.stored
    stored = dcmread(instance.path)
    assert stored.PixelData == ds.PixelData
    assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY"


def _leftovers(running: RunningListener) -> list[Path]:
    return [p for p in running.spool.root.rglob(f"*{TEMP_SUFFIX}")]


def test_a_transfer_cut_short_leaves_no_file(running_listener: RunningListener) -> None:
    """A sender that dies in the middle of a data set: no temp file stays in the spool."""
    ds = make_dx(rows=512, columns=512)  # 512 KiB: several PDUs
    del ds.file_meta
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 16384
    assoc = ae.associate("127.0.0.1", running_listener.port, ae_title=SCP_AE)
    assert assoc.is_established
    context = assoc.accepted_contexts[0]
    request = _store_request(ds)
    primitives = list(request.encode_msg(int(context.context_id or 1), 16384))
    for primitive in primitives[: len(primitives) // 2]:
        assoc.dul.send_pdu(primitive)
    deadline = time.monotonic() + 10
    while not _leftovers(running_listener) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p.name.startswith(INCOMING_PREFIX) for p in _leftovers(running_listener)] == [True]
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    assert isinstance(sock, socket.socket)
    sock.shutdown(socket.SHUT_RDWR)  # the sender dies: no A-ABORT, the connection drops
    assoc.abort()

    deadline = time.monotonic() + 10
    while _leftovers(running_listener) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _leftovers(running_listener) == []
    assert running_listener.sink.stored == []


def test_a_huge_announced_pdu_allocates_only_what_arrives(
    running_listener: RunningListener,
) -> None:
    """A-ASSOCIATE-RQ header announcing 4 GiB, then 64 KiB and a close: no 4 GiB buffer."""
    tracemalloc.start()
    try:
        with socket.create_connection(("127.0.0.1", running_listener.port), timeout=30) as sock:
            sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\x00" * 65536)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1024) == b""  # the listener closes the connection
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", running_listener.port, ae_title=SCP_AE)
    assert assoc.is_established  # still serving
    assoc.release()


def test_a_queued_response_ends_the_readers_wait(
    running_listener: RunningListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The A-ASSOCIATE-AC, C-ECHO and A-RELEASE answers are sent when queued, not on a poll.

    With a 2 s wait on the socket, each of the three would wait up to 2 s for the reader's
    ``select`` to time out if queuing did not wake it.
    """
    monkeypatch.setattr(WireSocket, "WAIT_S", 2.0)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", running_listener.port, ae_title=SCP_AE)
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    elapsed = time.monotonic() - start

    assert int(status.Status) == statuses.SUCCESS
    assert elapsed < 1.5


def test_a_waker_is_closed_once_and_wakes_a_select() -> None:
    waker = Waker()
    waker.wake()
    waker.wake()
    readable, _, _ = select.select([waker], [], [], 1.0)
    assert readable == [waker]
    waker.drain()
    assert select.select([waker], [], [], 0)[0] == []
    waker.close()
    waker.close()
    waker.wake()  # closed: nothing happens


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_associations_leave_no_waker_sockets_open(running_listener: RunningListener) -> None:
    def open_fds() -> int:
        return len(list(Path("/proc/self/fd").iterdir()))

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    before = open_fds()
    for _ in range(6):
        assoc = ae.associate("127.0.0.1", running_listener.port, ae_title=SCP_AE)
        assert assoc.is_established
        assoc.send_c_echo()
        assoc.release()
    deadline = time.monotonic() + 10
    while running_listener.listener.active_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    while open_fds() > before + 2 and time.monotonic() < deadline:  # threads still ending
        time.sleep(0.02)

    assert open_fds() <= before + 2  # not 2 waker sockets (+ the connection) per association
