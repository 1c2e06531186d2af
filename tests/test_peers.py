"""The test peers work for real: namespace isolation, DCMTK, Orthanc, pynetdicom, dicomgen."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    DigitalXRayImageStorageForPresentation,
    Verification,
)

from tests.conftest import shared_path
from tests.peers import fixtures
from tests.peers.dcmtk import StoreSCP, dcmsend, echoscu, storescu
from tests.peers.dicomgen import (
    Photometric,
    build_dx_dataset,
    kermany_images,
    make_dx_from_image,
    make_study,
    make_synthetic_dx,
    save_dataset,
)
from tests.peers.netns import NetNamespace
from tests.peers.orthanc import OrthancPeer, orthanc_version

pytestmark = pytest.mark.timeout(60)

# the peers' fixtures (a conftest could instead set pytest_plugins = ["tests.peers.fixtures"])
netns = fixtures.netns
storescp = fixtures.storescp
orthanc = fixtures.orthanc


def kermany(n: int, offset: int = 0) -> list[Path]:
    return kermany_images(shared_path("cxr", "kermany-pneumonia-train"), n, offset=offset)


def host_port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class Receiver:
    """In-process pynetdicom Storage SCP collecting datasets (started inside a namespace)."""

    def __init__(self, aet: str = "RADFLAG") -> None:
        self.ae = AE(ae_title=aet)
        self.ae.supported_contexts = StoragePresentationContexts
        self.ae.add_supported_context(Verification)
        self.received: list[Dataset] = []
        self.calling: list[str] = []
        self.arrived = threading.Condition()
        self.server: Any = None

    def handle_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.arrived:
            self.received.append(ds)
            self.calling.append(event.assoc.requestor.ae_title)
            self.arrived.notify_all()
        return 0x0000

    def start(self, port: int) -> None:
        """Bind 127.0.0.1:port in the calling thread's namespace; serve in background threads."""
        self.server = self.ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handle_store)]
        )

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[Dataset]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.received) >= n, timeout=timeout_s)
            return list(self.received)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


# -- namespace ---------------------------------------------------------------------------
def test_call_returns_results_and_reraises(netns: NetNamespace) -> None:
    assert netns.call(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        netns.call(lambda: 1 / 0)
    with pytest.raises(TimeoutError):
        netns.call(threading.Event().wait, 2.0, timeout_s=0.2)


@pytest.mark.postgres
def test_namespace_is_private_and_host_postgres_stays_reachable(netns: NetNamespace) -> None:
    if not host_port_open(5432):
        pytest.skip("PostgreSQL is not listening on 127.0.0.1:5432")
    assert not netns.port_open(5432)  # the namespace has its own, empty loopback
    inside = netns.run(["cat", "/proc/net/dev"], timeout_s=10).stdout
    assert [line.split(":")[0].strip() for line in inside.splitlines()[2:]] == ["lo"]
    # a listener created in the namespace is invisible from the host and vice versa
    port = netns.free_port()
    server = netns.call(socket.create_server, ("127.0.0.1", port))
    try:
        assert netns.port_open(port)
        assert not host_port_open(port) or port == 5432
    finally:
        server.close()
    assert host_port_open(5432)  # the main test thread is still in the host namespace


def test_close_stops_everything_started(tmp_path: Path) -> None:
    fixtures.require_namespaces()
    with NetNamespace() as ns:
        holder = ns.holder_pid
        proc = ns.popen(["sleep", "30"])
    assert proc.wait(timeout=1) != 0  # terminated by close(), not finished
    with pytest.raises(ProcessLookupError):
        _signal_zero(holder)


def _signal_zero(pid: int) -> None:
    os.kill(pid, 0)


@pytest.mark.dcmtk
def test_pynetdicom_server_in_namespace_accepts_dcmtk_echo(netns: NetNamespace) -> None:
    receiver = Receiver()
    port = netns.free_port()
    netns.call(receiver.start, port)
    try:
        inside = echoscu(port, ns=netns, called_aet="RADFLAG", timeout_s=5)
        assert inside.returncode == 0, inside.stderr
        if not host_port_open(port):  # the same port on the host is somebody else's or closed
            outside = echoscu(port, ns=None, called_aet="RADFLAG", timeout_s=2)
            assert outside.returncode != 0
    finally:
        receiver.stop()


# -- DCMTK -------------------------------------------------------------------------------
@pytest.mark.dcmtk
@pytest.mark.shared
def test_storescu_and_dcmsend_reach_storescp(storescp: StoreSCP, tmp_path: Path) -> None:
    study = make_study(3, tmp_path / "study", images=kermany(3))
    first = storescu(storescp.port, study.paths[:1], ns=storescp.ns, calling_aet="MODALITY")
    assert first.returncode == 0, first.stderr
    second = dcmsend(storescp.port, study.paths[1:], ns=storescp.ns)
    assert second.returncode == 0, second.stderr
    received = storescp.wait_for(3, timeout_s=10)
    assert len(received) == 3
    by_uid = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in received}
    assert set(by_uid) == set(study.sop_instance_uids)
    sent = pydicom.dcmread(study.paths[0])
    got = pydicom.dcmread(by_uid[str(sent.SOPInstanceUID)])
    assert np.array_equal(got.pixel_array, sent.pixel_array)
    assert got.StudyInstanceUID == study.study_uid


