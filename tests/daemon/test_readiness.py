"""Studies ready on time: per-study quiet-period deadlines instead of the periodic job's tick.

- the timer (fake clock): a deadline falls due one quiet period after the last instance, a
  new instance re-arms it, a study the database does not consider quiet yet is re-armed
  (never spun on), a failed step is retried later, the number armed is bounded;
- on SQLite and PostgreSQL, through the real sink path and the real completion step, with no
  periodic job: the study is READY within a small bound after its quiet period; a busy
  cluster lock (another process completing) delays it by a retry, not a tick.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from daemon.readiness import ArmingSink, DeadlinePolicy, ReadinessTimer, ReadyQuietStudies
from daemon.sink import new_instance
from db.engine import make_engine, make_session_factory
from db.ingest import PatientIdPolicy, record_instance
from db.locks import advisory_key
from db.models import Study
from db.schema import ensure_schema
from dicom_io.scp import ReceivedInstance

STUDY = "1.2.826.0.1.3680043.10.511.1"


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeSettle:
    """A completion step that records its calls and answers what the test sets."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.left: dict[str, float] = {}
        self.error: Exception | None = None

    def __call__(self, study_uids: Collection[str]) -> dict[str, float]:
        self.calls.append(sorted(study_uids))
        if self.error is not None:
            raise self.error
        return {uid: s for uid, s in self.left.items() if uid in study_uids}


def _timer(quiet_s: float = 1.0, **policy: float) -> tuple[ReadinessTimer, FakeClock, FakeSettle]:
    clock, settle = FakeClock(), FakeSettle()
    return (
        ReadinessTimer(DeadlinePolicy(quiet_period_s=quiet_s, **policy), settle, clock),
        clock,
        settle,
    )


def test_deadline_falls_due_one_quiet_period_after_the_last_instance() -> None:
    timer, clock, settle = _timer(quiet_s=1.0)
    assert timer.run_due() is None  # nothing armed: the thread sleeps until an arm()
    timer.arm(STUDY)
    clock.now += 0.6
    timer.arm(STUDY)  # a second instance re-arms: due 1 s after it, not after the first
    clock.now += 0.7
    assert timer.run_due() == pytest.approx(0.3)
    assert settle.calls == []
    clock.now += 0.3
    assert timer.run_due() is None
    assert settle.calls == [[STUDY]]
    assert timer.armed() == {}


def test_study_not_quiet_by_the_database_clock_is_rearmed_not_spun_on() -> None:
    timer, clock, settle = _timer(quiet_s=1.0, min_retry_s=0.1)
    timer.arm(STUDY)
    clock.now += 1.0
    settle.left = {STUDY: 0.25}  # the database saw a later instance (another listener)
    assert timer.run_due() == pytest.approx(0.25)
    clock.now += 0.25
    settle.left = {STUDY: -0.5}  # quiet, yet still RECEIVING: the cluster lock was busy
    assert timer.run_due() == pytest.approx(0.1)  # re-armed after the floor, not at once
    assert timer.run_due() == pytest.approx(0.1)
    assert len(settle.calls) == 2
    clock.now += 0.1
    settle.left = {}
    assert timer.run_due() is None
    assert len(settle.calls) == 3


def test_failed_step_is_retried_later_and_a_new_instance_during_a_step_wins() -> None:
    timer, clock, settle = _timer(quiet_s=1.0, error_retry_s=2.0)
    timer.arm(STUDY)
    clock.now += 1.0
    settle.error = RuntimeError("database unavailable")
    assert timer.run_due() == pytest.approx(2.0)
    clock.now += 2.0
    settle.error = None

    def settle_while_an_instance_arrives(study_uids: Collection[str]) -> dict[str, float]:
        timer.arm(STUDY)  # the listener commits another instance meanwhile
        return dict.fromkeys(study_uids, 0.05)

    timer._settle = settle_while_an_instance_arrives  # noqa: SLF001 - one-off step
    assert timer.run_due() == pytest.approx(1.0)  # the new instance's full quiet period


def test_armed_studies_are_bounded() -> None:
    timer, _clock, _settle = _timer(max_studies=2)
    for n in range(3):
        timer.arm(f"{STUDY}.{n}")
    assert sorted(timer.armed()) == [f"{STUDY}.1", f"{STUDY}.2"]


