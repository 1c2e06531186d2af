"""A TLS peer that never finishes its handshake cannot hold up the listener (PS3.15 B.9)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from dicom_io.tls import ServerTls
from tests.dicom_io.conftest import RunningListener, require_tool
from tests.dicom_io.pki import Pki, make_pki
from tests.faults.conftest import NETWORK_TIMEOUT_S, WATCHDOG_SLACK_S
from tests.faults.rawpeer import RawPeer

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_stalled_tls_handshakes_do_not_block_other_senders(
    guarded: Callable[..., RunningListener], pki: Pki
) -> None:
    running = guarded(
        tls=ServerTls(
            cert_file=pki.server_cert,
            key_file=pki.server_key,
            ca_file=pki.ca_cert,
            require_client_cert=True,
        )
    )
    stalled = [RawPeer(running.port) for _ in range(3)]
    stalled[0].send(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello record, then silence
    time.sleep(0.2)

    started = time.monotonic()
    echo = subprocess.run(
        [
            require_tool("echoscu"),
            "-aet", "MODALITY", "-aec", "RADFLAG", "-to", "10",
            "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert),
            "127.0.0.1", str(running.port),
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    echo_s = time.monotonic() - started
    ends = [peer.wait_end(timeout_s=NETWORK_TIMEOUT_S * 4) for peer in stalled]

    assert echo.returncode == 0, echo.stderr
    assert echo_s < NETWORK_TIMEOUT_S  # not queued behind the stalled handshakes
    assert all(e.closed for e in ends)
    assert max(e.elapsed_s for e in ends) <= 2 * NETWORK_TIMEOUT_S + WATCHDOG_SLACK_S
