"""A running ``radflag serve`` with a DCMTK ``storescp`` as its PACS, in one network namespace.

Everything lives in a private :class:`~tests.peers.netns.NetNamespace` (``storescp`` cannot
bind to loopback only): the PACS (``storescp +B -pdu 131072 --fork``), the ``radflag serve``
process (SQLite, short timers, see :func:`write_config`) and the senders (``dcmsend``).
Received result objects are the files in the PACS's output folder; their modification time
is when ``storescp`` wrote their last byte. A :class:`MemorySampler` follows the resident
set of the serve process and its children (``/proc/<pid>/status``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from tests.peers.dcmtk import DCMSEND, StoreSCP, echoscu
from tests.peers.netns import NetNamespace

REPO = Path(__file__).resolve().parents[2]
RADFLAG = Path(sys.executable).with_name("radflag")
PACS_AET = "PACS"
RADFLAG_AET = "RADFLAG"
MAX_PDU_BYTES = 131072


class BenchTimeout(RuntimeError):
    """The run's time budget is spent."""


@dataclass
class Deadline:
    """The run's wall-clock budget; every wait is bounded by what is left of it."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        """Seconds left (raises :class:`BenchTimeout` when none)."""
        left = self.start + self.seconds - time.monotonic()
        if left <= 0:
            raise BenchTimeout(f"time budget of {self.seconds:.0f} s spent")
        return left


@dataclass
class Ports:
    """Ports handed out from the helper's range (inside the private namespace)."""

    next_port: int = 22000
    last_port: int = 22999

    def take(self) -> int:
        """Return the next port of the range."""
        if self.next_port > self.last_port:
            raise RuntimeError("port range exhausted")
        self.next_port += 1
        return self.next_port - 1


@dataclass(frozen=True)
class ServeOptions:
    """What the benchmark configures in ``radflag serve`` (everything else: defaults).

    Attributes
    ----------
    outputs
        The PACS destination's ``outputs`` (``("SR",)`` or ``("SR", "SC")``).
    quiet_period_s
        ``completion.quiet_period_s``.
    check_interval_s
        ``completion.check_interval_s``, ``delivery.check_interval_s`` and
        ``worker.poll_interval_s``.
    worker
        Further ``[worker]`` settings (name, TOML value), e.g. ``("studies_in_flight", "8")``.
    """

    outputs: tuple[str, ...] = ("SR",)
    quiet_period_s: float = 1.0
    check_interval_s: float = 0.5
    worker: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"outputs={'+'.join(self.outputs)}, quiet_period_s={self.quiet_period_s:g}, "
            f"completion/delivery check and worker poll every {self.check_interval_s:g} s, "
            "SQLite, default model bundle, "
            + "".join(f"worker.{k}={v}, " for k, v in self.worker)
            + "other settings default"
        )


def write_config(path: Path, data: Path, port: int, pacs_port: int, opts: ServeOptions) -> Path:
    """Write the serve configuration (TOML) as in ``tests/e2e/conftest.py``."""
    outputs = ", ".join(f'"{o}"' for o in opts.outputs)
    lines = [
        "[listener]",
        f'ae_title = "{RADFLAG_AET}"',
        'host = "127.0.0.1"',
        f"port = {port}",
        "shutdown_grace_s = 10",
        "[storage]",
        f'spool_dir = "{data / "spool"}"',
        f'results_dir = "{data / "results"}"',
        "[database]",
        f'url = "sqlite:///{data / "radflag.db"}"',
        "[completion]",
        f"quiet_period_s = {opts.quiet_period_s}",
        f"check_interval_s = {opts.check_interval_s}",
        "[worker]",
        f"poll_interval_s = {opts.check_interval_s}",
        *(f"{key} = {value}" for key, value in opts.worker),
        "[delivery]",
        f"check_interval_s = {opts.check_interval_s}",
        "[privacy]",
        'pseudonym_key = "bench"',
        "[[destinations]]",
        'name = "PACS"',
        f'ae_title = "{PACS_AET}"',
        'host = "127.0.0.1"',
        f"port = {pacs_port}",
        f"outputs = [{outputs}]",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of ``pid`` from ``/proc/<pid>/status``; empty when it is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from the parent ids in ``/proc/<pid>/stat``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class MemorySampler:
    """Samples the serve process tree: peak VmHWM per process, peak summed VmRSS.

    Parameters
    ----------
    pid
        The ``radflag serve`` process.
    cap_mb
        When the summed resident set of the tree exceeds this, the serve process is killed
        (SIGKILL, by its pid) so a study that would exhaust the machine's memory cannot.
    interval_s
        Sampling period.
    """

    def __init__(self, pid: int, cap_mb: float, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.cap_mb = cap_mb
        self.interval_s = interval_s
        self.hwm_kb: dict[int, int] = {}
        self.peak_rss_kb = 0
        self.capped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def start(self) -> MemorySampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> None:
        """Take one sample now."""
        total = 0
        for pid in _descendants(self.pid):
            status = _status_kb(pid)
            total += status.get("VmRSS", 0)
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), status.get("VmHWM", 0))
        self.peak_rss_kb = max(self.peak_rss_kb, total)
        if total > self.cap_mb * 1024 and not self.capped:
            self.capped = True
            os.kill(self.pid, signal.SIGKILL)

    def serve_hwm_mb(self) -> float:
        """VmHWM of the serve process itself (MiB)."""
        return self.hwm_kb.get(self.pid, 0) / 1024

    def children_hwm_mb(self) -> float:
        """Sum of the children's VmHWM (MiB)."""
        return sum(v for pid, v in self.hwm_kb.items() if pid != self.pid) / 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)
        self.sample()


