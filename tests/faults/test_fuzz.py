"""A thousand broken data sets, derived from real files, sent at a real radflag.

radflag runs in-process (listener, SQLite, worker with a tiny real network); the data sets
come from :mod:`tests.faults.fuzz`. Figures (printed as ``FIGURES``): unanswered (no
C-STORE response), crashed (handler bugs: "internal error" answers or logged handler
exceptions; a listener that stops answering C-ECHO), lost (acknowledged but without its
row or its exact bytes on disk), duplicated (two results of one study from the same
images; a late instance legitimately makes a new revision), stuck
(a study with an acknowledged instance that is not DONE, NOT_APPLICABLE or FAILED after
the processing window).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from sqlalchemy import func, select

from daemon.app import Radflag
from daemon.settings import Settings
from db.models import Instance, Result, Study
from tests.conftest import shared_path
from tests.daemon.conftest import make_settings, wait_until
from tests.faults.fuzz import Mutant, base_datasets, corpus
from tests.peers.dcmtk import dcmtk_available, echoscu
from tests.peers.dicomgen import kermany_images

pytestmark = pytest.mark.slow

N_MUTANTS = 1000
PER_ASSOCIATION = 50
SEND_BUDGET_S = 90.0
PROCESS_BUDGET_S = 120.0
ACKNOWLEDGED = {0x0000, 0xB000, 0xB006, 0xB007}
TERMINAL = {"DONE", "NOT_APPLICABLE", "FAILED"}
CONTEXTS = [
    (sop_class, ts)
    for sop_class in (
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        SecondaryCaptureImageStorage,
    )
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit)
]


@dataclass
class Outcome:
    mutant: Mutant
    status: int | None  # None: no response
    elapsed_s: float = 0.0
    established: bool = True


def _associations(port: int, mutants: list[Mutant]) -> Iterator[tuple[Mutant, Association]]:
    """Yield each mutant with an open association of its calling AE (reopened as needed)."""
    assoc: Association | None = None
    current, sent = "", 0
    for mutant in mutants:
        if (
            assoc is None
            or not assoc.is_established
            or mutant.calling_ae != current
            or sent >= PER_ASSOCIATION
        ):
            if assoc is not None and assoc.is_established:
                assoc.release()
            ae = AE(ae_title=mutant.calling_ae)
            for sop_class, ts in CONTEXTS:
                ae.add_requested_context(sop_class, ts)
            assoc = ae.associate("127.0.0.1", port, ae_title="RADFLAG")
            current, sent = mutant.calling_ae, 0
        yield mutant, assoc
        sent += 1
    if assoc is not None and assoc.is_established:
        assoc.release()


def _send(port: int, mutants: list[Mutant], work: Path) -> list[Outcome]:
    outcomes = []
    for i, (mutant, assoc) in enumerate(_associations(port, mutants)):
        path = mutant.write(work / f"m{i:04d}.dcm")
        status: int | None = None
        began = time.monotonic()
        established = assoc.is_established
        if established:
            rsp = assoc.send_c_store(path)
            status = int(rsp.Status) if "Status" in rsp else None
        outcomes.append(Outcome(mutant, status, time.monotonic() - began, established))
        path.unlink()
    return outcomes


def _lost(app: Radflag, spool: Path, acked: list[Mutant]) -> list[str]:
    """Acknowledged SOP instances without a row, or whose file lacks the exact bytes sent."""
    with app.sessions() as s:
        rows = dict(s.execute(select(Instance.sop_instance_uid, Instance.path)).tuples().all())
    lost = []
    for mutant in acked:
        stored = rows.get(mutant.sop_instance_uid)
        path = None if stored is None else Path(stored)
        if path is not None and not path.is_absolute():
            path = spool / path
        if path is None or not path.is_file() or not path.read_bytes().endswith(mutant.body):
            lost.append(mutant.sop_instance_uid)
    return lost


def test_thousand_fuzzed_data_sets(
    tmp_path: Path,
    start_app: Callable[[Settings], Radflag],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shared = shared_path()
    bases = base_datasets(
        shared, kermany_images(shared / "cxr" / "kermany-pneumonia-train", 3), tmp_path
    )
    mutants = list(corpus(bases, N_MUTANTS))
    app = start_app(make_settings(tmp_path, None))
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    work = tmp_path / "send"
    work.mkdir()

    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        outcomes = _send(app.port, mutants, work)
    send_s = time.monotonic() - started

    acked = [o.mutant for o in outcomes if o.status in ACKNOWLEDGED]
    acked_studies = _study_uids(app, [m.sop_instance_uid for m in acked])
    wait_until(
        lambda: _states(app, acked_studies) <= TERMINAL,
        timeout_s=PROCESS_BUDGET_S,
        what="every study with an acknowledged instance terminal",
    )
    states = _state_counts(app, acked_studies)
    unanswered = [o for o in outcomes if o.status is None]
    crashed = [r for r in caplog.records if "unexpected error in C-STORE handler" in r.getMessage()]
    lost = _lost(app, tmp_path / "spool", acked)
    with app.sessions() as s:
        results = Counter(
            (study_id, tuple(sorted(images)))
            for study_id, images in s.execute(select(Result.study_id, Result.images)).tuples()
        )
        instance_rows = s.scalar(select(func.count()).select_from(Instance))
    duplicated = [k for k, n in results.items() if n > 1]  # same study, same images, twice
    sink_down = [r for r in caplog.records if "database unavailable" in r.getMessage()]
    by_kind: dict[str, Counter[str]] = {}
    for o in outcomes:
        by_kind.setdefault(o.mutant.kind, Counter())[
            f"{o.status:#06x}" if o.status is not None else "none"
        ] += 1
    echo_rc = echoscu(app.port, called_aet="RADFLAG").returncode if dcmtk_available() else 0

    print(
        f"FIGURES sent={len(outcomes)} send_s={send_s:.1f} unanswered={len(unanswered)} "
        f"crashed={len(crashed)} acknowledged={len(acked)} instance_rows={instance_rows} "
        f"lost={len(lost)} duplicated_results={len(duplicated)} studies={len(acked_studies)} "
        f"sink_unavailable={len(sink_down)} "
        f"terminal={dict(states)}"
    )
    with app.sessions() as s:
        ended = s.execute(
            select(Study.state, Study.failure_reason).where(
                Study.study_instance_uid.in_(acked_studies)
            )
        ).tuples()
        reasons = Counter(
            f"{state}: {(reason or '').split(' of ')[0].split(':')[0]}" for state, reason in ended
        )
        quarantined = s.scalar(select(func.count()).where(Instance.quarantined.is_(True)))
    print(f"FIGURES quarantined_instances={quarantined} study_reasons={dict(reasons)}")
    slowest = max(outcomes, key=lambda o: o.elapsed_s)
    print(f"FIGURES slowest_answer_s={slowest.elapsed_s:.2f} ({slowest.mutant.kind})")
    for o in unanswered:
        print(f"FIGURES unanswered {o.mutant.kind} after {o.elapsed_s:.2f}s assoc={o.established}")
    for kind, statuses in sorted(by_kind.items()):
        print(f"FIGURES {kind}: {dict(statuses)}")
    assert send_s <= SEND_BUDGET_S
    assert unanswered == []
    assert crashed == []
    assert lost == []
    assert duplicated == []
    assert instance_rows == len(acked)
    assert not [r for r in reasons if r.startswith("FAILED") and r == "FAILED: "]  # with a reason
    assert echo_rc == 0
    assert all(o.status not in ACKNOWLEDGED for o in outcomes if o.mutant.kind == "wrong_identity")
    assert all(o.status in ACKNOWLEDGED for o in outcomes if o.mutant.kind == "odd_ae_title")


def _study_uids(app: Radflag, sop_uids: list[str]) -> set[str]:
    with app.sessions() as s:
        rows = s.scalars(
            select(Study.study_instance_uid)
            .join(Instance, Instance.study_id == Study.id)
            .where(Instance.sop_instance_uid.in_(sop_uids))
        ).all()
    return set(rows)


def _states(app: Radflag, study_uids: set[str]) -> set[str]:
    return set(_state_counts(app, study_uids))


def _state_counts(app: Radflag, study_uids: set[str]) -> Counter[str]:
    with app.sessions() as s:
        rows = s.scalars(select(Study.state).where(Study.study_instance_uid.in_(study_uids))).all()
    return Counter(str(r) for r in rows)
