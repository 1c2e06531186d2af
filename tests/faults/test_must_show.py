"""Issue 11, must show: stalled PDUs held open while a normal sender pushes 10 studies.

A hostile peer on 127.0.0.2 keeps 20 half-sent PDUs outstanding for the whole push (half
A-ASSOCIATE-RQs and half P-DATA-TF after association; each one the listener ends is
replaced at once by a new one) while DCMTK ``storescu`` on 127.0.0.1 pushes 10 two-image
studies of real radiographs to an in-process radflag that classifies them, and DCMTK
``echoscu`` asks for a C-ECHO every 0.3 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from daemon.app import Radflag
from daemon.settings import Settings
from db.models import Result, Study
from tests.daemon.conftest import PacsStandIn, make_settings, storescu, wait_until
from tests.faults.conftest import NETWORK_TIMEOUT_S, WATCHDOG_SLACK_S
from tests.faults.rawpeer import Ending, RawPeer, associate_rq, p_data
from tests.peers.dcmtk import dcmtk_available, echoscu
from tests.peers.dicomgen import make_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

N_STALLED = 20
N_STUDIES = 10


@dataclass
class Attacker:
    """Keeps ``N_STALLED`` half-sent PDUs outstanding from 127.0.0.2 until stopped."""

    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    endings: list[Ending] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, slot: int) -> None:
        while not self.stop.is_set():
            try:
                peer = RawPeer(self.port)
                if slot % 2:
                    peer.send(associate_rq(calling="STALLER")[:60])
                else:
                    peer.associate(calling="STALLER")
                    peer.send(p_data(b"\x00" * 4000)[:1000])
            except (OSError, AssertionError):  # refused above the per-peer limit
                with self.lock:
                    self.refused += 1
                time.sleep(0.05)
                continue
            ending = peer.wait_end(timeout_s=NETWORK_TIMEOUT_S * 5)
            peer.close()
            with self.lock:
                self.endings.append(ending)


def _echo_loop(port: int, stop: threading.Event, results: list[int]) -> None:
    while not stop.is_set():
        results.append(echoscu(port, called_aet="RADFLAG", timeout_s=5).returncode)
        time.sleep(0.3)


def test_stalled_pdus_do_not_stop_a_normal_sender(
    tmp_path: Path, pacs: PacsStandIn, start_app: Callable[[Settings], Radflag]
) -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK not installed")
    studies = [
        make_study(2, tmp_path / f"study{i}", patient_id=f"P{i:03d}", accession_number=f"A{i}")
        for i in range(N_STUDIES)
    ]
    app = start_app(
        make_settings(tmp_path, pacs.port, listener={"network_timeout_s": NETWORK_TIMEOUT_S})
    )
    attacker = Attacker(app.port)
    attack = [
        threading.Thread(target=attacker.run, args=(slot,), daemon=True)
        for slot in range(N_STALLED)
    ]
    for thread in attack:
        thread.start()
    time.sleep(0.5)  # every attacker slot has its stalled PDU out before the push starts
    echo_stop, echoes = threading.Event(), list[int]()
    echo = threading.Thread(target=_echo_loop, args=(app.port, echo_stop, echoes), daemon=True)
    echo.start()

    pushed = [storescu(app.port, *study.paths) for study in studies]
    attacker.stop.set()
    wait_until(lambda: _states(app) == {"DONE": N_STUDIES}, timeout_s=120, what="10 DONE")
    echo_stop.set()
    echo.join(timeout=30)
    for thread in attack:
        thread.join(timeout=NETWORK_TIMEOUT_S * 6)

    assert [p.returncode for p in pushed] == [0] * N_STUDIES, pushed[0].stderr
    with app.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Result)) == N_STUDIES
    assert echoes and echoes == [0] * len(echoes)
    lifetimes = [e.elapsed_s for e in attacker.endings]
    assert attacker.endings and all(e.closed for e in attacker.endings)
    assert max(lifetimes) <= NETWORK_TIMEOUT_S + WATCHDOG_SLACK_S
    wait_until(lambda: app.listener.active_associations == 0, timeout_s=5, what="no slot held")
    print(
        f"FIGURES stalled_connections={len(attacker.endings)} refused={attacker.refused} "
        f"max_stalled_lifetime_s={max(lifetimes):.2f} echoes={len(echoes)} "
        f"echo_failures={len([rc for rc in echoes if rc])} studies_acknowledged="
        f"{len([p for p in pushed if p.returncode == 0])} done={_states(app).get('DONE', 0)}"
    )


def _states(app: Radflag) -> dict[str, int]:
    with app.sessions() as s:
        rows = s.execute(select(Study.state, func.count()).group_by(Study.state)).all()
    return {str(state): int(n) for state, n in rows}
