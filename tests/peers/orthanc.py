"""Orthanc as a real PACS peer for tests, inside a private network namespace.

:class:`OrthancPeer` writes a self-contained JSON configuration (no Debian default config, no
plugins, storage and index in a temporary folder), runs ``/usr/sbin/Orthanc`` inside a
:class:`~tests.peers.netns.NetNamespace` and talks to its REST API from a thread that joined
that namespace. Orthanc acts as Storage SCP (PS3.4 Annex B) on ``dicom_port`` and as Storage
SCU when asked to push (``POST /modalities/{id}/store``).

Measured on the 2-core dev box: Orthanc 1.10.1 answers ``/system`` about 0.1 s after start;
a graceful stop takes about 3.5 s, so :meth:`OrthancPeer.stop` kills by default.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.peers.netns import NetNamespace

logger = logging.getLogger(__name__)

ORTHANC_BIN = Path("/usr/sbin/Orthanc")

#: A modality entry: (AE title, host, port), as in Orthanc's ``DicomModalities``.
Modality = tuple[str, str, int]


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed (message carries status and body)."""


def orthanc_available() -> bool:
    """Return True when the Orthanc server binary is installed."""
    return ORTHANC_BIN.exists()


def orthanc_version() -> str:
    """Return the version ``Orthanc --version`` prints (e.g. ``"1.10.1"``)."""
    out = subprocess.run(
        [str(ORTHANC_BIN), "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    first = out.splitlines()[0] if out else ""
    return first.split()[-1] if first else ""


class OrthancPeer:
    """A throw-away Orthanc server in a network namespace, with a small REST client.

    Parameters
    ----------
    work_dir
        Folder for ``orthanc.json``, ``storage/``, ``index/`` and ``orthanc.log`` (created).
    ns
        Namespace to run in (the caller owns it; peers that must talk to Orthanc go there too).
    modalities
        Orthanc ``DicomModalities``: name -> (AE title, host, port). Change later with
        :meth:`set_modality`.
    aet
        Orthanc's AE title (``DicomAet``). Called AE titles are not checked.
    dicom_port, http_port
        Ports inside the namespace; 0 picks free ones.
    extra_config
        Keys merged over the generated configuration (e.g. ``{"OverwriteInstances": True}``).
    start_timeout_s
        Bound for ``/system`` to answer.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        ns: NetNamespace,
        modalities: Mapping[str, Modality] | None = None,
        aet: str = "ORTHANC",
        dicom_port: int = 0,
        http_port: int = 0,
        extra_config: Mapping[str, Any] | None = None,
        start_timeout_s: float = 20.0,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.ns = ns
        self.modalities: dict[str, Modality] = dict(modalities or {})
        self.aet = aet
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.extra_config = dict(extra_config or {})
        self.start_timeout_s = start_timeout_s
        self.config_path = self.work_dir / "orthanc.json"
        self.log_path = self.work_dir / "orthanc.log"
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> OrthancPeer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def base_url(self) -> str:
        """REST root, valid inside the namespace only."""
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """Return the configuration written to ``orthanc.json``."""
        cfg: dict[str, Any] = {
            "Name": "radflag-test-orthanc",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,
            "StableAge": 2,
            "SaveJobs": False,
            "StorageCompression": False,
            "HttpsCACertificates": "",
            "ConcurrentJobs": 1,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self) -> OrthancPeer:
        """Write the configuration, start Orthanc and wait until ``GET /system`` answers.

        Raises
        ------
        OrthancError
            When Orthanc exits or does not answer within ``start_timeout_s`` (log attached).
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.dicom_port == 0:
            self.dicom_port = self.ns.free_port()
        if self.http_port == 0:
            self.http_port = self.ns.free_port()
            while self.http_port == self.dicom_port:
                self.http_port = self.ns.free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._proc = self.ns.popen(
                [str(ORTHANC_BIN), str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
            )
        deadline = started + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited (rc={self._proc.returncode}): {self.log()}")
            try:
                self.get_json("/system", timeout_s=1.0)
                break
            except (OrthancError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise OrthancError(f"Orthanc did not answer /system: {self.log()}") from None
                time.sleep(0.02)
        self.ns.wait_port(self.dicom_port, timeout_s=5.0, process=self._proc)
        self.startup_s = time.monotonic() - started
        logger.debug(
            "orthanc started",
            extra={"startup_s": self.startup_s, "dicom_port": self.dicom_port},
        )
        return self

    def stop(self, *, graceful: bool = False) -> None:
        """Stop Orthanc.

        By default SIGKILL: storage and index are throw-away, and a graceful stop costs about
        3.5 s (Orthanc 1.10 waits 2 s for its HTTP server and 1 s for its DICOM server).
        ``graceful=True`` sends SIGTERM first (SIGKILL after 10 s), e.g. to reuse the index.
        """
        if self._proc is not None and self._proc.poll() is None:
            if graceful:
                self._proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=10.0)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(timeout=5.0)
        self._proc = None

    def log(self) -> str:
        """Return Orthanc's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- REST ----------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout_s: float = 30.0,
    ) -> bytes:
        """Send one REST request from inside the namespace and return the response body.

        Raises
        ------
        OrthancError
            On an HTTP error status (status, path and Orthanc's message included).
        """
        url = self.base_url + path

        def send() -> bytes:
            req = urllib.request.Request(url, data=body, method=method)
            if body is not None:
                req.add_header("Content-Type", content_type)
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                    return bytes(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from None

        return self.ns.call(send, timeout_s=timeout_s + 5)

    def get_json(self, path: str, *, timeout_s: float = 30.0) -> Any:
        """``GET path`` and decode JSON."""
        return json.loads(self.request("GET", path, timeout_s=timeout_s))

    def post_json(self, path: str, payload: Any, *, timeout_s: float = 60.0) -> Any:
        """``POST path`` with a JSON body (a ``str`` is sent as-is) and decode JSON."""
        data = payload if isinstance(payload, str) else json.dumps(payload)
        return json.loads(self.request("POST", path, data.encode(), timeout_s=timeout_s))

    def system(self) -> dict[str, Any]:
        """``GET /system`` (version, AE title, ports)."""
        result: dict[str, Any] = self.get_json("/system")
        return result

    def upload(self, path_or_bytes: Path | str | bytes) -> str:
        """Store one DICOM file through ``POST /instances``; return its Orthanc instance id."""
        data = (
            path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
        )
        answer = json.loads(
            self.request("POST", "/instances", data, content_type="application/dicom")
        )
        return str(answer["ID"])

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        return [str(i) for i in self.get_json("/instances")]

    def studies(self) -> list[str]:
        """Orthanc ids of all stored studies."""
        return [str(s) for s in self.get_json("/studies")]

    def find_study(self, study_uid: str) -> str | None:
        """Return the Orthanc id of the study with this StudyInstanceUID, or None."""
        for hit in self.post_json("/tools/lookup", study_uid):
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def instances_of_study(self, study_id: str) -> list[dict[str, Any]]:
        """``GET /studies/{id}/instances`` (Orthanc id): one dict per instance."""
        result: list[dict[str, Any]] = self.get_json(f"/studies/{study_id}/instances")
        return result

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Instances of the study with this StudyInstanceUID (empty if unknown)."""
        study_id = self.find_study(study_uid)
        return [] if study_id is None else self.instances_of_study(study_id)

    def get_instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags``: keyword -> value (sequences as lists)."""
        result: dict[str, Any] = self.get_json(f"/instances/{instance_id}/simplified-tags")
        return result

    def download(self, instance_id: str) -> bytes:
        """``GET /instances/{id}/file``: the stored DICOM file, byte for byte."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def set_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Add or replace a ``DicomModalities`` entry at run time (``PUT /modalities/{name}``)."""
        body = json.dumps({"AET": aet, "Host": host, "Port": port}).encode()
        self.request("PUT", f"/modalities/{name}", body)
        self.modalities[name] = (aet, host, port)

    def echo(self, modality: str, *, timeout_s: float = 10.0) -> bool:
        """C-ECHO the modality (``POST /modalities/{id}/echo``); True on success."""
        try:
            self.request("POST", f"/modalities/{modality}/echo", b"{}", timeout_s=timeout_s)
        except OrthancError:
            return False
        return True

    def push(
        self, modality: str, resources: Sequence[str], *, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """C-STORE Orthanc resources (any level) to ``modality``, synchronously.

        Raises
        ------
        OrthancError
            When any sub-operation fails (Orthanc answers HTTP 500 with details).
        """
        payload = {"Resources": list(resources), "Synchronous": True, "Timeout": int(timeout_s)}
        result: dict[str, Any] = self.post_json(
            f"/modalities/{modality}/store", payload, timeout_s=timeout_s
        )
        return result

    def push_study(
        self, modality: str, study_id: str, *, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """C-STORE one study (Orthanc id) to ``modality``; see :meth:`push`."""
        return self.push(modality, [study_id], timeout_s=timeout_s)

    def wait_for_instances(self, n: int, *, timeout_s: float = 10.0) -> list[str]:
        """Wait until Orthanc holds at least ``n`` instances; return their ids.

        Raises
        ------
        TimeoutError
            With the count seen.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            ids = self.instances()
            if len(ids) >= n:
                return ids
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc holds {len(ids)} of {n} instances after {timeout_s} s")
            time.sleep(0.05)

    def delete_all(self) -> None:
        """Delete every patient (and so everything) from Orthanc."""
        for patient in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{patient}")
