"""Measure inference throughput (images/s) of a bundle at batch 1 and batch 16.

Usage: ``python scripts/bench_inference.py [--bundle PATH] [--images N] [--device auto]``.
Reports the forward pass alone (preprocessed inputs) and end to end (stored pixels ->
preprocess -> forward). Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from model.bundle import default_bundle_path, load_bundle
from model.infer import Classifier, select_device
from model.pixels import PixelMeta
from model.preprocess import preprocess


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
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
