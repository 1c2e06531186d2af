"""Reading spooled instances, and which processing errors are permanent (ARCHITECTURE 8).

- **permanent** -- the content itself prevents a result: an instance whose header or pixel
  data cannot be parsed (:class:`~dicom_io.reader.DecodeError`; quarantined, the study
  FAILED naming it), a spool file that is gone, a header value radflag cannot interpret
  (:class:`PermanentProcessingError`). Never retried.
- **transient** -- :data:`TRANSIENT_ERRORS` (I/O other than a missing file, database):
  retried by the queue with backoff up to ``worker.max_attempts``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from db.queue import ClaimedInstance
from dicom_io.reader import DecodedImage, DecodeError, ImageHeader, read_dataset, read_header
from dicom_io.reader import read_image as read_image

_T = TypeVar("_T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, SQLAlchemyError)
"""Failures that may heal (I/O, database): the study is retried later."""


class PermanentProcessingError(Exception):
    """The study's content itself prevents a result; retrying cannot help."""


class UnreadableInstance(PermanentProcessingError):
    """An acknowledged instance cannot be read or decoded any more (quarantined, FAILED).

    Parameters
    ----------
    instance
        The claimed instance.
    reason
        The reader's or decoder's reason.
    what
        ``header``, ``pixel data`` or ``file``: what could not be read.
    """

    def __init__(self, instance: ClaimedInstance, reason: str, what: str) -> None:
        super().__init__(f"cannot read the {what} of {instance.sop_instance_uid}: {reason}")
        self.instance = instance
        self.reason = reason
        self.what = what

    def __reduce__(self) -> tuple[type[UnreadableInstance], tuple[ClaimedInstance, str, str]]:
        """Pickle by the constructor's arguments (raised in a prepare process)."""
        return (type(self), (self.instance, self.reason, self.what))


def read_spooled(inst: ClaimedInstance, what: str, read: Callable[[Path], _T]) -> _T:
    """Read a spooled instance; a parse failure or a vanished file is permanent."""
    try:
        return read(Path(inst.path))
    except DecodeError as exc:
        raise UnreadableInstance(inst, exc.reason, what) from exc
    except FileNotFoundError as exc:
        raise UnreadableInstance(inst, "the spooled file is missing", "file") from exc


def header_of(inst: ClaimedInstance) -> ImageHeader:
    """Read the header of a spooled instance (what selection needs)."""
    return read_spooled(inst, "header", read_header)


def decode(inst: ClaimedInstance) -> DecodedImage:
    """Decode one selected image; decoder failures are permanent, other I/O is transient."""
    return read_spooled(inst, "pixel data", lambda path: read_image(path))


def source_of(inst: ClaimedInstance) -> Dataset:
    """Read a source instance without pixel data (the SR/SC copy their header from it)."""
    return read_spooled(inst, "header", lambda path: read_dataset(path, with_pixels=False))
