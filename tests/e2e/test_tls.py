"""DICOM TLS round trip (PS3.15 B.9) with DCMTK on both ends.

DCMTK ``storescu`` sends a chest DX over mutually authenticated TLS to radflag; radflag
classifies it and delivers the SR over TLS to a DCMTK ``storescp`` that requires radflag's
client certificate. A sender without a trusted certificate is refused, and the listener keeps
serving. Certificates are made by the test (openssl CLI).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.models import Delivery, Study
from tests.daemon.conftest import (  # noqa: F401 - fixtures
    make_settings,
    start_app,
    tiny_bundle,
    tiny_models,
    wait_until,
)
from tests.dicom_io.conftest import make_dx, save
from tests.dicom_io.pki import Pki, make_pki
from tests.peers.dcmtk import StoreSCP, dcmtk_available
from tests.peers.netns import NetNamespace

pytestmark = pytest.mark.dcmtk


def _storescu_tls(port: int, file: Path, key: Path, cert: Path, ca: Path) -> str:
    argv = ["/usr/bin/storescu", "-v", "-to", "10", "-aet", "MODALITY", "-aec", "RADFLAG"]
    argv += ["+tls", str(key), str(cert), "+cf", str(ca)]
    proc = subprocess.run(
        [*argv, "127.0.0.1", str(port), str(file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_tls_round_trip_with_dcmtk(tmp_path: Path, netns: NetNamespace, start_app: Any) -> None:  # noqa: F811
    if not dcmtk_available():
        pytest.skip("DCMTK not installed")
    pki: Pki = make_pki(tmp_path / "pki")
    scp_tls = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca_cert), "-rc"]
    with StoreSCP(tmp_path / "pacs", ns=netns, aet="PACS", extra_args=scp_tls) as pacs:
        pacs_port = netns.publish_port(pacs.port)
        settings = make_settings(
            tmp_path,
            None,
            listener={
                "tls": {
                    "enabled": True,
                    "cert_file": str(pki.server_cert),
                    "key_file": str(pki.server_key),
                    "ca_file": str(pki.ca_cert),
                    "require_client_cert": True,
                }
            },
            delivery={
                "tls": {
                    "ca_file": str(pki.ca_cert),
                    "cert_file": str(pki.client_cert),
                    "key_file": str(pki.client_key),
                }
            },
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "PACS",
                    "host": "127.0.0.1",
                    "port": pacs_port,
                    "tls": True,
                }
            ],
        )
        app = start_app(settings)
        ds = make_dx(rows=128, columns=128)
        source = save(ds, tmp_path / "dx.dcm")

        rogue = _storescu_tls(app.port, source, pki.rogue_key, pki.rogue_cert, pki.ca_cert)
        sent = _storescu_tls(app.port, source, pki.client_key, pki.client_cert, pki.ca_cert)

        assert "rc=0" not in rogue  # certificate from a foreign CA: handshake refused
        assert sent.startswith("rc=0"), sent
        wait_until(lambda: _state(app, ds.StudyInstanceUID) == "DONE", timeout_s=60, what="DONE")
        with app.sessions() as s:
            deliveries = s.scalars(select(Delivery)).all()
        received = pacs.wait_for(len(deliveries), timeout_s=30)
        log = pacs.log()

    assert deliveries and {(d.destination, d.state) for d in deliveries} == {("pacs", "SENT")}
    results = [dcmread(path) for path in received]
    assert {r.StudyInstanceUID for r in results} == {ds.StudyInstanceUID}
    assert "SR" in {r.Modality for r in results}  # the TID 1500 report (and maybe a picture)
    assert "TLS" in log, log


def _state(app: Any, uid: str) -> str | None:
    with app.sessions() as s:
        return s.scalar(select(Study.state).where(Study.study_instance_uid == uid))
