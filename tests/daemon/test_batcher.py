"""The cross-study micro-batcher (issue 15): mixing, routing, failure isolation, bounds, stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.models import LoadedModel
from model.batcher import BatcherConfig, BatcherStopped, MicroBatcher
from model.infer import StagingBuffer
from model.pixels import PixelMeta
from model.preprocess import preprocess
from tests.conftest import shared_path

Item = tuple[str, int]


class Recorder:
    """A batch function that records each batch and can be held or made to fail."""

    def __init__(self, hold_first_s: float = 0.0, bad: frozenset[Item] = frozenset()) -> None:
        self.batches: list[list[Item]] = []
        self.hold_first_s = hold_first_s
        self.bad = bad
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: Sequence[Item]) -> list[str]:
        self.gate.wait()
        self.batches.append(list(items))
        if len(self.batches) == 1 and self.hold_first_s:
            time.sleep(self.hold_first_s)
        if any(item in self.bad for item in items):
            raise ValueError(f"cannot classify {sorted(set(items) & self.bad)}")
        return [f"{study}/{index}" for study, index in items]


def _submit_studies(
    batcher: MicroBatcher[Item, str], studies: dict[str, int]
) -> dict[Item, Future[str]]:
    """Submit every study's images from one thread per study, as the worker does."""
    futures: dict[Item, Future[str]] = {}
    lock = threading.Lock()

    def one(study: str, n: int) -> None:
        for i in range(n):
            future = batcher.submit((study, i))
            with lock:
                futures[(study, i)] = future

    threads = [threading.Thread(target=one, args=kv) for kv in studies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return futures


def test_a_batch_mixes_studies_and_results_go_back_to_their_study() -> None:
    run = Recorder(hold_first_s=0.3)  # studies queue up while the first batch runs
    batcher = MicroBatcher(run, BatcherConfig(max_batch=8, max_latency_s=0.05)).start()
    studies = {"A": 5, "B": 7, "C": 3}
    futures = _submit_studies(batcher, studies)
    for (study, i), future in futures.items():
        assert future.result(timeout=10) == f"{study}/{i}"
    assert batcher.stop()
    assert sum(len(b) for b in run.batches) == sum(studies.values())
    assert max(len(b) for b in run.batches) <= 8
    assert any(len({s for s, _ in b}) >= 2 for b in run.batches), run.batches


def test_a_failing_image_fails_only_its_own_study() -> None:
    bad = ("B", 1)
    run = Recorder(hold_first_s=0.3, bad=frozenset({bad}))
    batcher = MicroBatcher(run, BatcherConfig(max_batch=16, max_latency_s=0.05)).start()
    futures = _submit_studies(batcher, {"A": 4, "B": 3, "C": 4})
    with pytest.raises(ValueError, match="cannot classify"):
        futures[bad].result(timeout=10)
    for item, future in futures.items():
        if item != bad:
            assert future.result(timeout=10) == f"{item[0]}/{item[1]}"
    # the failed batch held other studies' images too: they were retried one by one
    failed = [b for b in run.batches if bad in b and len(b) > 1]
    assert failed and any(len({s for s, _ in b}) >= 2 for b in failed)
    batcher.stop()


def test_a_lone_image_is_flushed_by_the_latency_bound() -> None:
    run = Recorder()
    latency = 0.2
    batcher = MicroBatcher(run, BatcherConfig(max_batch=16, max_latency_s=latency)).start()
    t0 = time.monotonic()
    assert batcher.submit(("A", 0)).result(timeout=10) == "A/0"
    waited = time.monotonic() - t0
    assert latency * 0.9 <= waited < latency + 2.0
    batcher.stop()


def test_a_full_batch_runs_without_waiting_for_the_latency_bound() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = MicroBatcher(run, BatcherConfig(max_batch=4, max_latency_s=30.0)).start()
    futures = [batcher.submit(("A", i)) for i in range(4)]
    run.gate.set()
    assert [f.result(timeout=5) for f in futures] == [f"A/{i}" for i in range(4)]
    assert run.batches == [[("A", i) for i in range(4)]]
    batcher.stop()


def test_submit_blocks_while_the_pending_bound_is_reached() -> None:
    run = Recorder()
    run.gate.clear()  # the model is busy: nothing leaves the queue
    config = BatcherConfig(max_batch=1, max_latency_s=0.0, max_pending=3)
    batcher = MicroBatcher(run, config).start()
    first = batcher.submit(("A", 0))  # taken by the batcher thread, held at the gate
    time.sleep(0.2)
    queued = [batcher.submit(("A", i)) for i in range(1, 4)]  # fills the queue
    blocked: list[Future[str]] = []
    submitter = threading.Thread(target=lambda: blocked.append(batcher.submit(("A", 4))))
    submitter.start()
    submitter.join(timeout=0.5)
    assert submitter.is_alive() and not blocked  # backpressure: the fifth waits
    run.gate.set()
    submitter.join(timeout=10)
    assert [f.result(timeout=10) for f in [first, *queued, *blocked]] == [
        f"A/{i}" for i in range(5)
    ]
    batcher.stop()


def test_stop_runs_what_is_queued_then_refuses_new_items() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = MicroBatcher(run, BatcherConfig(max_batch=2, max_latency_s=0.0)).start()
    futures = [batcher.submit(("A", i)) for i in range(5)]
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    run.gate.set()
    stopper.join(timeout=10)
    assert [f.result(timeout=1) for f in futures] == [f"A/{i}" for i in range(5)]
    with pytest.raises(BatcherStopped):
        batcher.submit(("A", 9))


def _kermany_inputs(models: list[LoadedModel], n: int) -> list[np.ndarray]:
    folder = shared_path("cxr", "kermany-pneumonia-train", "images")
    files = sorted(p for p in folder.rglob("*.jpeg"))[:n] or sorted(folder.rglob("*.jp*g"))[:n]
    spec = models[0].classifier.spec
    out = []
    for path in files:
        pixels = np.asarray(Image.open(path).convert("L"))
        out.append(preprocess(pixels, PixelMeta(bits_stored=8), spec))
    return out


def test_batched_predictions_of_real_images_match_one_by_one(
    tiny_models: list[LoadedModel],
) -> None:
    """Real radiographs through the batcher: each image gets its own, unbatched, answer."""
    classifier = tiny_models[0].classifier
    inputs = _kermany_inputs(tiny_models, 12)
    alone = [classifier.classify_prepared([x])[0].probability for x in inputs]
    batcher = MicroBatcher(
        classifier.classify_prepared, BatcherConfig(max_batch=5, max_latency_s=0.2)
    ).start()
    futures = [batcher.submit(x) for x in inputs]
    batched = [f.result(timeout=60).probability for f in futures]
    batcher.stop()
    assert batcher.batches < len(inputs)  # really batched
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert len(set(np.round(alone, 6))) > 1  # the images differ, so a mix-up would show


def test_staging_buffer_is_allocated_once_and_reused_on_cpu() -> None:
    buffer = StagingBuffer((4, 1, 8, 8), torch.device("cpu"))
    assert not buffer.pinned
    rng = np.random.default_rng(0)
    first = [rng.random((1, 8, 8), dtype=np.float32) for _ in range(3)]
    batch = buffer.load(first)
    np.testing.assert_array_equal(batch.numpy(), np.stack(first))
    pointer = buffer.host.data_ptr()
    second = [rng.random((1, 8, 8), dtype=np.float32) for _ in range(4)]
    batch = buffer.load(second)
    np.testing.assert_array_equal(batch.numpy(), np.stack(second))
    assert buffer.host.data_ptr() == pointer and buffer.fills == 2
    with pytest.raises(ValueError, match="expected"):
        buffer.load([np.zeros((1, 9, 8), np.float32)])
    with pytest.raises(ValueError, match="exceed"):
        buffer.load([np.zeros((1, 8, 8), np.float32)] * 5)
