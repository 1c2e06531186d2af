"""The admin HTTP server of an in-process radflag: metrics, health, token-protected API."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine, select

from daemon.app import Radflag
from daemon.http.health import check_database, check_models, check_writable
from daemon.http.server import HttpServerError
from daemon.settings import Settings
from db.models import Delivery, DeliveryAttempt, Study
from tests.daemon.conftest import PacsStandIn, make_settings, storescu, wait_until
from tests.dicom_io.conftest import make_dx, save

TOKEN = "test-token-0123456789abcdef"
PATIENT_NAME = "Zyxwv^Quentin"
PATIENT_ID = "PID-SECRET-98765"


def http_settings(tmp_path: Path, pacs_port: int | None, **sections: dict[str, Any]) -> Settings:
    return make_settings(
        tmp_path,
        pacs_port,
        http={"enabled": True, "host": "127.0.0.1", "port": 0, "token": TOKEN},
        **sections,
    )


def get(
    app: Radflag, path: str, token: str | None = None, timeout_s: float = 10
) -> tuple[int, dict[str, str], bytes]:
    assert app.http is not None
    req = urllib.request.Request(f"http://127.0.0.1:{app.http.port}{path}")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def api(app: Radflag, path: str) -> Any:
    status, _, body = get(app, f"/api/v1{path}", TOKEN)
    assert status == 200, body
    return json.loads(body)


def scrape(app: Radflag) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of ``/metrics`` keyed by (name, sorted labels)."""
    status, headers, body = get(app, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def send_study(app: Radflag, tmp_path: Path, n: int = 1, **attrs: Any) -> str:
    study_uid = None
    files = []
    for i in range(n):
        ds = make_dx(study_uid=study_uid, seed=i, **attrs)
        study_uid = str(ds.StudyInstanceUID)
        files.append(save(ds, tmp_path / f"in{i}.dcm"))
    sent = storescu(app.port, *files)
    assert sent.returncode == 0, sent.stderr
    assert study_uid is not None
    return study_uid


def study_state(app: Radflag, uid: str) -> str | None:
    with app.sessions() as s:
        return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))


def outbox_states(app: Radflag) -> set[str]:
    with app.sessions() as s:
        return set(s.scalars(select(Delivery.state)).all())


@pytest.mark.dcmtk
def test_metrics_counters_move_after_a_study_went_through(
    tmp_path: Path, pacs: PacsStandIn, start_app: Callable[[Settings], Radflag]
) -> None:
    app = start_app(
        http_settings(tmp_path, pacs.port, listener={"allowed_calling_aes": ["MODALITY"]})
    )
    before = scrape(app)
    assert sample(before, "radflag_received_total", outcome="new") == 0
    assert sample(before, "radflag_database_up") == 1

    uid = send_study(app, tmp_path, n=2)
    wait_until(lambda: study_state(app, uid) == "DONE", what="study DONE")
    with app.sessions() as s:
        n_sent = len(s.scalars(select(Delivery).where(Delivery.state == "SENT")).all())
        n_attempts = len(s.scalars(select(DeliveryAttempt)).all())
    assert n_sent >= 1
    assert len(pacs.wait_for(n_sent)) == n_sent
    # A sender that is not allowed: the association is rejected (PS3.8 7.1.1.9).
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", app.port, ae_title="RADFLAG")
    assert not assoc.is_established
    wait_until(lambda: sample(scrape(app), "radflag_delivered_total") == n_sent, what="sends")

    after = scrape(app)
    assert sample(after, "radflag_received_total", outcome="new") == 2
    assert sample(after, "radflag_received_total", outcome="duplicate") == 0
    assert sample(after, "radflag_rejected_total", kind="association") == 1
    assert sample(after, "radflag_rejected_total", kind="instance") == 0
    assert (
        sample(after, "radflag_classified_total", model="test-pneumonia", version="0.0.1-test") == 1
    )
    assert sample(after, "radflag_delivered_total") == n_sent
    assert sample(after, "radflag_failed_total", stage="processing") == 0
    for stage in (
        "decode",
        "inference",
        "sr",
        "processing",
        "received_to_ready",
        "ready_to_classified",
    ):
        assert sample(after, "radflag_stage_duration_seconds_count", stage=stage) == 1, stage
        assert sample(after, "radflag_stage_duration_seconds_sum", stage=stage) > 0, stage
    for stage, n in (("delivery_attempt", n_attempts), ("classified_to_delivered", n_sent)):
        assert sample(after, "radflag_stage_duration_seconds_count", stage=stage) == n, stage
        assert sample(after, "radflag_stage_duration_seconds_sum", stage=stage) > 0, stage
    # The quiet period (0.5 s) is part of received -> ready.
    assert sample(after, "radflag_stage_duration_seconds_sum", stage="received_to_ready") >= 0.5
    assert sample(after, "radflag_studies", state="DONE") == 1
    assert sample(after, "radflag_queue_depth") == 0
    assert sample(after, "radflag_outbox_backlog") == 0
    assert sample(after, "radflag_outbox_entries", state="SENT") == n_sent


