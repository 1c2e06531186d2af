"""The PACS is down for two minutes while results are due: all arrive once it is back."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import select

from db.models import Delivery, DeliveryAttempt, Study
from tests.daemon.conftest import dcmsend, make_settings, wait_until
from tests.daemon.test_outbox import storage_scp
from tests.dicom_io.conftest import free_port, make_dx, save

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

OUTAGE_S = 120.0


def test_pacs_outage_every_result_arrives_once(tmp_path: Path, start_app) -> None:
    port = free_port()
    settings = make_settings(
        tmp_path,
        None,
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": port,
                "outputs": ["SR", "SC"],
            }
        ],
        delivery={"backoff_base_s": 1.0, "backoff_max_s": 8.0, "max_attempts": 100},
    )
    app = start_app(settings)
    outage_start = time.monotonic()
    studies = [make_dx(seed=40 + i) for i in range(3)]
    for i, ds in enumerate(studies):
        assert dcmsend(app.port, save(ds, tmp_path / f"{i}.dcm")).returncode == 0

    def all_due() -> bool:
        with app.sessions() as s:
            return (
                s.scalar(select(Delivery.id).where(Delivery.attempts == 0).limit(1)) is None
                and len(s.scalars(select(Delivery)).all()) == 6
            )

    wait_until(all_due, timeout_s=60, what="6 results queued and tried")
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_start)))
    with storage_scp(port, [Comprehensive3DSRStorage, SecondaryCaptureImageStorage]) as pacs:

        def all_done() -> bool:
            with app.sessions() as s:
                return set(s.scalars(select(Study.state)).all()) == {"DONE"}

        wait_until(all_done, timeout_s=30, what="every study DONE after the outage")
        time.sleep(2 * settings.delivery.check_interval_s)  # nothing more may arrive
        received = Counter(str(ds.SOPInstanceUID) for ds in pacs.received)
    with app.sessions() as s:
        deliveries = s.scalars(select(Delivery)).all()
        expected = {d.sop_instance_uid for d in deliveries}
        assert len(expected) == 6
        assert set(received) == expected
        assert max(received.values()) == 1  # none twice
        for d in deliveries:
            attempts = s.scalars(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id == d.id)
                .order_by(DeliveryAttempt.id)
            ).all()
            oks = [a.ok for a in attempts]
            assert oks[-1] is True and oks.count(True) == 1
            assert len(oks) >= 5  # several failed tries during the outage, all recorded
            assert d.state == "SENT" and d.attempts == len(oks)
