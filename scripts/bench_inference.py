"""Measure inference throughput (images/s) of a bundle at batch 1 and batch 16.

Usage: ``python scripts/bench_inference.py [--bundle PATH] [--images N] [--device auto]``.
Reports the forward pass alone (preprocessed inputs) and end to end (stored pixels ->
preprocess -> forward), and the serving pattern: one-image studies submitted one at a time
from ``--in-flight`` threads through the cross-study micro-batcher (:mod:`model.batcher`),
against batch 1 per study in the same run (ratio). Not a test: numbers depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from model.batcher import BatcherConfig, MicroBatcher
from model.bundle import default_bundle_path, load_bundle
from model.infer import Classifier, select_device
from model.pixels import PixelMeta
from model.preprocess import preprocess


def micro_batched(
    clf: Classifier, inputs: Sequence[npt.NDArray[Any]], in_flight: int, latency_s: float
) -> float:
    """Return images/s of one-image studies from ``in_flight`` threads via a micro-batcher."""
    config = BatcherConfig(max_batch=clf.batch_size, max_latency_s=latency_s)
    batcher = MicroBatcher(clf.classify_prepared, config).start()
    chunks = [inputs[k::in_flight] for k in range(in_flight)]

    def study_thread(mine: Sequence[npt.NDArray[Any]]) -> None:
        for x in mine:  # one study at a time, waiting for its answer as the worker does
            batcher.submit(x).result()

    threads = [threading.Thread(target=study_thread, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    batcher.stop()
    return len(inputs) / elapsed


def main() -> int:
    """Run the benchmark and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=default_bundle_path())
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--stored-size", type=int, default=224, help="side of synthetic stored images"
    )
    parser.add_argument("--in-flight", type=int, default=4, help="studies in flight")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="batch latency bound")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    device = select_device(args.device)
    spec = bundle.card.preprocess_spec
    rng = np.random.default_rng(0)
    stored = [
        (rng.integers(0, 4096, (args.stored_size, args.stored_size)).astype(np.uint16), PixelMeta())
        for _ in range(args.images)
    ]
    inputs = [preprocess(p, m, spec) for p, m in stored]
    report: dict[str, object] = {
        "bundle": str(args.bundle),
        "architecture": bundle.card.architecture,
        "input_size": spec.input_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "images": args.images,
    }
    for batch_size in (1, 16):
        clf = Classifier(bundle, device=device, batch_size=batch_size)
        clf.predict(inputs[: min(len(inputs), 2 * batch_size)])  # warm-up
        t0 = time.perf_counter()
        clf.predict(inputs)
        forward_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        clf.classify(stored)
        total_s = time.perf_counter() - t0
        report[f"batch{batch_size}_forward_images_per_s"] = round(args.images / forward_s, 1)
        report[f"batch{batch_size}_end_to_end_images_per_s"] = round(args.images / total_s, 1)
    clf = Classifier(bundle, device=device, batch_size=16)
    one = Classifier(bundle, device=device, batch_size=1)
    t0 = time.perf_counter()
    for x in inputs:  # the old worker: one study, one forward of one image
        one.classify_prepared([x])
    per_study = args.images / (time.perf_counter() - t0)
    batched = micro_batched(clf, inputs, args.in_flight, args.latency_ms / 1000)
    report["one_image_studies_batch1_images_per_s"] = round(per_study, 1)
    report[f"one_image_studies_micro_batched_{args.in_flight}_in_flight_images_per_s"] = round(
        batched, 1
    )
    report["micro_batched_over_batch1"] = round(batched / per_study, 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
