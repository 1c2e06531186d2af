#!/usr/bin/env python
"""The one pipeline benchmark: bare model vs ``radflag serve`` vs ingest peers, in one run.

Sections (``--sections``, default all), on the same images:

- ``bare``: the default bundle on the stored DX files: read + decode + ``model_input`` +
  preprocess + forward, batch 16, torch threads = cores (the per-image work of the daemon);
- ``e2e``: a real ``radflag serve`` (SQLite, short timers) with a DCMTK ``storescp`` as PACS:
  the studies sent by ``dcmsend`` over one association, timed from the first byte sent to the
  last result object the PACS wrote; SR only, SR+SC, and SR only with multi-image studies;
- ``latency``: 1-image studies on an idle radflag, from the end of their C-STORE to their SR at
  the PACS (p50/p95), then the same with ``--queue`` studies sent just ahead of them;
- ``memory``: VmHWM of the serve process (and children) across a ``--images``-image study
  (small images), and one tenth of it for comparison; ``--memory-real`` adds one run with
  real-sized images (radflag is killed if its tree exceeds ``--memory-cap-mb``);
- ``ingest``: ``--ingest-images`` x 2048^2 16-bit DX over 1 and 4 parallel associations into
  tuned ``storescp`` (``+B -pdu 131072``), Orthanc and radflag, all with TCP_NODELAY=1.

It prints one table with the ratios and targets. Everything runs in a temporary folder
(removed at the end) and private network namespaces; every process started is stopped by
its pid. The machine's load matters: compare ratios, not absolute numbers.

Usage (as root, from the repository root)::

    .venv/bin/python scripts/bench_pipeline.py
    .venv/bin/python scripts/bench_pipeline.py --sections bare,e2e --studies 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model.bundle import Bundle, default_bundle_path, load_bundle  # noqa: E402
from scripts.bench.corpus import StudyWriter, flatten, keep_applicable, render_sources  # noqa: E402
from scripts.bench.ingest import IngestPlan, run_ingest  # noqa: E402
from scripts.bench.sections import bare_throughput, latency, peak_memory, throughput  # noqa: E402
from scripts.bench.stack import (  # noqa: E402
    BenchTimeout,
    Deadline,
    MemorySampler,
    Ports,
    ServeOptions,
    Stack,
)
from scripts.bench.table import SR_ONLY, SR_SC, Figures, ratios, render  # noqa: E402
from scripts.bench_ingest import tcp_nodelay_env  # noqa: E402
from tests.peers.netns import NetNamespace  # noqa: E402

SECTIONS = ("bare", "e2e", "latency", "memory", "ingest")
VARIANTS = ("sr", "srsc", "multi")


def _shape(text: str) -> tuple[int, int]:
    rows, _, cols = text.lower().partition("x")
    return int(rows), int(cols or rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma list of " + "/".join(SECTIONS)
    )
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help="e2e runs: comma list of sr/srsc/multi"
    )
    p.add_argument("--studies", type=int, default=200, help="1-image studies for bare and e2e")
    p.add_argument("--size", type=_shape, default=(2500, 2048), help="DX rows x columns")
    p.add_argument("--distinct", type=int, default=24, help="distinct source radiographs")
    p.add_argument("--multi", type=int, default=10, help="images per study, multi variant")
    p.add_argument("--probes", type=int, default=20, help="latency probes (1-image studies)")
    p.add_argument("--queue", type=int, default=100, help="studies queued ahead of the probes")
    p.add_argument("--images", type=int, default=500, help="images of the memory study")
    p.add_argument("--memory-size", type=_shape, default=(512, 512), help="its rows x columns")
    p.add_argument("--memory-real", action="store_true", help="also a real-sized memory run")
    p.add_argument("--memory-cap-mb", type=float, default=6000, help="kill radflag above this")
    p.add_argument("--ingest-images", type=int, default=200)
    p.add_argument("--ingest-size", type=int, default=2048)
    p.add_argument(
        "--ingest-rounds", type=int, default=3, help="ingest: every receiver this often (3)"
    )
    p.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    p.add_argument("--quiet-period", type=float, default=1.0, help="completion.quiet_period_s")
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [worker] setting of the serve runs as TOML, e.g. studies_in_flight=4 (repeatable)",
    )
    p.add_argument("--max-minutes", type=float, default=90, help="bound on the whole run")
    p.add_argument("--bundle", type=Path, default=default_bundle_path())
    p.add_argument("--data", type=Path, default=None, help="Kermany folder if it moved")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS) | set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown sections or variants: {sorted(unknown)}")
    pairs = [item.partition("=") for item in args.worker]
    if any(not key.strip() or not sep or not value.strip() for key, sep, value in pairs):
        p.error(f"--worker wants KEY=VALUE, got {args.worker}")
    args.worker = tuple((key.strip(), value.strip()) for key, _, value in pairs)
    return args


def serve_options(args: argparse.Namespace, outputs: tuple[str, ...] = ("SR",)) -> ServeOptions:
    """Return the serve configuration of the runs (``outputs``: the PACS destination's)."""
    return ServeOptions(outputs=outputs, quiet_period_s=args.quiet_period, worker=args.worker)


def conditions(args: argparse.Namespace, argv: Sequence[str] | None) -> list[str]:
    """Return what the reader needs to judge the figures."""
    cmd = " ".join(sys.argv if argv is None else ["scripts/bench_pipeline.py", *argv])
    return [
        f"command: {cmd}",
        f"machine: {os.cpu_count()} cores; load average at start "
        f"{os.getloadavg()[0]:.1f} (other work on the machine: compare ratios only)",
        f"images: Kermany validation radiographs rendered as 12-bit DX {args.size[0]}x"
        f"{args.size[1]} Explicit VR LE ({args.distinct} distinct sources, new UIDs each)",
        f"serve: {serve_options(args).describe()}",
        "e2e: dcmsend, one association, first byte sent -> mtime of the last result file "
        "written by storescp +B -pdu 131072 --fork (the PACS); latency: end of the probe's dcmsend "
        "-> mtime of its SR at the PACS",
        "DCMTK and Orthanc processes run with TCP_NODELAY=1",
    ]


class Run:
    """One benchmark run: its work folder, ports, deadline, figures and written images."""

    def __init__(self, args: argparse.Namespace, work: Path, figures: Figures) -> None:
        self.args = args
        self.work = work
        self.figures = figures
        self.deadline = Deadline(args.max_minutes * 60)
        self.ports = Ports(11200, 11299)
        self.bundle: Bundle = load_bundle(args.bundle)
        self._writer: StudyWriter | None = None

    def writer(self) -> StudyWriter:
        """Realistic-size studies (renditions made on first use)."""
        if self._writer is None:
            self._writer = self.make_writer(self.args.size, self.work / "studies")
        return self._writer

    def make_writer(self, shape: tuple[int, int], folder: Path) -> StudyWriter:
        """Render ``--distinct`` sources at ``shape``; keep those the gate accepts."""
        say(f"rendering {self.args.distinct} sources at {shape[0]}x{shape[1]}")
        rendered = render_sources(self.bundle, self.args.distinct, shape, self.args.data)
        kept = keep_applicable(self.bundle, rendered)
        if not kept:
            raise RuntimeError("the applicability gate refuses every rendered source")
        self.figures.conditions.append(
            f"sources at {shape[0]}x{shape[1]}: {len(kept)} used, "
            f"{len(rendered) - len(kept)} refused by the applicability gate and left out "
            "(their studies would get no SR)"
        )
        return StudyWriter(kept, folder)

    def stack(self, ns: NetNamespace, name: str, outputs: tuple[str, ...]) -> Stack:
        """Start a serve stack (caller stops it)."""
        opts = serve_options(self.args, outputs)
        say(f"starting radflag serve ({name})")
        return Stack(ns, self.work / name, self.ports, opts)

    def serve_sections(self, ns: NetNamespace, want: set[str]) -> None:
        """Sections b, c, d on an SR-only stack, then b again on an SR+SC stack."""
        a = self.args
        with contextlib.ExitStack() as cleanup:
            st = self.stack(ns, "serve-sr", ("SR",))
            cleanup.callback(st.stop)
            st.start(self.deadline)
            sampler = MemorySampler(st.pid, a.memory_cap_mb).start()
            cleanup.callback(sampler.stop)
            if "memory" in want:
                self.memory(st, sampler, a.memory_size, (max(1, a.images // 10), a.images))
            if "e2e" in want and "sr" in a.variants:
                self.e2e(st, SR_ONLY, self.writer().studies("tput", a.studies))
            if "latency" in want:
                self.latency(st)
            if "e2e" in want and "multi" in a.variants and a.multi > 1:
                n = max(1, a.studies // a.multi)
                label = f"SR only, {a.multi}-image studies"
                self.e2e(st, label, self.writer().studies("multi", n, a.multi))
        if "e2e" in want and "srsc" in a.variants:
            with contextlib.ExitStack() as cleanup:
                st = self.stack(ns, "serve-srsc", ("SR", "SC"))
                cleanup.callback(st.stop)
                st.start(self.deadline)
                self.e2e(st, SR_SC, self.writer().studies("tput-sc", a.studies))
        if "memory" in want and a.memory_real:
            with contextlib.ExitStack() as cleanup:
                st = self.stack(ns, "serve-mem", ("SR",))
                cleanup.callback(st.stop)
                st.start(self.deadline)
                sampler = MemorySampler(st.pid, a.memory_cap_mb).start()
                cleanup.callback(sampler.stop)
                self.memory(st, sampler, a.size, (a.images,), self.writer())

    def e2e(self, st: Stack, label: str, studies: list[list[Path]]) -> None:
        """One throughput run; its files are removed afterwards."""
        say(f"e2e {label}: {len(studies)} studies")
        run = throughput(st, label, studies, self.deadline)
        self.figures.e2e.append(run)
        say(f"  {run.studies_per_s:.3f} studies/s, {run.received}/{run.expected} results")
        _remove(flatten(studies))

    def latency(self, st: Stack) -> None:
        """Idle probes, then probes behind a queue."""
        a, w = self.args, self.writer()
        self.figures.quiet_period_s = a.quiet_period
        say(f"latency: {a.probes} idle probes")
        probes = w.studies("probes", a.probes)
        self.figures.latency_idle = latency(st, probes, [], self.deadline)
        say(f"  idle latencies (s): {[round(v, 2) for v in self.figures.latency_idle]}")
        _remove(flatten(probes))
        if a.queue > 0:
            say(f"latency: {a.probes} probes behind {a.queue} studies")
            ahead, probes = w.studies("ahead", a.queue), w.studies("probes-q", a.probes)
            self.figures.queued_ahead = a.queue
            self.figures.latency_queued = latency(st, probes, ahead, self.deadline)
            say(f"  queued latencies (s): {[round(v, 2) for v in self.figures.latency_queued]}")
            _remove(flatten(ahead) + flatten(probes))

    def memory(
        self,
        st: Stack,
        sampler: MemorySampler,
        shape: tuple[int, int],
        sizes: Sequence[int],
        writer: StudyWriter | None = None,
    ) -> None:
        """One study of each size in ``sizes`` (ascending: the high-water mark only rises)."""
        if writer is None:
            writer = self.make_writer(shape, self.work / f"studies-{shape[0]}x{shape[1]}")
        for n in sizes:
            say(f"memory: one {n}-image study of {shape[0]}x{shape[1]}")
            study = writer.studies(f"mem{n}", 1, n)[0]
            mem = peak_memory(st, sampler, study, shape, self.deadline)
            self.figures.memory.append(mem)
            say(f"  serve VmHWM {mem.serve_hwm_mb:.0f} MiB, capped: {mem.capped}")
            _remove(study)

    def run(self) -> None:
        """Every selected section, in order."""
        want = set(self.args.sections)
        if "bare" in want:
            files = flatten(self.writer().studies("bare", self.args.studies))
            say(f"bare model: {len(files)} images")
            self.figures.bare = bare_throughput(files, self.bundle)
            say(f"  {self.figures.bare.images_per_s:.3f} images/s")
            _remove(files)
        if want & {"e2e", "latency", "memory"}:
            with NetNamespace(max_lifetime_s=self.deadline.left() + 120) as ns:
                self.serve_sections(ns, want)
        if "ingest" in want:
            a = self.args
            say(f"ingest: {a.ingest_images} x {a.ingest_size}^2, {a.ingest_rounds} rounds")
            self.figures.ingest = run_ingest(
                IngestPlan(a.ingest_images, a.ingest_size, a.associations, a.ingest_rounds),
                self.work,
                self.deadline,
            )


_T0 = time.monotonic()


def say(text: str) -> None:
    """Print a progress line with the seconds since start."""
    print(f"[{time.monotonic() - _T0:6.0f} s] {text}")


def _remove(files: Sequence[Path]) -> None:
    for f in files:
        f.unlink(missing_ok=True)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table; exit 1 when a section failed."""
    args = parse_args(argv)
    figures = Figures(conditions=conditions(args, argv))
    work = Path(tempfile.mkdtemp(prefix="radflag-bench-pipeline-"))
    print(f"work folder: {work}", flush=True)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)  # clean up (children, temp folder) when stopped
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background
    try:
        with tcp_nodelay_env():
            Run(args, work, figures).run()
    except (BenchTimeout, RuntimeError, OSError, ValueError) as exc:
        figures.errors.append(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        figures.errors.append("interrupted: the table holds the sections finished so far")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures.conditions.append(
        f"run took {time.monotonic() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}"
    )
    print()
    print(render(figures), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(ratios(figures), indent=2) + "\n")
    return 1 if figures.errors else 0


if __name__ == "__main__":
    sys.exit(main())