class Stack:
    """``storescp`` (the PACS) and ``radflag serve`` in ``ns``; stop with :meth:`stop`.

    Parameters
    ----------
    ns
        The namespace.
    work
        Folder for the PACS output, the serve data, config and logs.
    ports
        Where ports come from.
    opts
        The serve configuration.
    """

    def __init__(self, ns: NetNamespace, work: Path, ports: Ports, opts: ServeOptions) -> None:
        self.ns = ns
        self.work = work
        self.opts = opts
        self.port = ports.take()
        self.pacs = StoreSCP(
            work / "pacs",
            ns=ns,
            port=ports.take(),
            aet=PACS_AET,
            extra_args=["+B", "-pdu", str(MAX_PDU_BYTES), "--fork"],
        )
        self.log_path = work / "radflag-serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._study_of: dict[Path, str] = {}

    @property
    def db_path(self) -> Path:
        """The serve process's SQLite database."""
        return self.work / "data" / "radflag.db"

    def start(self, deadline: Deadline) -> Stack:
        """Start the PACS, then ``radflag serve``; return once it answers C-ECHO."""
        if not RADFLAG.exists():
            raise RuntimeError(f"{RADFLAG} not found: install the project in the venv")
        self.work.mkdir(parents=True, exist_ok=True)
        self.pacs.start()
        cfg = write_config(
            self.work / "radflag.toml", self.work / "data", self.port, self.pacs.port, self.opts
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADFLAG_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with self.log_path.open("wb") as log:
            self.proc = self.ns.popen(
                [str(RADFLAG), "serve", "--config", str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO),
            )
        end = time.monotonic() + min(180.0, deadline.left())
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"radflag serve exited early:\n{self.log_tail()}")
            echo = echoscu(self.port, ns=self.ns, called_aet=RADFLAG_AET, timeout_s=5)
            if echo.returncode == 0:
                return self
            time.sleep(0.5)
        raise RuntimeError(f"radflag serve did not answer C-ECHO:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM ``radflag serve`` (SIGKILL after 60 s), then stop the PACS."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.pacs.stop()

    @property
    def pid(self) -> int:
        """Process id of ``radflag serve``."""
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def alive(self) -> bool:
        """Return True while ``radflag serve`` runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        """End of the serve log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def send(self, files: Sequence[Path], deadline: Deadline) -> tuple[float, float]:
        """``dcmsend`` ``files`` over one association; return (start, end) wall-clock times."""
        argv = [str(DCMSEND), "-aec", RADFLAG_AET, "127.0.0.1", str(self.port), *map(str, files)]
        start = time.time()
        done = self.ns.run(argv, timeout_s=min(1800.0, deadline.left()))
        end = time.time()
        if done.returncode != 0:
            raise RuntimeError(f"dcmsend failed ({done.returncode}): {done.stderr[-2000:]}")
        return start, end

    def received(self) -> list[Path]:
        """Files the PACS has written so far."""
        return [p for p in self.pacs.out_dir.iterdir() if p.is_file()]

    def study_of(self, path: Path) -> str | None:
        """Study Instance UID of a received file (None while it is still being written)."""
        if path not in self._study_of:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError):
                return None
            self._study_of[path] = str(ds.get("StudyInstanceUID", ""))
        return self._study_of[path]