def test_timer_thread_settles_each_study_once_at_its_own_deadline() -> None:
    quiet_s = 0.3
    settled: list[tuple[str, float]] = []
    all_done = threading.Event()

    def settle(study_uids: Collection[str]) -> dict[str, float]:
        settled.extend((uid, time.monotonic()) for uid in study_uids)
        if len(settled) >= 2:
            all_done.set()
        return {}

    timer = ReadinessTimer(DeadlinePolicy(quiet_period_s=quiet_s), settle)
    timer.start()
    try:
        armed = {"A": time.monotonic()}
        timer.arm("A")
        for _ in range(50):  # a burst of instances of study B while the thread waits for A
            armed["B"] = time.monotonic()
            timer.arm("B")
            time.sleep(0.002)
        assert all_done.wait(5)
        time.sleep(quiet_s)  # nothing else falls due
    finally:
        timer.stop()
    assert [uid for uid, _ in settled] == ["A", "B"]
    for uid, at in settled:
        assert quiet_s <= at - armed[uid] < quiet_s + 1.0


# -- the real completion step, on SQLite and PostgreSQL --------------------------------------


class RecordingSink:
    """The listener's sink reduced to its commit (:func:`db.ingest.record_instance`)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def store(self, instance: ReceivedInstance) -> bool:
        item = new_instance(instance, str(instance.path))
        return record_instance(self._sessions, item, PatientIdPolicy(key=b"test"))


def _instance(n: int) -> ReceivedInstance:
    return ReceivedInstance(
        path=Path(f"/spool/{n}.dcm"),
        sop_instance_uid=f"{STUDY}.1.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid=STUDY,
        series_instance_uid=f"{STUDY}.1",
        modality="DX",
        patient_id="P1",
        calling_ae="MODALITY",
        peer_host="127.0.0.1",
        size_bytes=1000,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def _state(sessions: sessionmaker[Session]) -> tuple[str, float | None]:
    """The study's state and its quiet wait on the database clock (ready - last instance)."""
    with sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == STUDY)).one()
        wait = (study.ready_at - study.last_received_at).total_seconds() if study.ready_at else None
        return study.state, wait


def _running_timer(
    engine: Engine, quiet_s: float, steps: list[float] | None = None
) -> tuple[ReadinessTimer, sessionmaker[Session], threading.Event]:
    """A started timer running the real step; ``steps`` collects when each step ran."""
    sessions = make_session_factory(engine)
    woken = threading.Event()
    step = ReadyQuietStudies(engine, sessions, quiet_s, lambda ready: woken.set())

    def counted(study_uids: Collection[str]) -> dict[str, float]:
        if steps is not None:
            steps.append(time.monotonic())
        return step(study_uids)

    timer = ReadinessTimer(DeadlinePolicy(quiet_period_s=quiet_s, min_retry_s=0.05), counted)
    timer.start()
    return timer, sessions, woken


def test_study_ready_right_after_its_quiet_period_without_the_periodic_job(
    engine: Engine,
) -> None:
    quiet_s, bound_s = 0.4, 0.6
    timer, sessions, woken = _running_timer(engine, quiet_s)
    try:
        sink = ArmingSink(RecordingSink(sessions), timer.arm)
        assert sink.store(_instance(1)) is True
        time.sleep(0.2)  # the modality is still sending: the next instance re-arms
        assert sink.store(_instance(2)) is True
        assert sink.store(_instance(2)) is False  # a duplicate arms nothing new
        last = time.monotonic()
        assert woken.wait(quiet_s + bound_s + 5.0)
        elapsed = time.monotonic() - last
        state, wait = _state(sessions)
    finally:
        timer.stop()
    assert state == "READY"
    assert wait is not None and quiet_s <= wait < quiet_s + bound_s
    assert elapsed < quiet_s + bound_s + 0.5  # measured from after the last store


@pytest.mark.postgres
def test_busy_cluster_lock_delays_the_study_by_a_retry_not_a_tick(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    ensure_schema(engine)
    quiet_s = 0.2
    with engine.connect() as other:  # another process runs the completion job meanwhile
        key = advisory_key("complete_studies")
        assert other.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
        other.commit()
        steps: list[float] = []
        timer, sessions, woken = _running_timer(engine, quiet_s, steps)
        try:
            ArmingSink(RecordingSink(sessions), timer.arm).store(_instance(1))
            assert not woken.wait(quiet_s + 0.5)
            assert _state(sessions)[0] == "RECEIVING"
            tried = len(steps)
            assert 2 <= tried <= 0.5 / 0.05 + 2  # retried after the floor: not forgotten, no spin
            other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            other.commit()
            assert woken.wait(5.0)
            assert _state(sessions)[0] == "READY"
        finally:
            timer.stop()
    engine.dispose()
