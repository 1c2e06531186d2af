"""A spool file written while a C-STORE data set arrives (PS3.10 file, durable on demand).

The listener streams each data fragment (PS3.8 E.2, P-DATA-TF PDV) of a C-STORE request to
one of these files as it is received, instead of collecting 8 MiB in memory and writing it
afterwards: the preamble, ``DICM`` and the file meta information (PS3.10 7.1) go first, the
data set bytes follow exactly as received. (Asking the kernel to start writing back every
MiB with ``sync_file_range`` was measured and made ingest slower here: not done.)

Writes never raise (they run in pynetdicom's reader thread, where an exception would abort
the association): the first error is kept in :attr:`IncomingFile.error`, later bytes are
dropped, and the C-STORE handler answers a failure status.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


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

    def flush(self) -> None:
        """Nothing is buffered in user space."""

    def sync(self) -> None:
        """Make the bytes durable (``fsync``).

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
