"""Sender rounds on time: a recorded study starts a round at once, never two at a time.

- :class:`RoundLoop`: a kick starts a round without waiting for the interval; rounds never
  overlap, and kicks during a round make exactly one more round;
- :class:`KickAfter`: the kick comes after the wrapped processor returned (outbox committed);
- :class:`Sender`: a destination's association ending kicks the next round (not after a bug);
- a whole radflag whose periodic jobs never tick (intervals of an hour) still gets a study's
  SR to the PACS within seconds: deadline -> worker -> sender, no polling on the path.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pynetdicom.sop_class import Comprehensive3DSRStorage

from daemon.app import Radflag
from daemon.delivery import Sender
from daemon.sendloop import KickAfter, RoundLoop
from daemon.settings import DeliverySettings
from db.engine import make_engine, make_session_factory
from db.models import utcnow
from db.queue import ClaimedStudy
from db.schema import ensure_schema
from dicom_io.spool import Spool
from tests.daemon.conftest import DueEntry, add_due_entry, dcmsend, make_settings, storage_scp
from tests.dicom_io.conftest import make_dx, save

HOUR_S = 3600.0


class GatedRounds:
    """A round function that counts rounds, tracks concurrency and can be held open."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)
        self.rounds = 0
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.rounds += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.started.release()
        self.gate.wait(10)
        with self._lock:
            self.running -= 1


def test_kick_starts_a_round_at_once_without_waiting_for_the_interval() -> None:
    rounds = GatedRounds()
    rounds.gate.set()
    loop = RoundLoop(rounds, interval_s=HOUR_S)
    loop.start()
    try:
        assert not rounds.started.acquire(timeout=0.3)  # no round before the interval or a kick
        t0 = time.monotonic()
        loop.kick()
        assert rounds.started.acquire(timeout=5)
        assert time.monotonic() - t0 < 1.0
    finally:
        assert loop.stop()


def test_rounds_never_overlap_and_kicks_during_a_round_make_one_more() -> None:
    rounds = GatedRounds()
    loop = RoundLoop(rounds, interval_s=HOUR_S)
    loop.start()
    try:
        loop.kick()
        assert rounds.started.acquire(timeout=5)  # round 1 runs, held open
        kickers = [threading.Thread(target=loop.kick) for _ in range(20)]
        for t in kickers:
            t.start()
        for t in kickers:
            t.join()
        assert not rounds.started.acquire(timeout=0.3)  # no second round beside the first
        rounds.gate.set()
        assert rounds.started.acquire(timeout=5)  # round 2: the kicks, coalesced
    finally:
        assert loop.stop()
    assert rounds.max_running == 1
    assert rounds.rounds == 2


def test_round_failure_is_logged_and_the_loop_goes_on() -> None:
    calls: list[int] = []
    done = threading.Event()

    def failing_then_ok() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        done.set()

    loop = RoundLoop(failing_then_ok, interval_s=HOUR_S)
    loop.start()
    try:
        loop.kick()
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        loop.kick()
        assert done.wait(5)
    finally:
        assert loop.stop()


def test_kick_comes_after_the_processor_returned() -> None:
    order: list[str] = []

    class Processor:
        def process(self, claim: ClaimedStudy) -> None:
            order.append(f"processed {claim.study_instance_uid}")

    claim = ClaimedStudy(1, "1.2.3", "w", utcnow(), 1, None, ())
    KickAfter(Processor(), lambda: order.append("kick")).process(claim)
    assert order == ["processed 1.2.3", "kick"]


def _one_due_entry(tmp_path: Path) -> Sender:
    """A sender on a database with one due entry whose result file is missing."""
    engine = make_engine(f"sqlite:///{tmp_path / 'radflag.db'}")
    ensure_schema(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        add_due_entry(s, DueEntry("1.2.3", "1.2.3.4", "missing.dcm", port=9))
    return Sender(sessions, DeliverySettings(), Spool(tmp_path / "results"), owner="s1")


def _wait_idle(sender: Sender) -> None:
    deadline = time.monotonic() + 10
    while not sender.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sender.idle()


def test_sender_reports_a_free_destination_after_its_association(tmp_path: Path) -> None:
    sender = _one_due_entry(tmp_path)
    freed = threading.Event()
    sender.notify_free(freed.set)
    try:
        sender.run_round()
        assert freed.wait(10)
        assert sender.take_counts() == {"DEAD": 1}  # missing file: recorded (permanent)
    finally:
        sender.stop()


def test_sender_does_not_kick_after_a_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sender = _one_due_entry(tmp_path)
    freed = threading.Event()
    sender.notify_free(freed.set)

    def bug(*_args: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(sender, "_send_group", bug)
    try:
        sender.run_round()
        _wait_idle(sender)
        assert not freed.is_set()  # the released entry waits for the periodic round
    finally:
        sender.stop()


@pytest.mark.dcmtk
def test_sr_reaches_the_pacs_with_no_periodic_tick_on_the_path(tmp_path: Path, start_app) -> None:
    quiet_s = 0.3
    with storage_scp(0, [Comprehensive3DSRStorage]) as pacs:
        app: Radflag = start_app(
            make_settings(
                tmp_path,
                pacs.port,
                completion={"quiet_period_s": quiet_s, "check_interval_s": HOUR_S},
                worker={"device": "cpu", "poll_interval_s": HOUR_S},
                delivery={"check_interval_s": HOUR_S},
                destinations=[
                    {
                        "name": "pacs",
                        "ae_title": "PACS",
                        "host": "127.0.0.1",
                        "port": pacs.port,
                        "outputs": ["SR"],
                    }
                ],
            )
        )
        image = save(make_dx(seed=7), tmp_path / "dx.dcm")
        for _ in range(2):  # the second study comes once the worker has waited idle
            t0 = time.monotonic()
            sent = dcmsend(app.port, image)
            assert sent.returncode == 0, sent.stderr
            pacs.wait_for(1 + len(pacs.received), timeout_s=20)
            assert time.monotonic() - t0 < 20  # on main: an hour (the ticks)
            image = save(make_dx(seed=8), tmp_path / "dx2.dcm")
