"""A full pipeline run (DCMTK sender -> radflag -> PACS) on SQLite and on PostgreSQL.

The study's audit trail is asserted event by event, the admin commands are run against the
same database, and the daemon's own retention job purges the study's pixel data afterwards.
Run with ``-rP`` to see the ``radflag audit``/``stats``/``studies show`` outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from daemon.cli import main
from db.models import Instance, ModelRecord, Result, Study
from db.queries import audit_trail
from tests.daemon.conftest import (  # noqa: F401 - fixtures used by name
    PacsStandIn,
    dcmsend,
    make_settings,
    pacs,
    start_app,
    tiny_bundle,
    tiny_models,
    wait_until,
)
from tests.dicom_io.conftest import make_dx, save

pytestmark = pytest.mark.dcmtk


TRANSCRIPT: list[str] = []


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    out = capsys.readouterr().out
    TRANSCRIPT.append(f"$ radflag {' '.join(argv)}\n{out}")
    return out


def test_full_run_audit_trail_admin_commands_and_retention(
    db_url: str,
    tmp_path: Path,
    pacs: PacsStandIn,  # noqa: F811
    start_app: Any,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = make_dx(seed=21)
    study_uid = str(first.StudyInstanceUID)
    second = make_dx(study_uid=study_uid, seed=22)
    files = [save(first, tmp_path / "a.dcm"), save(second, tmp_path / "b.dcm")]
    settings = make_settings(
        tmp_path,
        pacs.port,
        database={"url": db_url},
        retention={"spool_max_age_days": 2e-5, "check_interval_s": 0.3},  # ~1.7 s
        destinations=[  # SR only: one outbox row keeps the expected trail short
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "outputs": ["SR"],
            }
        ],
    )
    app = start_app(settings)
    sent = dcmsend(app.port, *files)
    assert sent.returncode == 0, sent.stderr
    (sr,) = pacs.wait_for(1)

    def trail_types() -> list[str]:
        return [e.event_type for e in audit_trail(app.sessions, study_uid)]

    wait_until(lambda: trail_types()[-1:] == ["INSTANCES_PURGED"], what="retention purge")
    trail = audit_trail(app.sessions, study_uid)
    sops = [str(first.SOPInstanceUID), str(second.SOPInstanceUID)]
    worker = f"worker:{app.worker_id}"
    expected: list[tuple[str, str, str | None]] = [
        ("INSTANCE_RECEIVED", "scp:MODALITY@127.0.0.1", sops[0]),
        ("INSTANCE_RECEIVED", "scp:MODALITY@127.0.0.1", sops[1]),
        ("STUDY_READY", "scheduler", None),
        ("STUDY_CLAIMED", worker, None),
        ("IMAGES_SELECTED", worker, None),
        ("DELIVERY_QUEUED", worker, str(sr.SOPInstanceUID)),
        ("STUDY_CLASSIFIED", worker, None),
        ("DELIVERY_SENT", "outbox", str(sr.SOPInstanceUID)),
        ("STUDY_DONE", "outbox", None),
        ("INSTANCES_PURGED", "retention", None),
    ]
    assert [(e.event_type, e.actor, e.sop_instance_uid) for e in trail] == expected
    assert all(e.study_instance_uid == study_uid for e in trail)
    assert [e.at for e in trail] == sorted(e.at for e in trail)
    d = [e.detail for e in trail]
    assert d[0]["modality"] == "DX" and d[0]["size_bytes"] > 0
    assert (d[2]["from_state"], d[2]["to_state"]) == ("RECEIVING", "READY")
    assert (d[3]["from_state"], d[3]["to_state"], d[3]["attempt"]) == ("READY", "PROCESSING", 1)
    assert sorted(d[4]["test-pneumonia"]["selected"]) == sorted(sops)
    assert (d[5]["destination"], d[5]["kind"]) == ("pacs", "SR")
    card = app.models[0].bundle.card
    (result,) = d[6]["results"]
    assert (result["model"], result["version"], result["weights_sha256"]) == (
        card.name,
        card.version,
        card.weights_sha256,
    )
    assert result["n_images"] == 2 and 0.0 <= result["probability"] <= 1.0
    assert (d[6]["from_state"], d[6]["to_state"]) == ("PROCESSING", "DELIVERING")
    assert (d[7]["ae_title"], d[7]["port"], d[7]["attempt"]) == ("PACS", pacs.port, 1)
    assert (d[8]["from_state"], d[8]["to_state"]) == ("DELIVERING", "DONE")
    assert d[9]["purged"] == 2 and sorted(d[9]["sop_instance_uids"]) == sorted(sops)
    with app.sessions() as s:
        study = s.scalars(select(Study)).one()
        assert study.state == "DONE"
        assert study.patient_key not in (None, "PID-0001") and len(study.patient_key or "") == 64
        for inst in s.scalars(select(Instance)).all():
            assert inst.purged_at is not None and not app.spool.resolve(inst.path).exists()
        assert s.scalars(select(Result)).one().sr_sop_instance_uid == sr.SOPInstanceUID
        (model,) = s.scalars(select(ModelRecord)).all()
        assert (model.name, model.version, model.weights_sha256) == (
            card.name,
            card.version,
            card.weights_sha256,
        )
        assert model.card["threshold"] == card.threshold

    cfg = tmp_path / "radflag.toml"
    cfg.write_text(f'[database]\nurl = "{db_url}"\n')
    got = json.loads(
        _run_cli(capsys, "audit", "--config", str(cfg), "--study", study_uid, "--format", "json")
    )
    assert [(e["event_type"], e["actor"], e["sop_instance_uid"]) for e in got] == expected
    assert all(e["study_state"] == "DONE" and e["calling_ae"] == "MODALITY" for e in got)
    positive = result["positive"]
    flagged = json.loads(
        _run_cli(
            capsys,
            "audit",
            "-c",
            str(cfg),
            "--since",
            "1h",
            "--model",
            card.name,
            "--model-version",
            card.version,
            "--decision",
            "positive" if positive else "negative",
            "--event",
            "STUDY_CLASSIFIED,DELIVERY_SENT",
            "--format",
            "json",
        )
    )
    assert [e["event_type"] for e in flagged] == ["STUDY_CLASSIFIED", "DELIVERY_SENT"]
    none = json.loads(
        _run_cli(
            capsys,
            "audit",
            "-c",
            str(cfg),
            "--study",
            study_uid,
            "--decision",
            "negative" if positive else "positive",
            "--format",
            "json",
        )
    )
    assert none == []

    stats = json.loads(_run_cli(capsys, "stats", "-c", str(cfg), "--format", "json"))
    assert stats["studies_by_state"]["DONE"] == 1 and stats["studies_in_window"] == 1
    assert stats["deliveries_by_state"]["SENT"] == 1
    assert {lat["stage"]: lat["n"] for lat in stats["latencies"]} == {
        "received_to_ready": 1,
        "ready_to_classified": 1,
        "classified_to_delivered": 1,
        "received_to_delivered": 1,
    }
    e2e = next(x for x in stats["latencies"] if x["stage"] == "received_to_delivered")
    assert e2e["p50_s"] == pytest.approx((trail[8].at - trail[0].at).total_seconds(), abs=0.01)
    (rate,) = stats["positive_rate"]
    assert (rate["model_name"], rate["model_version"], rate["n_results"]) == (
        card.name,
        card.version,
        1,
    )
    assert rate["n_positive"] == int(positive)

    table = _run_cli(capsys, "stats", "-c", str(cfg))
    assert "STAGE LATENCY" in table and card.version in table
    shown = _run_cli(capsys, "studies", "show", study_uid, "-c", str(cfg))
    assert f"STUDY {study_uid}" in shown and "INSTANCES_PURGED" in shown
    assert card.weights_sha256[:16] in shown and "attempt 1" in shown
    shown_json = json.loads(
        _run_cli(capsys, "studies", "-c", str(cfg), "show", study_uid, "--format", "json")
    )
    assert [e["event_type"] for e in shown_json["events"]] == [x[0] for x in expected]
    _run_cli(capsys, "audit", "-c", str(cfg), "--study", study_uid)
    print("\n".join(TRANSCRIPT))  # shown with -rP
    TRANSCRIPT.clear()
