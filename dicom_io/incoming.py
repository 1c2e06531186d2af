"""A spool file written while a C-STORE data set arrives (PS3.10 file, durable on demand).

The listener streams each data fragment (PS3.8 E.2, P-DATA-TF PDV) of a C-STORE request to
one of these files as it is received, instead of collecting 8 MiB in memory and writing it
afterwards: the preamble, ``DICM`` and the file meta information (PS3.10 7.1) go first, the
data set bytes follow exactly as received.

Writeback starts while the data set is still arriving: every ``WRITEBACK_STEP_BYTES`` the
bytes written since the last step are handed to the disk (Linux ``sync_file_range(2)`` with
``SYNC_FILE_RANGE_WRITE``; a no-op where it does not exist), so the ``fsync`` that makes the
file durable before the C-STORE is answered (:meth:`IncomingFile.sync`) waits only for the
tail. ``sync_file_range`` alone guarantees nothing (no metadata, no disk cache flush): it is a
hint, its errors are ignored, and the ``fsync`` stays. (Measured on one association, 8 MiB
data sets, alternated with writeback off on a loaded 2-core machine: the final ``fsync`` fell
from 5-7 ms to 0.3-3 ms, receiving took 0.5-1 ms longer; the median time per C-STORE was
0.78-1.01 x (median 0.91 x) that without writeback in five paired runs; neutral over 4
associations. ``scripts/profile_ingest.py --alternate-writeback`` repeats the comparison.)

Writes never raise (they run in pynetdicom's reader thread, where an exception would abort
the association): the first error is kept in :attr:`IncomingFile.error`, later bytes are
dropped, and the C-STORE handler answers a failure status.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

WRITEBACK_STEP_BYTES = 512 * 1024
"""Writeback of received bytes is started every this many bytes (:func:`start_writeback`)."""

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Bind ``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``; None if absent."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux (or no such symbol in this libc)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        function(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a hint: errors ignored

    return start


def _no_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Where ``sync_file_range`` does not exist the final ``fsync`` writes everything."""


start_writeback: Callable[[int, int, int], None] = _libc_sync_file_range() or _no_writeback
"""``(fd, offset, nbytes)``: ask the kernel to start writing these bytes back, not waiting."""


class IncomingFile:
    """A temporary spool file receiving one data set; see the module docstring.

    Parameters
    ----------
    path
        The temporary file (created here, exclusively).
    header
        Preamble, ``DICM`` prefix and encoded file meta information.

    Raises
    ------
    OSError
        When the file cannot be created or the header not written (the file is removed).
    """

    def __init__(self, path: Path, header: bytes) -> None:
        self.path = path
        self.name = str(path)
        """The file name (pynetdicom unlinks ``name`` after the C-STORE handler returned)."""
        self.error: OSError | None = None
        self.data_offset = len(header)
        """Where the data set starts in the file."""
        self.size = 0
        self._written_back = 0
        """Bytes before this offset have been handed to :func:`start_writeback`."""
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            self._write_all(header)
        except OSError:
            self.discard()
            raise

    @property
    def file(self) -> IncomingFile:
        """Itself: pynetdicom flushes ``file`` after every fragment (a no-op here)."""
        return self

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; on error remember it and drop this and later bytes."""
        if self.error is not None or self._fd is None:
            return
        try:
            self._write_all(data)
        except OSError as exc:
            self.error = exc
            logger.debug("incoming spool write failed", exc_info=True)
            return
        if self.size - self._written_back >= WRITEBACK_STEP_BYTES:
            start_writeback(self._fd, self._written_back, self.size - self._written_back)
            self._written_back = self.size

    def flush(self) -> None:
        """Nothing is buffered in user space."""

    def sync(self) -> None:
        """Make the bytes durable (``fsync``, also of what was written back while receiving).

        Raises
        ------
        OSError
            The error an earlier write met, or the ``fsync`` error.
        """
        if self.error is not None:
            raise self.error
        if self._fd is None:
            raise OSError(errno.EBADF, "incoming spool file already closed", self.name)
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the descriptor (idempotent); the file stays."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the file (a data set that will not be kept)."""
        self.close()
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            logger.exception("cannot remove incoming spool file", extra={"path": self.name})

    @property
    def out_of_space(self) -> bool:
        """True when the write error was a full disk or quota."""
        return self.error is not None and self.error.errno in (errno.ENOSPC, errno.EDQUOT)

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.size += written
