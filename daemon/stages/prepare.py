"""Prepare stage: decode an image, map it to the model input, preprocess it per model.

Runs in a bounded pool (:class:`Preparer`): threads, or with ``worker.prepare_processes``
separate processes, which take decoding and preprocessing off the serve process's
interpreter lock (listener, SR encoding and database work hold it meanwhile). The decoded
image (up to 2048² x 2 bytes and its float copies) is dropped as soon as the small
preprocessed inputs exist, unless the caller asks to keep it (a one-image study whose
heatmap picture will need it; such images are prepared in a thread): decoded images alive
at once are at most the pool's workers plus one kept per study in flight.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from daemon.models import LoadedModel
from daemon.stages.inputs import model_input
from daemon.stages.plan import Selected
from daemon.stages.reading import PermanentProcessingError, decode
from dicom_io.reader import DecodedImage
from model.preprocess import PreprocessSpec, preprocess


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the models.

    Attributes
    ----------
    selected
        The image.
    inputs
        Preprocessed (C, S, S) input per model card name.
    grayscale_notes
        Grayscale attributes the reader ignored as unusable (audited).
    decoded
        The decoded image when kept (for the heatmap picture), else None.
    """

    selected: Selected
    inputs: dict[str, npt.NDArray[Any]] = field(repr=False)
    grayscale_notes: tuple[str, ...] = ()
    decoded: DecodedImage | None = field(default=None, repr=False)


def model_key(loaded: LoadedModel) -> str:
    """Return the name a model's inputs and results are filed under (its card name)."""
    return loaded.bundle.card.name


def prepare_image(sel: Selected, models: Sequence[LoadedModel], keep: bool) -> PreparedImage:
    """Decode ``sel`` and preprocess it for each of ``models``.

    Raises
    ------
    UnreadableInstance
        When the pixel data cannot be decoded or the file is gone (permanent).
    PermanentProcessingError
        When the image's attributes cannot be mapped to a model input.
    """
    specs = {model_key(m): m.classifier.spec for m in models}
    return prepare_with_specs(sel, specs, keep)


def prepare_with_specs(
    sel: Selected, specs: Mapping[str, PreprocessSpec], keep: bool = False
) -> PreparedImage:
    """Do :func:`prepare_image` given each model's preprocessing spec (in a worker process)."""
    image = decode(sel.instance)
    try:
        pixels, meta = model_input(image)
    except ValueError as exc:
        raise PermanentProcessingError(f"{sel.uid}: unsupported image attributes: {exc}") from exc
    inputs = {name: preprocess(pixels, meta, spec) for name, spec in specs.items()}
    notes = () if image.presentation is None else tuple(image.presentation.notes)
    return PreparedImage(sel, inputs, notes, image if keep else None)


def _init_process() -> None:
    """Worker-process start: one intra-op thread (the pool's size is the parallelism).

    SIGINT and SIGTERM sent to the whole process group (Ctrl-C, systemd's control-group
    stop) are left to the serve process, which stops the pool after the studies in flight.
    """
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ready() -> bool:
    return True


@dataclass(frozen=True)
class _Job:
    """A submitted image and the process-pool generation it went to (-1: a thread)."""

    future: Future[PreparedImage]
    generation: int


class PrepareProcessDied(OSError):
    """A prepare process died (e.g. killed for memory): transient, the study is retried."""


class Preparer:
    """A bounded pool of prepare workers shared by every study in flight.

    Parameters
    ----------
    threads
        Thread pool size (images decoded at the same time in the serve process).
    processes
        When > 0, images whose decoded pixels are not kept are prepared in this many
        worker processes (``spawn``: no fork of a process running torch threads), started
        and warmed up here.
    """

    def __init__(self, threads: int, processes: int = 0) -> None:
        self.threads = threads
        self.processes = processes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="radflag-prepare")
        self._procs: Executor | None = None
        self._generation = 0
        """Which process pool is current (a broken one is replaced once)."""
        self._lock = threading.Lock()
        if processes > 0:
            self._procs = self._start_processes()

    def _start_processes(self) -> Executor:
        pool = ProcessPoolExecutor(
            self.processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_process,
        )
        for future in [pool.submit(_ready) for _ in range(self.processes)]:
            future.result()  # imported and warm before the first study
        return pool

    def stream(
        self, jobs: Sequence[tuple[Selected, Sequence[LoadedModel]]], keep: bool
    ) -> Iterator[PreparedImage]:
        """Yield the prepared images of ``jobs`` in order, at most a pool's size ahead.

        A failure is raised when its image's turn comes (earlier images were yielded).
        """
        remote = self._procs is not None and not keep
        width = self.processes if remote else self.threads
        ahead: deque[_Job] = deque()
        todo = iter(jobs)
        for sel, models in todo:
            ahead.append(self._submit(sel, models, keep, remote))
            if len(ahead) >= width:
                break
        while ahead:
            done = self._result(ahead.popleft())
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(self._submit(nxt[0], nxt[1], keep, remote))
            yield done

    def _submit(
        self, sel: Selected, models: Sequence[LoadedModel], keep: bool, remote: bool
    ) -> _Job:
        if remote:
            return self._submit_remote(sel, models)
        return _Job(self._pool.submit(prepare_image, sel, models, keep), -1)

    def _submit_remote(self, sel: Selected, models: Sequence[LoadedModel]) -> _Job:
        specs = {model_key(m): m.classifier.spec for m in models}
        with self._lock:
            procs, generation = self._procs, self._generation
        assert procs is not None
        try:
            return _Job(procs.submit(prepare_with_specs, sel, specs), generation)
        except BrokenProcessPool as exc:  # it died between two studies
            raise self._restart(generation) from exc

    def _result(self, job: _Job) -> PreparedImage:
        """Return the job's result; a dead worker process restarts the pool (transient)."""
        try:
            return job.future.result()
        except BrokenProcessPool as exc:
            raise self._restart(job.generation) from exc

    def _restart(self, broken: int) -> PrepareProcessDied:
        """Replace pool generation ``broken`` (once, whichever study met it first)."""
        with self._lock:
            if self._generation == broken:
                old, self._procs = self._procs, self._start_processes()
                self._generation += 1
                if old is not None:
                    old.shutdown(wait=False, cancel_futures=True)
        return PrepareProcessDied("a prepare process died; the study will be retried")

    def close(self) -> None:
        """Stop the pools after the running jobs (queued ones are cancelled)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._procs is not None:
            self._procs.shutdown(wait=True, cancel_futures=True)
