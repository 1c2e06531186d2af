"""Prepare stage: decode an image, map it to the model input, preprocess it per model.

Runs in a bounded thread pool (:class:`Preparer`). The decoded image (up to 2048² x 2 bytes
and its float copies) is dropped as soon as the small preprocessed inputs exist, unless the
caller asks to keep it (a one-image study whose heatmap picture will need it): decoded
images alive at once are at most the pool's threads plus one kept per study in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from daemon.models import LoadedModel
from daemon.stages.inputs import model_input
from daemon.stages.plan import Selected
from daemon.stages.reading import PermanentProcessingError, decode
from dicom_io.reader import DecodedImage
from model.preprocess import preprocess


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
    image = decode(sel.instance)
    try:
        pixels, meta = model_input(image)
    except ValueError as exc:
        raise PermanentProcessingError(f"{sel.uid}: unsupported image attributes: {exc}") from exc
    inputs = {model_key(m): preprocess(pixels, meta, m.classifier.spec) for m in models}
    notes = () if image.presentation is None else tuple(image.presentation.notes)
    return PreparedImage(sel, inputs, notes, image if keep else None)


class Preparer:
    """A bounded pool of prepare threads shared by every study in flight.

    Parameters
    ----------
    threads
        Pool size: images decoded at the same time.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="radflag-prepare")

    def stream(
        self, jobs: Sequence[tuple[Selected, Sequence[LoadedModel]]], keep: bool
    ) -> Iterator[PreparedImage]:
        """Yield the prepared images of ``jobs`` in order, at most ``threads`` ahead.

        A failure is raised when its image's turn comes (earlier images were yielded).
        """
        ahead: deque[Future[PreparedImage]] = deque()
        todo = iter(jobs)
        for sel, models in todo:
            ahead.append(self._pool.submit(prepare_image, sel, models, keep))
            if len(ahead) >= self.threads:
                break
        while ahead:
            done = ahead.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(self._pool.submit(prepare_image, nxt[0], nxt[1], keep))
            yield done

    def close(self) -> None:
        """Stop the pool after the running jobs (queued ones are cancelled)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
