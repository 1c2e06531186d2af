"""The models table, and patient identifiers: pseudonymised by default, clear on request."""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.admin_models import ModelIdentity, list_models, record_models_in_use
from db.ingest import NewInstance, PatientIdPolicy, record_instance
from db.models import ModelRecord, Study, utcnow
from tests.db.conftest import ResultSpec, add_study

V1 = ModelIdentity("pneumonia", "1.0.0", "ab" * 32, {"threshold": 0.5})
V1_OTHER_WEIGHTS = ModelIdentity("pneumonia", "1.0.0", "cd" * 32, {"threshold": 0.5})


def test_models_recorded_once_per_identity(sessions: sessionmaker[Session]) -> None:
    t0 = utcnow() - timedelta(days=2)
    record_models_in_use(sessions, [V1], now=t0)
    record_models_in_use(
        sessions, [ModelIdentity(V1.name, V1.version, V1.weights_sha256, {"threshold": 0.6})]
    )
    record_models_in_use(sessions, [V1_OTHER_WEIGHTS], now=t0 + timedelta(hours=1))
    with sessions() as s:
        rows = s.scalars(select(ModelRecord).order_by(ModelRecord.id)).all()
        assert [(r.version, r.weights_sha256[:2]) for r in rows] == [
            ("1.0.0", "ab"),
            ("1.0.0", "cd"),
        ]
        assert rows[0].first_used_at == t0 and rows[0].last_used_at > t0 + timedelta(days=1)
        assert rows[0].card == {"threshold": 0.6}  # the card of the latest start
    add_study(
        sessions,
        "9.1",
        state="DONE",
        received_at=t0,
        quiet_s=1,
        classify_s=1,
        results=(ResultSpec(),),
    )
    usage = {m.weights_sha256[:2]: m for m in list_models(sessions)}
    assert usage["ab"].n_results == 1 and usage["ab"].last_result_at is not None
    assert usage["cd"].n_results == 0 and usage["cd"].last_result_at is None
    assert list(usage) == ["ab", "cd"]  # most recently used first


def _inst(patient_id: str | None, sop: str, study: str) -> NewInstance:
    return NewInstance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid=study,
        series_instance_uid=study + ".0",
        modality="DX",
        patient_id=patient_id,
        calling_ae="MODALITY",
        peer_host="127.0.0.1",
        path=f"/spool/{sop}.dcm",
        size_bytes=1,
        transfer_syntax_uid=None,
    )


def test_patient_id_pseudonymised_by_default_and_clear_on_request(
    sessions: sessionmaker[Session],
) -> None:
    key = b"site-secret"
    hashed = PatientIdPolicy(key=key)
    record_instance(sessions, _inst("PAT-42", "1.1.1", "1.1"), hashed)
    record_instance(sessions, _inst("PAT-42", "1.2.1", "1.2"), hashed)
    record_instance(sessions, _inst("PAT-42", "1.3.1", "1.3"), PatientIdPolicy(key=b"other"))
    record_instance(
        sessions, _inst("PAT-42", "1.4.1", "1.4"), PatientIdPolicy(key=key, store_clear=True)
    )
    record_instance(sessions, _inst(None, "1.5.1", "1.5"), hashed)
    with sessions() as s:
        keys = dict(s.execute(select(Study.study_instance_uid, Study.patient_key)).all())
    expected = hmac.new(key, b"PAT-42", hashlib.sha256).hexdigest()
    assert keys["1.1"] == keys["1.2"] == expected  # same patient, same key: linkable
    assert keys["1.3"] != expected  # another site key gives another pseudonym
    assert keys["1.4"] == "PAT-42"
    assert keys["1.5"] is None
