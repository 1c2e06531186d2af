"""The sender: no head-of-line blocking, claims that two senders never share, stop releases.

- two destinations, one dead (a TCP port that accepts and never answers): the healthy one
  gets every result within normal latency (measured), the dead one backs off and goes DEAD
  after the configured attempts, ``radflag outbox retry`` brings its entries back;
- two senders on one PostgreSQL database never send the same entry twice (C-STOREs counted
  at the receiving SCP);
- a stopping sender gives its unsent claims back.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from daemon.cli import main as radflag_main
from daemon.delivery import Sender
from daemon.settings import DeliverySettings
from db.engine import make_engine, make_session_factory
from db.models import Delivery, DeliveryAttempt, Study
from db.outbox import claim_due
from db.schema import ensure_schema
from dicom_io.spool import Spool
from tests.daemon.conftest import (
    DueEntry,
    add_due_entry,
    dcmsend,
    make_settings,
    storage_scp,
    wait_until,
)
from tests.dicom_io.conftest import make_dx, save

pytestmark = pytest.mark.dcmtk


@contextmanager
def black_hole() -> Iterator[int]:
    """A TCP port that accepts connections (backlog) and never says a word: a hung PACS."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _entries(app_sessions: sessionmaker[Session], destination: str) -> list[Delivery]:
    with app_sessions() as s:
        return list(s.scalars(select(Delivery).where(Delivery.destination == destination)).all())


@pytest.mark.slow
def test_dead_destination_does_not_delay_the_healthy_one(
    tmp_path: Path, start_app, capsys: pytest.CaptureFixture[str]
) -> None:
    classes = [Comprehensive3DSRStorage, SecondaryCaptureImageStorage]
    with storage_scp(0, classes) as healthy, black_hole() as dead_port:
        settings = make_settings(
            tmp_path,
            None,
            delivery={
                "timeout_s": 4.0,
                "max_attempts": 2,
                "backoff_base_s": 0.5,
                "backoff_max_s": 1.0,
                "check_interval_s": 0.2,
            },
            destinations=[
                {"name": "dead", "ae_title": "DEAD", "host": "127.0.0.1", "port": dead_port},
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": healthy.port},
            ],
        )
        app = start_app(settings)
        studies = [make_dx(seed=40 + i) for i in range(3)]
        for i, ds in enumerate(studies):
            assert dcmsend(app.port, save(ds, tmp_path / f"{i}.dcm")).returncode == 0
        healthy.wait_for(2 * len(studies), timeout_s=90)

        def all_dead() -> bool:
            rows = _entries(app.sessions, "dead")
            return len(rows) == 6 and all(d.state == "DEAD" for d in rows)

        wait_until(all_dead, timeout_s=120, what="dead destination's entries DEAD")
    sent = _entries(app.sessions, "pacs")
    assert [d.state for d in sent] == ["SENT"] * 6
    with app.sessions() as s:
        classified = {sid: at for sid, at in s.execute(select(Study.id, Study.classified_at))}
    latencies = [(d.sent_at - classified[d.study_id]).total_seconds() for d in sent if d.sent_at]
    with capsys.disabled():
        print(f"\nhealthy destination latency after classification: max {max(latencies):.2f} s")
    # A serial sender would have waited at least one 4 s connect timeout of the dead one.
    assert max(latencies) < 3.0
    dead = _entries(app.sessions, "dead")
    assert all(d.attempts == 2 for d in dead)
    assert all("timed out after" in (d.last_error or "") for d in dead)
    # ``radflag outbox retry`` brings the dead destination's entries back once it is up.
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "radflag.db"}"\n')
    with storage_scp(dead_port, classes) as revived:
        assert radflag_main(["outbox", "retry", "-c", str(cfg), "--all-dead"]) == 0
        got = revived.wait_for(6, timeout_s=60)
        assert len({str(ds.SOPInstanceUID) for ds in got}) == 6
        wait_until(
            lambda: all(d.state == "SENT" for d in _entries(app.sessions, "dead")),
            what="retried entries SENT",
        )
    capsys.readouterr()


def _outbox_with_entries(db_url: str, results: Spool, n: int, port: int) -> list[str]:
    """A database with ``n`` due outbox entries (one study each) whose files are real DX."""
    engine = make_engine(db_url)
    ensure_schema(engine)
    sessions = make_session_factory(engine)
    uids: list[str] = []
    with sessions.begin() as s:
        for i in range(n):
            ds = make_dx(seed=100 + i)
            path = results.path_for(
                str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            )
            results.write(ds, ds.file_meta, path)
            sop_uid = str(ds.SOPInstanceUID)
            entry = DueEntry(str(ds.StudyInstanceUID), sop_uid, str(path), port, kind="SC")
            add_due_entry(s, entry)
            uids.append(sop_uid)
    engine.dispose()
    return uids