@pytest.mark.dcmtk
def test_dead_letter_and_failure_show_in_api_and_metrics(
    tmp_path: Path, start_app: Callable[[Settings], Radflag]
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: every send is refused
    app = start_app(
        http_settings(
            tmp_path,
            dead_port,
            delivery={"max_attempts": 2, "backoff_base_s": 0.1, "timeout_s": 2},
        )
    )
    uid = send_study(app, tmp_path)
    wait_until(lambda: study_state(app, uid) == "DELIVERY_FAILED", what="DELIVERY_FAILED")
    wait_until(lambda: outbox_states(app) == {"DEAD"}, what="every delivery DEAD")
    with app.sessions() as s:
        dead_rows = s.scalars(select(Delivery).where(Delivery.state == "DEAD")).all()
        n_attempts = len(s.scalars(select(DeliveryAttempt)).all())
    n_dead = len(dead_rows)
    assert n_dead >= 1 and n_attempts == 2 * n_dead
    wait_until(
        lambda: sample(scrape(app), "radflag_failed_total", stage="delivery") == n_dead,
        what="dead letters counted",
    )
    m = scrape(app)
    assert sample(m, "radflag_retried_total", stage="delivery") == n_dead
    assert sample(m, "radflag_delivered_total") == 0
    assert sample(m, "radflag_stage_duration_seconds_count", stage="delivery_attempt") == n_attempts
    assert sample(m, "radflag_outbox_entries", state="DEAD") == n_dead

    dead = api(app, "/dead-letters")
    assert sorted(d["delivery_id"] for d in dead) == sorted(d.id for d in dead_rows)
    for d in dead:
        assert d["study_instance_uid"] == uid
        assert d["destination"] == "pacs"
        assert d["attempts"] == 2
        assert d["last_error"]
    (failed,) = api(app, "/failures")
    assert failed["study_instance_uid"] == uid
    assert failed["state"] == "DELIVERY_FAILED"
    overview = api(app, "/overview")
    assert overview["dead_letters"] == n_dead
    assert overview["studies_by_state"]["DELIVERY_FAILED"] == 1
    hours = api(app, "/throughput?hours=2")["buckets"]
    assert len(hours) == 2
    assert hours[-1]["received_instances"] == 1
    assert hours[-1]["classified_studies"] == 1
    assert hours[-1]["delivered_objects"] == 0
    assert hours[-1]["failed_studies"] == 1
    assert hours[-1]["dead_letters"] == n_dead


@pytest.mark.dcmtk
def test_api_needs_the_token_probes_do_not(
    tmp_path: Path, start_app: Callable[[Settings], Radflag]
) -> None:
    app = start_app(http_settings(tmp_path, None))
    for path in ("/overview", "/studies", "/failures", "/dead-letters", "/throughput", "/models"):
        status, headers, _ = get(app, f"/api/v1{path}")
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Bearer")
        assert get(app, f"/api/v1{path}", "wrong-token-0123456789")[0] == 401
        assert get(app, f"/api/v1{path}", TOKEN)[0] == 200
    assert get(app, "/api/v1/studies?limit=0", TOKEN)[0] == 422
    assert get(app, "/api/v1/studies/not-a-uid", TOKEN)[0] == 422
    assert get(app, "/api/v1/studies/1.2.3.4", TOKEN)[0] == 404

    status, _, body = get(app, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = get(app, "/readyz")
    ready = json.loads(body)
    assert status == 200, ready
    assert {c["name"]: c["ok"] for c in ready["checks"]} == {
        "database": True,
        "models": True,
        "spool": True,
        "results": True,
        "destinations": True,  # issue 14: says whether results reach anyone; never "not ready"
    }
    assert get(app, "/metrics")[0] == 200

    status, headers, body = get(app, "/dashboard/")
    assert status == 200
    assert b"radflag dashboard" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert get(app, "/dashboard/app.js")[0] == 200

    status, _, body = get(app, "/api/v1/openapi.json")
    assert status == 200
    spec = json.loads(body)
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in ("/api/v1/studies", "/api/v1/failures", "/api/v1/dead-letters", "/metrics"):
        assert path in spec["paths"]
    assert spec["paths"]["/api/v1/studies"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/readyz"]["get"]

    models = api(app, "/models")
    assert [(m["name"], m["loaded"]) for m in models] == [("test-pneumonia", True)]
    assert models[0]["card"]["threshold"] == 0.5


def test_without_a_token_the_api_is_off_but_probes_work(
    tmp_path: Path, start_app: Callable[[Settings], Radflag]
) -> None:
    settings = make_settings(tmp_path, None, http={"enabled": True, "port": 0})
    app = start_app(settings)
    status, _, body = get(app, "/api/v1/studies", "anything-at-all-0123")
    assert status == 503
    assert b"no [http] token" in body
    assert get(app, "/healthz")[0] == 200
    assert get(app, "/metrics")[0] == 200


@pytest.mark.dcmtk
def test_api_answers_carry_no_patient_identifiers(
    tmp_path: Path, pacs: PacsStandIn, start_app: Callable[[Settings], Radflag]
) -> None:
    app = start_app(http_settings(tmp_path, pacs.port))
    uid = send_study(app, tmp_path, PatientName=PATIENT_NAME, PatientID=PATIENT_ID)
    wait_until(lambda: study_state(app, uid) == "DONE", what="study DONE")
    with app.sessions() as s:
        patient_key = s.scalar(select(Study.patient_key).where(Study.study_instance_uid == uid))
    assert patient_key

    studies = api(app, "/studies")
    assert [s["study_instance_uid"] for s in studies] == [uid]
    assert studies[0]["positive"] in (True, False)
    assert studies[0]["model"] == "test-pneumonia 0.0.1-test"
    timeline = api(app, f"/studies/{uid}")
    assert timeline["study"]["study_instance_uid"] == uid
    assert len(timeline["instances"]) == 1
    answers = [
        get(app, f"/api/v1{p}", TOKEN)[2]
        for p in ("/overview", "/studies", f"/studies/{uid}", "/models", "/latency")
    ]
    answers.append(get(app, "/metrics")[2])
    for body in answers:
        text = body.decode()
        for secret in (PATIENT_ID, "Zyxwv", "Quentin", patient_key):
            assert secret not in text
        assert "patient" not in text.lower()


def test_readyz_reports_each_failed_check(
    tmp_path: Path, start_app: Callable[[Settings], Radflag]
) -> None:
    app = start_app(make_settings(tmp_path, None, http={"enabled": True, "port": 0}))
    shutil.rmtree(tmp_path / "spool")  # e.g. a volume that went away
    status, _, body = get(app, "/readyz")
    ready = json.loads(body)
    assert status == 503
    assert ready["status"] == "not ready"
    checks = {c["name"]: c for c in ready["checks"]}
    assert not checks["spool"]["ok"]
    assert "spool" in checks["spool"]["detail"]
    assert checks["database"]["ok"] and checks["models"]["ok"] and checks["results"]["ok"]
    assert get(app, "/healthz")[0] == 200  # alive, just not ready


def test_health_checks_fail_with_a_reason(tmp_path: Path) -> None:
    missing_db = create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    db = check_database(missing_db)
    assert not db.ok and "OperationalError" in db.detail
    assert check_database(create_engine(f"sqlite:///{tmp_path / 'x.db'}")).ok
    assert not check_models([]).ok
    assert check_models(["m 1"]).ok
    assert check_writable("spool", tmp_path).ok
    low = check_writable("spool", tmp_path, min_free_bytes=2**62)
    assert not low.ok and "free" in low.detail
    assert not check_writable("spool", tmp_path / "absent").ok


def test_http_port_in_use_fails_start_with_a_clear_error(
    tmp_path: Path, tiny_models: list[Any]
) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        settings = make_settings(tmp_path, None, http={"enabled": True, "port": port})
        app = Radflag(settings, models=tiny_models)
        try:
            with pytest.raises(HttpServerError, match=f"127.0.0.1:{port}"):
                app.start()
        finally:
            app.stop()
    finally:
        busy.close()


def test_http_server_is_off_unless_enabled(
    tmp_path: Path, start_app: Callable[[Settings], Radflag]
) -> None:
    app = start_app(make_settings(tmp_path, None))
    assert app.http is None


def test_token_must_not_be_weak() -> None:
    with pytest.raises(ValueError, match="16"):
        Settings.model_validate({"http": {"token": "short"}})
