"""DCMTK peers for tests: a ``storescp`` receiver and ``storescu``/``dcmsend``/``echoscu`` clients.

``storescp`` cannot bind to loopback only, so it always runs inside a private
:class:`~tests.peers.netns.NetNamespace` (the given one, or its own). The clients run in the
given namespace, or on the host when ``ns`` is None (they only ever connect to 127.0.0.1).
Services: Verification (PS3.4 Annex A) and Storage (PS3.4 Annex B) over the DICOM upper layer
(PS3.8).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

import pydicom
from pydicom.errors import InvalidDicomError

from tests.peers.netns import NetNamespace

logger = logging.getLogger(__name__)

DCMTK_BIN = Path("/usr/bin")
STORESCP = DCMTK_BIN / "storescp"
STORESCU = DCMTK_BIN / "storescu"
DCMSEND = DCMTK_BIN / "dcmsend"
ECHOSCU = DCMTK_BIN / "echoscu"


def dcmtk_available() -> bool:
    """Return True when the DCMTK network tools are installed in /usr/bin."""
    return all(p.exists() for p in (STORESCP, STORESCU, DCMSEND, ECHOSCU))


class StoreSCP:
    """DCMTK ``storescp`` accepting every SOP class and transfer syntax, in a namespace.

    Runs ``storescp --promiscuous +xa -od OUT_DIR -aet AET PORT``. Received files are named
    ``<modality>.<SOPInstanceUID>`` (DCMTK default) in ``out_dir``.

    Parameters
    ----------
    out_dir
        Where received files go (created).
    ns
        Namespace to run in; None creates a private one, owned and closed by this object.
    port
        Port inside the namespace; 0 picks a free one.
    aet
        Our AE title (``storescp`` does not check the called AE title by default).
    extra_args
        More ``storescp`` options, e.g. ``["--refuse"]`` or ``["-xs", "+B"]``.
    start_timeout_s
        Bound for the listener to come up.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        ns: NetNamespace | None = None,
        port: int = 0,
        aet: str = "STORESCP",
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 10.0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.aet = aet
        self.port = port
        self.extra_args = list(extra_args)
        self.start_timeout_s = start_timeout_s
        self._own_ns = ns is None
        self._ns = ns
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.out_dir.parent / f"storescp-{self.out_dir.name}.log"

    @property
    def ns(self) -> NetNamespace:
        """The namespace ``storescp`` runs in."""
        if self._ns is None:
            raise RuntimeError("StoreSCP not started")
        return self._ns

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> StoreSCP:
        """Start ``storescp`` and wait until it accepts TCP connections."""
        if self._ns is None:
            self._ns = NetNamespace().start()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = self._ns.free_port()
        argv = [
            str(STORESCP),
            "--promiscuous",
            "+xa",
            "--output-directory",
            str(self.out_dir),
            "--aetitle",
            self.aet,
            "--acse-timeout",
            "30",
            "--dimse-timeout",
            "30",
            "-v",
            *self.extra_args,
            str(self.port),
        ]
        with self.log_path.open("wb") as log:
            self._proc = self._ns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._ns.wait_port(self.port, timeout_s=self.start_timeout_s, process=self._proc)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"storescp did not start: {self.log()}") from exc
        logger.debug("storescp listening", extra={"port": self.port, "aet": self.aet})
        return self

    def stop(self) -> None:
        """Stop ``storescp`` (SIGTERM, then SIGKILL) and close an owned namespace."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=2.0)
        self._proc = None
        if self._own_ns and self._ns is not None:
            self._ns.close()
            self._ns = None

    def log(self) -> str:
        """Return ``storescp``'s console output so far (verbose)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def files(self) -> list[Path]:
        """Return the received files, sorted by name (may include one still being written)."""
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())

    def wait_for(self, n: int, timeout_s: float = 10.0) -> list[Path]:
        """Wait until at least ``n`` complete files arrived; return all of them.

        A file counts as complete when its size is unchanged over one poll and pydicom reads
        it completely.

        Raises
        ------
        TimeoutError
            With the count seen and the end of ``storescp``'s log.
        """
        deadline = time.monotonic() + timeout_s
        sizes: dict[Path, int] = {}
        complete: set[Path] = set()
        while True:
            for path in self.files():
                if path in complete:
                    continue
                size = path.stat().st_size
                if sizes.get(path) == size and _reads_completely(path):
                    complete.add(path)
                sizes[path] = size
            if len(complete) >= n:
                return sorted(complete)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"storescp received {len(complete)} of {n} files within {timeout_s} s; "
                    f"log tail: {self.log()[-2000:]}"
                )
            time.sleep(0.05)


def _reads_completely(path: Path) -> bool:
    """Return True when ``path`` parses as DICOM including its last element."""
    try:
        pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return False
    return True


def _run(
    argv: Sequence[str], ns: NetNamespace | None, timeout_s: float
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK client in ``ns`` (or on the host), bounded by ``timeout_s``."""
    if ns is not None:
        return ns.run(argv, timeout_s=timeout_s)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)


def _common(
    calling_aet: str, called_aet: str, timeout_s: float, extra_args: Iterable[str]
) -> list[str]:
    network_timeout = str(max(1, int(timeout_s)))
    return [
        "--aetitle",
        calling_aet,
        "--call",
        called_aet,
        "--timeout",
        network_timeout,
        "--acse-timeout",
        network_timeout,
        "--dimse-timeout",
        network_timeout,
        *extra_args,
    ]


def echoscu(
    port: int,
    *,
    ns: NetNamespace | None = None,
    host: str = "127.0.0.1",
    called_aet: str = "ANY-SCP",
    calling_aet: str = "ECHOSCU",
    timeout_s: float = 15.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """C-ECHO (PS3.7 9.1.5) with DCMTK ``echoscu``; ``returncode`` 0 means success."""
    argv = [str(ECHOSCU), *_common(calling_aet, called_aet, timeout_s, extra_args), host, str(port)]
    return _run(argv, ns, timeout_s + 5)


def storescu(
    port: int,
    files: Sequence[Path | str],
    *,
    ns: NetNamespace | None = None,
    host: str = "127.0.0.1",
    called_aet: str = "ANY-SCP",
    calling_aet: str = "STORESCU",
    timeout_s: float = 30.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """C-STORE ``files`` (PS3.7 9.1.1) with DCMTK ``storescu`` over one association.

    ``storescu`` proposes each file's own transfer syntax; add ``["+r", "+sd"]``-style
    options through ``extra_args`` for directories. Uses ``-v`` so statuses are in stdout/stderr.
    """
    argv = [
        str(STORESCU),
        "-v",
        *_common(calling_aet, called_aet, timeout_s, extra_args),
        host,
        str(port),
        *map(str, files),
    ]
    return _run(argv, ns, timeout_s + 5)


def dcmsend(
    port: int,
    files: Sequence[Path | str],
    *,
    ns: NetNamespace | None = None,
    host: str = "127.0.0.1",
    called_aet: str = "ANY-SCP",
    calling_aet: str = "DCMSEND",
    timeout_s: float = 30.0,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """C-STORE ``files`` with DCMTK ``dcmsend`` (negotiates per SOP class, decompresses if needed).

    ``dcmsend`` exits non-zero when any C-STORE fails; ``-v`` gives a per-file summary.
    """
    argv = [
        str(DCMSEND),
        "-v",
        *_common(calling_aet, called_aet, timeout_s, extra_args),
        host,
        str(port),
        *map(str, files),
    ]
    return _run(argv, ns, timeout_s + 5)
