#!/usr/bin/env python
"""Ingest benchmark: radflag vs DCMTK storescp vs Orthanc (a measurement, not a test).

Sends N x 2048^2 16-bit DX images (Explicit VR Little Endian, 8 MiB each) with DCMTK
``storescu`` over one association, and over K parallel associations (K concurrent
``storescu`` processes, each sending its share of the files), to each receiver. All
receivers and senders run inside one private network namespace (``tests/peers/netns.py``),
so every byte goes over the namespace's loopback: radflag's listener is started from a
thread that joined the namespace, ``storescp`` and Orthanc are processes in it.

Every receiver is tuned the way its users would run it for speed:

- DCMTK ``storescp``: ``-pdu 131072`` (its largest), ``+B`` (bit-preserving: the received
  bytes go to disk as they arrive, no decode), ``--fork`` for parallel associations, and
  ``TCP_NODELAY=1`` in its environment. It writes without fsync (``strace``: no ``fsync`` or
  ``fdatasync`` at all): the upper bound, not durable.
- Orthanc: ``MaximumPduLength`` 131072 and ``TCP_NODELAY=1`` in its environment, its
  documented defaults otherwise (``SyncStorageArea`` true, no compression). It writes the
  file and indexes it in its SQLite database. Measured with ``strace -f -e
  fsync,fdatasync`` (Orthanc 1.10.1, 20 instances): one ``fdatasync`` per stored file, no
  directory fsync, and 5 ``fdatasync`` of the index in all -- the index row is not durable
  when the C-STORE is answered.
- radflag as shipped (``radflag serve`` defaults, SQLite): validate, write the PS3.10 file
  durably (fsync, link, directory fsync), commit the instance row (SQLite WAL,
  ``synchronous=FULL``: one ``fdatasync`` per commit), then answer.

Before each measurement the page cache is written back (``os.sync``), so no receiver waits
for the writeback of the images or of the receiver measured before it.

``storescu`` also runs with ``TCP_NODELAY=1`` (same sender for everyone).

Usage (as root, from the repository root)::

    .venv/bin/python scripts/bench_ingest.py --images 200 --associations 1 4

Other scripts import :func:`run_ingest` and :func:`report`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from daemon.app import Radflag  # noqa: E402
from daemon.settings import Settings  # noqa: E402
from db.models import Instance  # noqa: E402
from tests.peers.dcmtk import STORESCU, StoreSCP  # noqa: E402
from tests.peers.netns import NetNamespace  # noqa: E402
from tests.peers.orthanc import OrthancPeer  # noqa: E402

MAX_PDU_BYTES = 131072
RADFLAG, STORESCP_NAME, ORTHANC = "radflag", "DCMTK storescp", "Orthanc"


@dataclass(frozen=True)
class Target:
    """A running receiver: its AE title, port (in the namespace) and a stored-count probe."""

    name: str
    aet: str
    port: int
    count: Callable[[], int]


@dataclass(frozen=True)
class Row:
    """One measurement."""

    target: str
    mode: str
    images: int
    seconds: float
    mbytes: float
    round: int = 0
    """Which round of :func:`run_ingest` (receivers alternate within a round)."""

    @property
    def images_per_s(self) -> float:
        """Images per second."""
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Megabytes (1e6) per second."""
        return self.mbytes / self.seconds


def mode_name(associations: int) -> str:
    """``"1 association"``, ``"4 associations"``; 0 means one association per image."""
    if associations == 0:
        return "association per image"
    return f"{associations} association{'s' if associations > 1 else ''}"