@pytest.mark.dcmtk
def test_storescp_owns_a_namespace_when_none_given(tmp_path: Path) -> None:
    fixtures.require_namespaces()
    dx = tmp_path / "synthetic.dcm"
    make_synthetic_dx(64, 48, dx, seed=1)
    with StoreSCP(tmp_path / "in") as scp:
        done = storescu(scp.port, [dx], ns=scp.ns)
        assert done.returncode == 0, done.stderr
        [path] = scp.wait_for(1, timeout_s=5)
        assert pydicom.dcmread(path).Rows == 64
        holder = scp.ns.holder_pid
    with pytest.raises(ProcessLookupError):  # its private namespace is gone with it
        _signal_zero(holder)


@pytest.mark.dcmtk
def test_storescp_wait_for_times_out_with_context(storescp: StoreSCP) -> None:
    with pytest.raises(TimeoutError, match="received 0 of 1"):
        storescp.wait_for(1, timeout_s=0.2)


# -- Orthanc -----------------------------------------------------------------------------
@pytest.mark.orthanc
def test_orthanc_version_and_own_config(orthanc: OrthancPeer) -> None:
    system = orthanc.system()
    assert system["Version"] == orthanc_version()
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    # no shared library plugins (Debian's worklist/serve-folders) are loaded; only the
    # built-in explorer.js pseudo-entry is listed
    assert [p for p in orthanc.get_json("/plugins") if p != "explorer.js"] == []
    assert orthanc.startup_s is not None and orthanc.startup_s < 10


@pytest.mark.orthanc
@pytest.mark.shared
def test_orthanc_pushes_study_to_pynetdicom_in_namespace(
    orthanc: OrthancPeer, netns: NetNamespace, tmp_path: Path
) -> None:
    study = make_study(
        2, tmp_path / "study", images=kermany(2, offset=10), photometric="MONOCHROME1"
    )
    ids = [orthanc.upload(p) for p in study.paths]
    study_id = orthanc.find_study(study.study_uid)
    assert study_id is not None and orthanc.studies() == [study_id]
    assert sorted(i["ID"] for i in orthanc.instances_of_study(study_id)) == sorted(ids)

    receiver = Receiver("RADFLAG")
    port = netns.free_port()
    netns.call(receiver.start, port)
    try:
        orthanc.set_modality("radflag", "RADFLAG", "127.0.0.1", port)
        assert orthanc.echo("radflag")
        orthanc.push_study("radflag", study_id)
        got = receiver.wait_for(2, timeout_s=10)
    finally:
        receiver.stop()
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(study.sop_instance_uids)
    assert set(receiver.calling) == {"ORTHANC"}
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, study.paths)}
    for ds in got:
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        assert np.array_equal(ds.pixel_array, sent[str(ds.SOPInstanceUID)].pixel_array)