@pytest.mark.postgres
def test_two_senders_on_postgresql_never_send_an_entry_twice(
    tmp_path: Path, postgres_url: str
) -> None:
    n = 24
    with storage_scp(0, [DigitalXRayImageStorageForPresentation]) as pacs:
        results = Spool(tmp_path / "results")
        uids = _outbox_with_entries(postgres_url, results, n, pacs.port)
        # Small claims: the two senders compete for the same rows round after round.
        settings = DeliverySettings(max_per_association=2)
        engines = [make_engine(postgres_url) for _ in range(2)]
        senders = [
            Sender(make_session_factory(e), settings, results, owner=f"sender-{i}")
            for i, e in enumerate(engines)
        ]
        go = threading.Event()

        def run(sender: Sender) -> None:
            go.wait()
            deadline = time.monotonic() + 60
            while len(pacs.received) < n and time.monotonic() < deadline:
                sender.run_round()
                time.sleep(0.005)

        threads = [threading.Thread(target=run, args=(s,)) for s in senders]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(timeout=90)
        for sender in senders:
            assert sender.stop()
        time.sleep(0.5)  # a duplicate C-STORE would arrive by now
        counts = Counter(str(ds.SOPInstanceUID) for ds in pacs.received)
    assert sorted(counts) == sorted(uids)
    assert set(counts.values()) == {1}, "an entry was C-STOREd more than once"
    sessions = make_session_factory(engines[0])
    with sessions() as s:
        rows = s.scalars(select(Delivery)).all()
        assert {d.state for d in rows} == {"SENT"} and {d.attempts for d in rows} == {1}
        assert len(s.scalars(select(DeliveryAttempt)).all()) == n
    for e in engines:
        e.dispose()


@contextmanager
def slow_scp(delay_s: float) -> Iterator[list[str]]:
    """A Storage SCP that takes ``delay_s`` per C-STORE; yields the SOP UIDs it stored."""
    ae = AE(ae_title="SLOW")
    ae.add_supported_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        time.sleep(delay_s)
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    stored.append(str(server.server_address[1]))  # first item: the port
    try:
        yield stored
    finally:
        server.shutdown()


def test_stopping_sender_finishes_the_store_in_flight_and_releases_the_rest(
    tmp_path: Path,
) -> None:
    results = Spool(tmp_path / "results")
    url = f"sqlite:///{tmp_path / 'radflag.db'}"
    with slow_scp(1.0) as stored:
        port = int(stored.pop(0))
        uids = _outbox_with_entries(url, results, 4, port)
        sessions = make_session_factory(make_engine(url))
        sender = Sender(sessions, DeliverySettings(), results, owner="s1")
        sender.run_round()  # one destination: one association carries all 4, in order
        wait_until(lambda: len(stored) >= 1, timeout_s=30, what="first C-STORE")
        assert sender.stop(timeout_s=10)
    with sessions() as s:
        states = {d.sop_instance_uid: d for d in s.scalars(select(Delivery))}
    sent = [u for u in uids if states[u].state == "SENT"]
    released = [u for u in uids if states[u].state == "PENDING"]
    assert sent == stored and 1 <= len(sent) < 4  # what was in flight finished
    assert len(sent) + len(released) == 4
    assert all(states[u].attempts == 0 and states[u].lease_owner is None for u in released)
    assert claim_due(sessions, "s2", lease_s=60) != []  # due again at once, for anyone


def test_refused_compressed_syntax_falls_back_to_uncompressed(tmp_path: Path, start_app) -> None:
    """A PACS that takes Secondary Capture only uncompressed gets the native file at once."""
    ae = AE(ae_title="NATIVE")
    ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.context.transfer_syntax))
        return 0x0000

    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        port = server.server_address[1]
        settings = make_settings(
            tmp_path,
            None,
            destinations=[
                {
                    "name": "old",
                    "ae_title": "NATIVE",
                    "host": "127.0.0.1",
                    "port": port,
                    "outputs": ["SC"],
                    "transfer_syntax": "jpeg2000_lossless",
                }
            ],
        )
        app = start_app(settings)
        ds = make_dx(seed=71)
        assert dcmsend(app.port, save(ds, tmp_path / "a.dcm")).returncode == 0
        wait_until(lambda: len(received) == 1, what="the SC")
        wait_until(
            lambda: [d.state for d in _entries(app.sessions, "old")] == ["SENT"], what="SENT"
        )
    finally:
        server.shutdown()
    assert received == [ExplicitVRLittleEndian]
    (entry,) = _entries(app.sessions, "old")
    assert entry.attempts == 1 and entry.payload_path.endswith("JPEG2000Lossless.dcm")
