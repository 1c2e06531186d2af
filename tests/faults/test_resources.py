"""An unreachable database and a full disk under a running radflag (in-process, real peers).

Figures (printed as ``FIGURES``): false acknowledgements (success answered for an instance
that has no row or file), lost (acknowledged, then missing), unanswered C-STOREs, C-ECHO
failures during the outage, and whether the same instances are stored once the resource
is back.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from daemon.app import Radflag
from daemon.settings import Settings
from db.models import Instance, Study
from tests.daemon.conftest import make_settings, wait_until
from tests.dicom_io.test_security import small_tmpfs as small_tmpfs  # reused fixture
from tests.faults.relay import CuttableRelay
from tests.peers.dcmtk import dcmtk_available, echoscu
from tests.peers.dcmtk import storescu as peers_storescu
from tests.peers.dicomgen import make_study

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]
REFUSED = "Refused: OutOfResources"  # 0xA700 as storescu -v prints it (PS3.4 B.2.3)


def storescu(port: int, *files: Path) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu that keeps sending after a refused instance (``--no-halt``)."""
    return peers_storescu(
        port, files, called_aet="RADFLAG", calling_aet="MODALITY", extra_args=["--no-halt"]
    )


@pytest.fixture
def relay(postgres_url: str) -> Iterator[CuttableRelay]:
    url = make_url(postgres_url)
    proxy = CuttableRelay((url.host or "127.0.0.1", url.port or 5432))
    yield proxy
    proxy.close()


def _rows(app: Radflag) -> dict[str, str]:
    with app.sessions() as s:
        return dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).tuples().all())


def _state(app: Radflag, uid: str) -> str | None:
    with app.sessions() as s:
        return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))


def test_unreachable_database_refuses_and_recovers(
    tmp_path: Path,
    postgres_url: str,
    relay: CuttableRelay,
    start_app: Callable[[Settings], Radflag],
) -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK not installed")
    url = make_url(postgres_url).set(host="127.0.0.1", port=relay.port)
    app = start_app(
        make_settings(tmp_path, None, database={"url": url.render_as_string(hide_password=False)})
    )
    before = make_study(2, tmp_path / "before", patient_id="P1")
    during = make_study(3, tmp_path / "during", patient_id="P2")
    assert storescu(app.port, *before.paths).returncode == 0

    relay.cut()
    started = time.monotonic()
    refused = storescu(app.port, *during.paths)
    outage_answer_s = time.monotonic() - started
    echo_rc = echoscu(app.port, called_aet="RADFLAG", timeout_s=10).returncode
    relay.restore()

    wait_until(lambda: _healthy(app), timeout_s=30, what="database reachable again")
    acked_in_outage = refused.stderr.count("Received Store Response (Success)")
    false_acks = acked_in_outage - len(set(_rows(app)) & set(during.sop_instance_uids))
    retried = storescu(app.port, *during.paths)
    rows = _rows(app)
    spool = tmp_path / "spool"
    wait_until(lambda: _state(app, during.study_uid) == "DONE", timeout_s=60, what="DONE")
    print(
        f"FIGURES outage_store_answers={refused.stderr.count(REFUSED)}/{len(during.paths)} "
        f"false_acks={false_acks} outage_answer_s={outage_answer_s:.2f} echo_rc={echo_rc} "
        f"retried_rc={retried.returncode} stored_after={len(rows)}"
    )
    assert refused.stderr.count(REFUSED) == len(during.paths), refused.stderr
    assert false_acks == 0
    assert echo_rc == 0  # C-ECHO does not need the database
    assert retried.returncode == 0, retried.stderr
    assert set(rows) == set(before.sop_instance_uids) | set(during.sop_instance_uids)
    assert all(
        (spool / p if not Path(p).is_absolute() else Path(p)).is_file() for p in rows.values()
    )
    assert _state(app, before.study_uid) in {"DONE", "READY", "PROCESSING", "RECEIVING"}


def _healthy(app: Radflag) -> bool:
    try:
        _rows(app)
    except Exception:
        return False
    return True


def test_full_disk_refuses_without_false_acknowledgement(
    tmp_path: Path, small_tmpfs: Path, start_app: Callable[[Settings], Radflag]
) -> None:
    """A real 3 MiB tmpfs as spool: studies that do not fit get 0xA700, never a false 0x0000."""
    if not dcmtk_available():
        pytest.skip("DCMTK not installed")
    app = start_app(
        make_settings(
            tmp_path,
            None,
            storage={"spool_dir": str(small_tmpfs / "spool"), "results_dir": str(tmp_path / "r")},
            listener={"min_free_disk_mb": 0},
        )
    )
    studies = [make_study(4, tmp_path / f"s{i}", patient_id=f"P{i}", upscale=2) for i in range(6)]
    pushed = [storescu(app.port, *study.paths) for study in studies]
    rows = _rows(app)
    acked = sum(p.stderr.count("Received Store Response (Success)") for p in pushed)
    refused = sum(p.stderr.count(REFUSED) for p in pushed)
    echo_rc = echoscu(app.port, called_aet="RADFLAG", timeout_s=10).returncode
    on_disk = [app.spool.resolve(p) for p in rows.values() if app.spool.resolve(p).is_file()]
    print(
        f"FIGURES sent={sum(len(s.paths) for s in studies)} acknowledged={acked} "
        f"refused_0xA700={refused} rows={len(rows)} files={len(on_disk)} echo_rc={echo_rc}"
    )
    assert refused > 0  # the disk did fill up
    assert acked + refused == sum(len(s.paths) for s in studies)  # every instance answered
    assert acked == len(rows) == len(on_disk)  # every acknowledged instance is stored
    assert echo_rc == 0