def make_images(folder: Path, n: int, size: int) -> list[Path]:
    """Write ``n`` distinct DX instances (same pixels, new UIDs) of ``size`` x ``size``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = DigitalXRayImageStorageForPresentation
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.PatientName, ds.PatientID = "Bench^Patient", "BENCH-1"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = folder / f"img{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _storescu(ns: NetNamespace, target: Target, files: Sequence[Path]) -> None:
    argv = [str(STORESCU), "-aet", "BENCH", "-aec", target.aet, "127.0.0.1", str(target.port)]
    proc = ns.run([*argv, *map(str, files)], timeout_s=900)
    if proc.returncode != 0:
        raise RuntimeError(f"storescu -> {target.name} failed: {proc.stderr[-2000:]}")


def send(ns: NetNamespace, target: Target, files: Sequence[Path], associations: int) -> float:
    """Send the files over ``associations`` parallel ``storescu`` runs; return wall seconds.

    File ``i`` goes over association ``i % associations``; 0 sends one association per file
    (one after the other).
    """
    start = time.perf_counter()
    if associations == 0:
        for f in files:
            _storescu(ns, target, [f])
    else:
        shares = [files[k::associations] for k in range(associations)]
        with ThreadPoolExecutor(associations) as pool:
            for done in [pool.submit(_storescu, ns, target, s) for s in shares if s]:
                done.result()
    return time.perf_counter() - start


@contextmanager
def dcmtk_target(ns: NetNamespace, work: Path) -> Iterator[Target]:
    """Tuned DCMTK ``storescp`` in the namespace (``-pdu 131072 +B --fork``), into ``work``."""
    scp = StoreSCP(
        work / "storescp",
        ns=ns,
        aet="STORESCP",
        extra_args=["-pdu", str(MAX_PDU_BYTES), "+B", "--fork"],
    )
    with scp:
        yield Target(STORESCP_NAME, "STORESCP", scp.port, lambda: len(scp.files()))


@contextmanager
def orthanc_target(ns: NetNamespace, work: Path) -> Iterator[Target]:
    """Orthanc in the namespace (largest PDU), storage and index in ``work``."""
    peer = OrthancPeer(work / "orthanc", ns=ns, extra_config={"MaximumPduLength": MAX_PDU_BYTES})
    with peer:
        yield Target(ORTHANC, peer.aet, peer.dicom_port, lambda: len(peer.instances()))


@contextmanager
def radflag_target(ns: NetNamespace, work: Path) -> Iterator[Target]:
    """Start the radflag daemon as shipped (no models, no classification) in the namespace."""
    port = ns.free_port()
    settings = Settings.model_validate(
        {
            "listener": {"ae_title": "RADFLAG", "host": "127.0.0.1", "port": port},
            "storage": {"spool_dir": str(work / "spool"), "results_dir": str(work / "results")},
            "database": {"url": f"sqlite:///{work / 'radflag.db'}"},
            "completion": {"quiet_period_s": 86400},  # ingest only: no classification runs
            "privacy": {"pseudonym_key": "bench"},
            "logging": {"level": "WARNING"},
        }
    )
    app = Radflag(settings, models=[])
    ns.call(app.start, timeout_s=60)

    def count() -> int:
        with app.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

    try:
        yield Target(RADFLAG, "RADFLAG", port, count)
    finally:
        app.stop()


TargetFactory = Callable[[NetNamespace, Path], AbstractContextManager[Target]]
TARGETS: dict[str, TargetFactory] = {
    STORESCP_NAME: dcmtk_target,
    ORTHANC: orthanc_target,
    RADFLAG: radflag_target,
}


def measure(
    ns: NetNamespace,
    make: TargetFactory,
    files: Sequence[Path],
    work: Path,
    associations: Sequence[int],
    round_no: int = 0,
) -> list[Row]:
    """Each association count against a fresh receiver; checks that all files were stored."""
    mbytes = sum(f.stat().st_size for f in files) / 1e6
    rows = []
    for k in associations:
        run_dir = work / f"run-{time.monotonic_ns()}"
        with make(ns, run_dir) as target:
            os.sync()  # start clean: no writeback left by the images or the previous receiver
            seconds = send(ns, target, files, k)
            deadline = time.monotonic() + 60
            while target.count() < len(files) and time.monotonic() < deadline:
                time.sleep(0.2)
            stored = target.count()
            if stored != len(files):
                raise RuntimeError(f"{target.name} stored {stored} of {len(files)}")
            rows.append(Row(target.name, mode_name(k), len(files), seconds, mbytes, round_no))
            print(f"  {target.name:15s} {mode_name(k):22s} {seconds:7.2f} s", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


@contextmanager
def tcp_nodelay_env() -> Iterator[None]:
    """``TCP_NODELAY=1`` for every DCMTK tool and Orthanc started meanwhile (they read it)."""
    old = os.environ.get("TCP_NODELAY")
    os.environ["TCP_NODELAY"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TCP_NODELAY", None)
        else:
            os.environ["TCP_NODELAY"] = old


def run_ingest(
    n_images: int,
    associations: Sequence[int],
    work: Path,
    *,
    size: int = 2048,
    targets: Sequence[str] = (STORESCP_NAME, ORTHANC, RADFLAG),
    rounds: int = 1,
) -> list[Row]:
    """Measure every receiver in ``targets`` with every association count, in one run.

    With ``rounds`` > 1 every receiver is measured once per round and the order of the
    receivers turns by one each round, so a burst of load elsewhere on the machine hits
    different receivers in different rounds; compare with :func:`round_ratios`.

    Parameters
    ----------
    n_images
        Images sent per measurement (``size`` x ``size``, 16 bit, 8 MiB at 2048).
    associations
        Parallel association counts, e.g. ``(1, 4)``; 0 means one association per image.
    work
        Scratch folder (images and receivers' storage; receivers' folders are removed).
    size
        Rows = columns.
    targets
        Receivers to measure (names as in :data:`TARGETS`).
    rounds
        How often every receiver is measured.

    Returns
    -------
    list[Row]
        One row per round, receiver and association count.
    """
    files = make_images(work / "images", n_images, size)
    rows: list[Row] = []
    with tcp_nodelay_env(), NetNamespace(max_lifetime_s=3600) as ns:
        for round_no in range(rounds):
            turn = round_no % len(targets)
            for name in [*targets[turn:], *targets[:turn]]:
                rows += measure(ns, TARGETS[name], files, work, associations, round_no)
    return rows


def round_ratios(rows: Sequence[Row], target: str, baseline: str, mode: str) -> list[float]:
    """``target`` / ``baseline`` images/s in each round where both were measured in ``mode``."""
    by = {(r.round, r.target, r.mode): r for r in rows}
    ratios = []
    for rnd in sorted({r.round for r in rows}):
        num, den = by.get((rnd, target, mode)), by.get((rnd, baseline, mode))
        if num is not None and den is not None:
            ratios.append(num.images_per_s / den.images_per_s)
    return ratios


def report(rows: Sequence[Row]) -> str:
    """Markdown table, then radflag's ratios to storescp and to Orthanc and the two goals.

    Each ratio is the median of the per-round ratios (every round listed beside it).
    """
    lines = [
        "| round | receiver | mode | images | s | images/s | MB/s |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.round + 1} | {r.target} | {r.mode} | {r.images} | {r.seconds:.2f} "
            f"| {r.images_per_s:.1f} | {r.mb_per_s:.0f} |"
        )
    lines.append("")
    for mode in dict.fromkeys(r.mode for r in rows):
        parts = []
        for other, goal in (
            (STORESCP_NAME, 0.5 if mode != "1 association" else None),
            (ORTHANC, 2.0 if mode == "1 association" else None),
        ):
            ratios = round_ratios(rows, RADFLAG, other, mode)
            if not ratios:
                continue
            ratio = statistics.median(ratios)
            verdict = (
                "" if goal is None else f" ({'meets' if ratio >= goal else 'misses'} >= {goal:g}x)"
            )
            each = ", ".join(f"{x:.2f}" for x in ratios)
            parts.append(f"radflag/{other} {ratio:.2f}x{verdict} [rounds: {each}]")
        if parts:
            lines.append(f"{mode}: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="number of images (200)")
    parser.add_argument("--size", type=int, default=2048, help="rows = columns (2048)")
    parser.add_argument(
        "--associations",
        type=int,
        nargs="+",
        default=[1, 4],
        help="parallel association counts (1 4); 0 = one association per image",
    )
    parser.add_argument(
        "--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS), metavar="NAME"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure every receiver this often, alternating (1)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (temp)")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="radflag-bench-"))
    try:
        print(f"{args.images} images of {args.size}^2 x 16 bit in {work}", flush=True)
        rows = run_ingest(
            args.images,
            args.associations,
            work,
            size=args.size,
            targets=args.targets,
            rounds=args.rounds,
        )
        print()
        print(report(rows))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
