#!/usr/bin/env python
"""Ingest benchmark: radflag vs DCMTK storescp vs Orthanc (a measurement, not a test).

Sends N x 2048^2 16-bit DX images (Explicit VR Little Endian, 8 MiB each) with DCMTK
``storescu`` -- once over one association, once with one association per image -- to each
receiver. All receivers and the sender run inside one private network namespace
(``tests/peers/netns.py``), so every byte goes over the namespace's loopback and the
conditions are the same for everyone: radflag's listener is started from a thread that joined
the namespace (its server socket lives there), ``storescp`` and Orthanc are processes in it.

What each receiver does per image:

- radflag: the full ingest path of ``radflag serve`` -- validate, write the PS3.10 file
  (fsync + atomic rename + directory fsync), commit the instance row in SQLite, answer;
- DCMTK ``storescp``: write the file (no fsync) -- the practical upper bound;
- Orthanc: write the file and index it in its SQLite database.

Maximum PDU: 131072 bytes for ``storescp`` and Orthanc (their largest setting), radflag's
default 4 MiB; ``storescu`` never sends PDUs above 131072, so all receive the same PDUs.

The per-association overhead is ``(T_per_image - T_one_association) / N``: the extra cost of
an association (A-ASSOCIATE, A-RELEASE, TCP set-up and the ``storescu`` process start,
which is the same for every receiver).

Usage (as root, from the repository root)::

    .venv/bin/python scripts/bench_ingest.py --images 200
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
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

    @property
    def images_per_s(self) -> float:
        """Images per second."""
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        """Megabytes (1e6) per second."""
        return self.mbytes / self.seconds


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


def send(ns: NetNamespace, target: Target, files: Sequence[Path]) -> float:
    """``storescu`` the files over one association; return the wall time in seconds."""
    argv = [str(STORESCU), "-aet", "BENCH", "-aec", target.aet, "127.0.0.1", str(target.port)]
    start = time.perf_counter()
    proc = ns.run([*argv, *map(str, files)], timeout_s=900)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"storescu -> {target.name} failed: {proc.stderr[-2000:]}")
    return elapsed


@contextmanager
def dcmtk_target(ns: NetNamespace, work: Path) -> Iterator[Target]:
    """DCMTK ``storescp`` in the namespace, writing to ``work``."""
    scp = StoreSCP(
        work / "storescp", ns=ns, aet="STORESCP", extra_args=["-pdu", str(MAX_PDU_BYTES)]
    )
    with scp:
        yield Target("DCMTK storescp", "STORESCP", scp.port, lambda: len(scp.files()))


@contextmanager
def orthanc_target(ns: NetNamespace, work: Path) -> Iterator[Target]:
    """Orthanc in the namespace, storage and index in ``work``."""
    peer = OrthancPeer(work / "orthanc", ns=ns, extra_config={"MaximumPduLength": MAX_PDU_BYTES})
    with peer:
        yield Target("Orthanc", peer.aet, peer.dicom_port, lambda: len(peer.instances()))


@contextmanager
def radflag_target(ns: NetNamespace, work: Path) -> Iterator[Target]:
    """Start the radflag daemon (no models, no classification) in the namespace."""
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
        yield Target("radflag", "RADFLAG", port, count)
    finally:
        app.stop()


TargetFactory = Callable[[NetNamespace, Path], AbstractContextManager[Target]]


def measure(ns: NetNamespace, make: TargetFactory, files: Sequence[Path], work: Path) -> list[Row]:
    """Both modes against a fresh receiver each."""
    mbytes = sum(f.stat().st_size for f in files) / 1e6
    rows = []
    for mode in ("one association", "association per image"):
        run_dir = work / f"run-{time.monotonic_ns()}"
        with make(ns, run_dir) as target:
            if mode == "one association":
                seconds = send(ns, target, files)
            else:
                seconds = sum(send(ns, target, [f]) for f in files)
            deadline = time.monotonic() + 60
            while target.count() < len(files) and time.monotonic() < deadline:
                time.sleep(0.2)
            stored = target.count()
            if stored != len(files):
                raise RuntimeError(f"{target.name} stored {stored} of {len(files)}")
            rows.append(Row(target.name, mode, len(files), seconds, mbytes))
            print(f"  {target.name:15s} {mode:22s} {seconds:7.2f} s", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def process_start_s(ns: NetNamespace, repeats: int = 20) -> float:
    """Median wall time to start and end ``storescu --version`` in the namespace."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ns.run([str(STORESCU), "--version"], timeout_s=30)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def report(rows: list[Row], spawn_s: float) -> str:
    """Markdown table plus the two goals (throughput vs Orthanc, per-association overhead)."""
    by = {(r.target, r.mode): r for r in rows}
    lines = [
        "| receiver | mode | images | s | images/s | MB/s | overhead per association (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        single = by[(r.target, "one association")]
        overhead = ""
        if r.mode == "association per image":
            overhead = f"{(r.seconds - single.seconds) / r.images * 1000:.1f}"
        lines.append(
            f"| {r.target} | {r.mode} | {r.images} | {r.seconds:.2f} | {r.images_per_s:.1f} "
            f"| {r.mb_per_s:.0f} | {overhead} |"
        )
    rad, orth = "radflag", "Orthanc"
    lines.append("")
    for mode in ("one association", "association per image"):
        ratio = by[(rad, mode)].images_per_s / by[(orth, mode)].images_per_s
        verdict = "meets" if ratio >= 2 else "misses"
        lines.append(f"radflag / Orthanc, {mode}: {ratio:.2f}x ({verdict} the >= 2x goal)")
    rad_overhead = (
        by[(rad, "association per image")].seconds - by[(rad, "one association")].seconds
    ) / by[(rad, "one association")].images
    verdict = "meets" if rad_overhead <= 0.060 else "misses"
    lines.append(
        f"radflag per-association overhead: {rad_overhead * 1000:.1f} ms "
        f"({verdict} the <= 60 ms goal); of which starting the sender process "
        f"(storescu --version, median): {spawn_s * 1000:.1f} ms"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="number of images (200)")
    parser.add_argument("--size", type=int, default=2048, help="rows = columns (2048)")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch folder (temp)")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="radflag-bench-"))
    try:
        print(f"writing {args.images} images of {args.size}^2 x 16 bit to {work}", flush=True)
        files = make_images(work / "images", args.images, args.size)
        rows: list[Row] = []
        with NetNamespace(max_lifetime_s=3600) as ns:
            for make in (dcmtk_target, orthanc_target, radflag_target):
                rows += measure(ns, make, files, work)
            spawn_s = process_start_s(ns)
        print()
        print(report(rows, spawn_s))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
