"""DICOM TLS (PS3.15 B.9) on the listener and the C-STORE client, against DCMTK and pynetdicom."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_io.scp import Listener, ListenerConfig
from dicom_io.scu import Destination, SendError, send_datasets
from dicom_io.spool import Spool
from dicom_io.tls import ClientTls, ServerTls, TlsConfigError
from tests.dicom_io.conftest import SCP_AE, FakeSink, make_dx, require_tool, save
from tests.dicom_io.pki import Pki, make_pki

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_listener(tmp_path: Path, pki: Pki) -> Iterator[tuple[Listener, FakeSink]]:
    sink = FakeSink()
    config = ListenerConfig(
        ae_title=SCP_AE,
        host="127.0.0.1",
        port=0,
        acse_timeout_s=10,
        dimse_timeout_s=10,
        network_timeout_s=10,
        tls=ServerTls(
            cert_file=pki.server_cert,
            key_file=pki.server_key,
            ca_file=pki.ca_cert,
            require_client_cert=True,
        ),
    )
    listener = Listener(config, Spool(tmp_path / "spool"), sink)
    listener.start()
    try:
        yield listener, sink
    finally:
        listener.stop(grace_s=2)


def _storescu(port: int, file: Path, tls: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [require_tool("storescu"), "-v", "-aet", "MODALITY", "-aec", SCP_AE, "-to", "10"]
    return subprocess.run(
        [*argv, *tls, "127.0.0.1", str(port), str(file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dcmtk_storescu_over_tls_with_client_certificate(
    tmp_path: Path, pki: Pki, tls_listener: tuple[Listener, FakeSink]
) -> None:
    listener, sink = tls_listener
    ds = make_dx()
    source = save(ds, tmp_path / "dx.dcm")
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)]

    proc = _storescu(listener.port, source, tls)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [i.sop_instance_uid for i in sink.stored] == [ds.SOPInstanceUID]
    assert sink.stored[0].path.read_bytes().endswith(ds.PixelData)


def test_plain_tcp_and_foreign_certificates_are_refused(
    tmp_path: Path, pki: Pki, tls_listener: tuple[Listener, FakeSink]
) -> None:
    listener, sink = tls_listener
    source = save(make_dx(), tmp_path / "dx.dcm")

    plain = _storescu(listener.port, source, [])
    anonymous = _storescu(listener.port, source, ["+tla", "+cf", str(pki.ca_cert)])
    rogue = _storescu(
        listener.port,
        source,
        ["+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca_cert)],
    )
    good = _storescu(
        listener.port,
        source,
        ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)],
    )

    assert plain.returncode != 0
    assert anonymous.returncode != 0
    assert rogue.returncode != 0
    assert good.returncode == 0, good.stdout + good.stderr  # the listener kept serving
    assert len(sink.stored) == 1


def test_send_datasets_over_tls_to_listener(
    pki: Pki, tls_listener: tuple[Listener, FakeSink]
) -> None:
    listener, sink = tls_listener
    dest = Destination(ae_title=SCP_AE, host="127.0.0.1", port=listener.port)
    ds = make_dx()
    client = ClientTls(ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key)

    send_datasets(dest, [ds], calling_ae="RADFLAG", timeout_s=10, ssl_context=client.context())

    assert [i.sop_instance_uid for i in sink.stored] == [ds.SOPInstanceUID]


def test_send_without_trusted_server_certificate_is_retryable(
    pki: Pki, tls_listener: tuple[Listener, FakeSink]
) -> None:
    listener, sink = tls_listener
    dest = Destination(ae_title=SCP_AE, host="127.0.0.1", port=listener.port)
    # Trusting only the foreign CA: the server certificate cannot be verified.
    client = ClientTls(ca_file=pki.rogue_cert, cert_file=pki.client_cert, key_file=pki.client_key)

    with pytest.raises(SendError) as info:
        send_datasets(dest, [make_dx()], timeout_s=5, ssl_context=client.context())

    assert info.value.retryable
    assert "TLS" in str(info.value)
    assert not sink.stored


def test_tls_configuration_errors_are_named(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="ca_file"):
        ServerTls(pki.server_cert, pki.server_key, require_client_cert=True)
    with pytest.raises(TlsConfigError, match="cert_file: file not found"):
        ServerTls(tmp_path / "missing.pem", pki.server_key).context()
    with pytest.raises(TlsConfigError, match="certificate/key"):
        ServerTls(pki.server_cert, pki.client_key).context()  # key of another certificate
    with pytest.raises(TlsConfigError, match="together"):
        ClientTls(cert_file=pki.client_cert)
