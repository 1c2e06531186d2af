#!/usr/bin/env python
"""Scale-out benchmark: studies per second with 1 worker process vs 2 (a measurement, not a test).

For each worker count: a fresh PostgreSQL database, one ``radflag serve --roles listener``
process receives N one-image studies pushed with DCMTK ``dcmsend``; K ``radflag serve --roles
worker`` processes are started on the same machine and the same database and, once all of
them are up (models loaded), every study is made READY at once. Throughput is N divided by
the span from the first ``STUDY_CLAIMED`` to the last ``STUDY_CLASSIFIED`` audit row. Images
are real radiographs from ``--data`` (Kermany folder) when given, else synthetic 512x512 DX.

Usage (from the repository root, PostgreSQL at 127.0.0.1:5432 with trust auth)::

    .venv/bin/python scripts/bench_scaleout.py --studies 60 --workers 1 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from db.engine import make_engine, make_session_factory  # noqa: E402
from db.models import AuditEvent, Study  # noqa: E402
from db.queue import mark_ready  # noqa: E402
from db.schema import ensure_schema  # noqa: E402
from tests.cluster.serve import Serve, free_port, launch, write_config  # noqa: E402
from tests.peers.dcmtk import dcmsend  # noqa: E402
from tests.peers.dicomgen import kermany_images, make_dx_from_image, make_synthetic_dx  # noqa: E402

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_BUNDLE = REPO / "model" / "bundles" / "pneumonia"


def make_studies(out: Path, n: int, data: Path | None) -> list[Path]:
    """Write ``n`` one-image studies (real radiographs when ``data`` is given)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    images = kermany_images(data, n) if data else [None] * n
    for i, image in enumerate(images):
        path = out / f"{i:04d}.dcm"
        if image is None:
            make_synthetic_dx(512, 512, path, seed=i, bits=12, patient_id=f"B-{i}")
        else:
            make_dx_from_image(image, path, patient_id=f"B-{i}")
        files.append(path)
    return files


def run(k: int, files: list[Path], bundle: Path, work: Path) -> float:
    """Return studies per second with ``k`` worker processes."""
    name = f"radflag_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    engine = make_engine(url)
    ensure_schema(engine)
    sessions = make_session_factory(engine)
    procs: list[Serve] = []
    try:
        port = free_port()
        cfg = write_config(
            work / f"k{k}.toml",
            db_url=url,
            store=work / f"store{k}",
            port=port,
            bundle=bundle,
            pacs_port=free_port(),
        )
        cfg.write_text(cfg.read_text().split("[[destinations]]")[0])  # no destination
        procs.append(launch(cfg, port, work / f"k{k}-listener.log", roles="listener"))
        sent = dcmsend(port, files, called_aet="RADFLAG", timeout_s=600)
        if sent.returncode != 0:
            raise RuntimeError(sent.stderr)
        for i in range(k):
            procs.append(launch(cfg, port, work / f"k{k}-worker{i}.log", roles="worker"))
        time.sleep(2.0)  # let the workers settle after loading their models
        mark_ready(sessions, quiet_period_s=0.0)
        while _count(sessions, "READY") + _count(sessions, "PROCESSING") > 0:
            time.sleep(0.5)
        with sessions() as s:
            first = s.scalar(
                select(func.min(AuditEvent.at)).where(AuditEvent.event_type == "STUDY_CLAIMED")
            )
            last = s.scalar(
                select(func.max(AuditEvent.at)).where(AuditEvent.event_type == "STUDY_CLASSIFIED")
            )
        assert first is not None and last is not None
        return len(files) / (last - first).total_seconds()
    finally:
        for p in procs:
            p.stop()
        engine.dispose()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _count(sessions: object, state: str) -> int:
    with sessions() as s:  # type: ignore[operator]
        return int(s.scalar(select(func.count()).where(Study.state == state)) or 0)


def main() -> int:
    """Print studies/s for each worker-process count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--data", type=Path, default=None, help="Kermany folder (labels.csv)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="radflag-scaleout-") as tmp:
        work = Path(tmp)
        files = make_studies(work / "studies", args.studies, args.data)
        for k in args.workers:
            rate = run(k, files, args.bundle, work)
            print(f"{k} worker process(es): {rate:.2f} studies/s ({args.studies} studies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
