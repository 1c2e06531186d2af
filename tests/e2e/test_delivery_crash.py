"""SIGKILL during a delivery: after a restart the result objects are re-sent with the same UIDs.

A real ``radflag serve`` delivers SR + SC to DCMTK ``storescp`` that holds each C-STORE for a
few seconds (``--sleep-during``) and keeps every received copy (``--unique-filenames``).
radflag is SIGKILLed while its first C-STORE is in flight; a new ``radflag serve`` on the same
database takes the lapsed claims over and delivers. The PACS receives exactly the SOP
Instance UIDs the outbox held (SENDING) when the first process died: distinct UIDs counted,
and any copy the PACS got twice carries the same UID. (DCMTK ``storescp`` discards the
object whose response it could not send, so the PACS here keeps one copy of each.)
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.engine import make_engine, make_session_factory
from db.models import Delivery
from tests.e2e.conftest import launch_serve
from tests.peers.dcmtk import StoreSCP, dcmsend, dcmtk_available
from tests.peers.dicomgen import make_study
from tests.peers.fixtures import netns  # noqa: F401 - fixture
from tests.peers.netns import NetNamespace

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_sigkill_mid_delivery_resends_with_the_same_uids(
    netns: NetNamespace,  # noqa: F811
    tmp_path: Path,
) -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK not installed")
    study = make_study(1, tmp_path / "study")
    delivery = {"claim_lease_s": 4.0, "timeout_s": 20.0}
    out_dir = tmp_path / "pacs"
    # The PACS holds the SR's C-STORE back 3 s: radflag dies meanwhile, its claims SENDING.
    with StoreSCP(
        out_dir, ns=netns, aet="PACS", extra_args=["--sleep-during", "3", "--unique-filenames"]
    ) as sleepy:
        port = sleepy.port
        first = launch_serve(netns, tmp_path, [("pacs", "PACS", port)], delivery)
        sent = dcmsend(first.port, study.paths, ns=netns, called_aet="RADFLAG", timeout_s=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait(lambda: "Received Store Request" in sleepy.log(), 120, "first C-STORE in flight")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        _wait(lambda: "Broken pipe" in sleepy.log(), 30, "the PACS to notice the dead sender")
    sessions = make_session_factory(make_engine(first.db_url))
    with sessions() as s:
        before = {d.sop_instance_uid: d.state for d in s.scalars(select(Delivery))}
    assert set(before.values()) == {"SENDING"}, before
    with StoreSCP(out_dir, ns=netns, aet="PACS", port=port, extra_args=["--unique-filenames"]):
        second = launch_serve(netns, tmp_path, [("pacs", "PACS", port)], delivery)
        try:

            def all_sent() -> bool:
                with sessions() as s:
                    states = s.scalars(select(Delivery.state)).all()
                return len(states) == 2 and set(states) == {"SENT"}

            _wait(all_sent, 120, "both deliveries SENT after the restart")
            with sessions() as s:
                recorded = set(s.scalars(select(Delivery.sop_instance_uid)).all())
            assert second.stop() == 0
        finally:
            second.stop()
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    received = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
    print(f"C-STOREs received: {len(received)}, distinct SOP Instance UIDs: {len(set(received))}")
    assert set(received) == recorded == set(before) and len(recorded) == 2