@pytest.mark.orthanc
def test_orthanc_receives_cstore_from_pynetdicom_in_namespace(
    orthanc: OrthancPeer, netns: NetNamespace, tmp_path: Path
) -> None:
    ds = make_synthetic_dx(128, 96, tmp_path / "synthetic.dcm", seed=7, bits=12)

    def send() -> int:
        ae = AE(ae_title="RADFLAG")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title="ORTHANC")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(pydicom.dcmread(tmp_path / "synthetic.dcm"))
        finally:
            assoc.release()
        return int(status.Status)

    assert netns.call(send, timeout_s=20) == 0x0000
    [instance] = orthanc.study_instances(str(ds.StudyInstanceUID))
    tags = orthanc.get_instance_tags(instance["ID"])
    assert tags["SOPInstanceUID"] == str(ds.SOPInstanceUID)
    assert tags["Modality"] == "DX"
    stored = pydicom.dcmread(io.BytesIO(orthanc.download(instance["ID"])))
    assert np.array_equal(stored.pixel_array, ds.pixel_array)
    assert orthanc.find_study("1.2.3.4.5.6.404") is None


@pytest.mark.orthanc
def test_relays_let_host_code_and_orthanc_talk(orthanc: OrthancPeer, netns: NetNamespace) -> None:
    # host -> namespace: the main thread C-ECHOes Orthanc through a published port
    host_port = netns.publish_port(orthanc.dicom_port)
    ae = AE(ae_title="HOSTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", host_port, ae_title="ORTHANC")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    # namespace -> host: Orthanc reaches a pynetdicom SCP bound on the host loopback
    receiver = Receiver("HOSTSCP")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        scp_port = probe.getsockname()[1]
    receiver.start(scp_port)  # main thread: host namespace
    try:
        ns_port = netns.expose_host_port(scp_port)
        orthanc.set_modality("hostscp", "HOSTSCP", "127.0.0.1", ns_port)
        assert orthanc.echo("hostscp")
    finally:
        receiver.stop()


# -- dicomgen ----------------------------------------------------------------------------
@pytest.mark.shared
def test_generated_dx_passes_dciodvfy(tmp_path: Path) -> None:
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dicom3tools dciodvfy not installed")
    [image] = kermany(1)
    photometric: Photometric
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        out = tmp_path / f"{photometric}.dcm"
        make_dx_from_image(image, out, photometric=photometric, upscale=2)
        result = subprocess.run([dciodvfy, str(out)], capture_output=True, text=True, timeout=30)
        report = result.stdout + result.stderr
        assert "DXImageForPresentation" in report
        assert [line for line in report.splitlines() if line.startswith("Error")] == []


@pytest.mark.shared
def test_monochrome1_inverts_stored_values_and_keeps_geometry(tmp_path: Path) -> None:
    [image] = kermany(1, offset=5)
    mono2 = make_dx_from_image(image, tmp_path / "m2.dcm", bits=12, upscale=3)
    mono1 = make_dx_from_image(
        image, tmp_path / "m1.dcm", bits=12, upscale=3, photometric="MONOCHROME1"
    )
    a, b = mono2.pixel_array.astype(np.int32), mono1.pixel_array.astype(np.int32)
    assert a.shape == (672, 672)
    assert np.array_equal(a + b, np.full_like(a, 4095))
    assert a.max() <= 4095 and a.std() > 100  # real image content, not a constant
    assert mono1.PresentationLUTShape == "INVERSE" and mono2.PresentationLUTShape == "IDENTITY"
    assert float(mono2.PixelSpacing[0]) == pytest.approx(350.0 / 672)
    assert list(mono2.ImageType) == ["ORIGINAL", "PRIMARY"]
    low = float(mono2.WindowCenter) - float(mono2.WindowWidth) / 2
    high = float(mono2.WindowCenter) + float(mono2.WindowWidth) / 2
    assert (low, high) == pytest.approx((a.min(), a.max()), abs=1)


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    not_an_image = tmp_path / "x.jpeg"
    not_an_image.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="not a readable image"):
        make_dx_from_image(not_an_image, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    with pytest.raises(ValueError, match="bits"):
        make_synthetic_dx(8, 8, bits=17)
    with pytest.raises(ValueError, match="view"):
        build_dx_dataset(np.zeros((4, 4), np.uint16), bits=12, view="OBLIQUE")
    with pytest.raises(ValueError, match="exceed 12 bits"):
        build_dx_dataset(np.full((4, 4), 4096, np.uint16), bits=12)
    with pytest.raises(ValueError, match="lossless"):
        save_dataset(make_synthetic_dx(4, 4), tmp_path / "z.dcm", transfer_syntax=JPEGBaseline8Bit)
    assert not (tmp_path / "z.dcm").exists()
