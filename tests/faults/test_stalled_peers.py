"""Half-sent PDUs, trickling, abandoned and malformed association requests (raw sockets).

Each test opens real TCP connections to a real listener from 127.0.0.2 (a different
source address than the DCMTK peers on 127.0.0.1) and measures how long the listener
takes to end them and free their slot (PS3.8 upper layer; radflag's socket policy in
:mod:`dicom_io.scp`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from dicom_io.scp import ListenerEventKind
from tests.dicom_io.conftest import RunningListener
from tests.faults.conftest import NETWORK_TIMEOUT_S, WATCHDOG_SLACK_S
from tests.faults.rawpeer import RawPeer, associate_rq, p_data, with_calling_ae_bytes
from tests.peers.dcmtk import dcmtk_available, echoscu

A_ABORT = 0x07
LIMIT_REJECT = bytes.fromhex("03 00 00000004 00 02 03 02")
"""A-ASSOCIATE-RJ: rejected-transient, service-provider (presentation), local-limit-exceeded."""
Guarded = Callable[..., RunningListener]
AT_ONCE_S = 3.0
"""'At once' on a loaded CI box: a tenth of the 30 s ACSE timeout the old listener waited."""


def _wait_free(running: RunningListener, timeout_s: float) -> float:
    """Seconds until the listener serves no association (fails after ``timeout_s``)."""
    start = time.monotonic()
    while running.listener.active_associations:
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{running.listener.active_associations} associations left")
        time.sleep(0.02)
    return time.monotonic() - start


def _echo(port: int) -> int:
    if not dcmtk_available():
        pytest.skip("DCMTK not installed")
    return echoscu(port, called_aet="RADFLAG", timeout_s=5).returncode


def test_half_sent_associate_request_is_closed_within_network_timeout(guarded: Guarded) -> None:
    running = guarded()
    peer = RawPeer(running.port)
    peer.send(associate_rq()[:50])  # 50 of 195 bytes, then silence

    ending = peer.wait_end(timeout_s=NETWORK_TIMEOUT_S * 4)

    assert ending.closed
    assert ending.pdu_types() == []  # no association yet: closed, not aborted (PS3.8 AA-2)
    assert NETWORK_TIMEOUT_S - 0.2 <= ending.elapsed_s <= NETWORK_TIMEOUT_S + WATCHDOG_SLACK_S
    _wait_free(running, AT_ONCE_S)


def test_half_sent_p_data_is_aborted_within_network_timeout(guarded: Guarded) -> None:
    running = guarded()
    peer = RawPeer(running.port)
    peer.associate()
    peer.send(p_data(b"\x00" * 200)[:40])  # a P-DATA-TF header promising 212 bytes

    ending = peer.wait_end(timeout_s=NETWORK_TIMEOUT_S * 4)

    assert ending.closed
    assert ending.pdu_types() == [A_ABORT]
    assert ending.received[8:10] == b"\x02\x00"  # source: service-provider, reason 0 (PS3.8 9.3.8)
    assert ending.elapsed_s <= NETWORK_TIMEOUT_S + WATCHDOG_SLACK_S
    _wait_free(running, AT_ONCE_S)
    assert ListenerEventKind.ASSOCIATION_ABORTED in running.kinds()


def test_trickling_request_cannot_hold_a_slot(guarded: Guarded) -> None:
    """One byte every 0.25 s keeps every read short but the PDU never completes in time."""
    running = guarded()
    peer = RawPeer(running.port)
    rq = associate_rq()
    with pytest.raises(OSError):  # noqa: PT012 -- the listener cuts us off mid-loop
        for i in range(len(rq)):  # 195 bytes would take ~49 s
            peer.send(rq[i : i + 1])
            time.sleep(0.25)
    assert time.monotonic() - peer.opened <= NETWORK_TIMEOUT_S + WATCHDOG_SLACK_S + 0.5
    _wait_free(running, AT_ONCE_S)


@pytest.mark.parametrize(
    "calling_ae",
    [b"\xff" * 16, b"\x00" * 16, b" " * 16, b"MOD\\ALITY", b"MOD\x1bALITY"],
    ids=["0xff", "nul", "blank", "backslash", "escape"],
)
def test_malformed_ae_title_is_aborted_and_frees_its_slot_at_once(
    guarded: Guarded, calling_ae: bytes
) -> None:
    running = guarded()  # acse_timeout_s is 30: the old behaviour kept the slot that long
    peer = RawPeer(running.port)
    peer.send(with_calling_ae_bytes(associate_rq(), calling_ae))

    ending = peer.wait_end(timeout_s=5)

    assert ending.pdu_types() == [A_ABORT] and ending.closed
    assert ending.elapsed_s < AT_ONCE_S
    _wait_free(running, AT_ONCE_S)


@pytest.mark.parametrize(
    "goodbye", [b"", bytes.fromhex("07000000000400000000")], ids=["close", "abort"]
)
def test_abandoned_connection_frees_its_slot_at_once(guarded: Guarded, goodbye: bytes) -> None:
    running = guarded()
    peer = RawPeer(running.port)
    time.sleep(0.1)  # accepted and waiting for an A-ASSOCIATE-RQ
    assert running.listener.active_associations == 1
    if goodbye:
        peer.send(goodbye)
    peer.close()
    _wait_free(running, AT_ONCE_S)


def test_one_peer_cannot_take_every_slot(guarded: Guarded) -> None:
    """Above its per-peer limit a source address is refused at once; others still get in."""
    running = guarded(max_associations=6, max_associations_per_peer=3)
    stalled = [RawPeer(running.port) for _ in range(3)]
    for peer in stalled:
        peer.send(associate_rq()[:40])
    time.sleep(0.1)

    extra = RawPeer(running.port)
    extra.send(associate_rq())
    refused = extra.wait_end(timeout_s=3)
    echo_rc = _echo(running.port)  # DCMTK from 127.0.0.1: another peer

    assert refused.received == LIMIT_REJECT
    assert refused.closed and refused.elapsed_s < AT_ONCE_S
    assert echo_rc == 0
    rejected = [d for k, d in running.events if k == ListenerEventKind.ASSOCIATION_REJECTED]
    assert [(d["peer_host"], d["reason"]) for d in rejected] == [
        ("127.0.0.2", "per-peer association limit exceeded")
    ]
    ends = [peer.wait_end(timeout_s=NETWORK_TIMEOUT_S * 4) for peer in stalled]
    assert all(e.closed and e.elapsed_s <= NETWORK_TIMEOUT_S + WATCHDOG_SLACK_S for e in ends)
    _wait_free(running, AT_ONCE_S)
    late = RawPeer(running.port)  # the slots are back: the same address is served again
    late.associate()
    late.close()


def test_stall_watchdog_spares_a_slow_store_handler(guarded: Guarded) -> None:
    """A C-STORE handler working longer than the network timeout is not cut short."""
    from tests.dicom_io.conftest import make_dx

    running = guarded()
    sink = running.sink
    original = sink.store

    def slow_store(instance):  # type: ignore[no-untyped-def]
        time.sleep(NETWORK_TIMEOUT_S + 1.5)
        return original(instance)

    sink.store = slow_store  # type: ignore[method-assign]
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ds = make_dx()
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="RADFLAG")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    assert [i.sop_instance_uid for i in sink.stored] == [ds.SOPInstanceUID]


def test_per_peer_limit_is_capped_by_the_global_limit() -> None:
    from dicom_io.scp import ListenerConfig

    assert ListenerConfig(ae_title="RADFLAG", max_associations=4).per_peer_limit == 4
    assert ListenerConfig(ae_title="RADFLAG", max_associations_per_peer=3).per_peer_limit == 3
    with pytest.raises(ValueError, match="max_associations_per_peer"):
        ListenerConfig(ae_title="RADFLAG", max_associations_per_peer=0)
