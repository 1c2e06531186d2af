"""Durable storage of received instances as DICOM PS3.10 files.

Layout: ``root/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``; rejected files
go to ``root/quarantine/``. UIDs are validated (PS3.5 section 9.1: digits and dots only) before
they become path components, so a hostile UID cannot escape the spool.

Every write is atomic and durable ("ack means durable"): the content goes to a temporary file
in the destination directory, is flushed and ``fsync``-ed, renamed over the final name with
``os.replace`` and the directory is ``fsync``-ed. A reader therefore sees either the old file,
the new file or nothing, never a half-written file.

Received instances are *placed* (:meth:`Spool.place_encoded`, :meth:`Spool.place_incoming`),
never written over: the temporary file is ``fsync``-ed, the final name is created with
``link(2)``, which fails when the name exists — atomically, also between processes and hosts
sharing the spool — and the directory is ``fsync``-ed once. The listener streams a data set
into its temporary file while it arrives (:meth:`Spool.open_incoming`,
:mod:`dicom_io.incoming`). A copy whose name is taken by identical bytes is
dropped; one with *other* bytes goes to ``root/duplicates/`` (kept aside for review), so an
acknowledged original is never replaced by a later copy, refused or not.

The database stores paths relative to the root (:meth:`Spool.relative`,
:meth:`Spool.resolve`), so hosts that mount the shared spool at other places agree on them.
"""

from __future__ import annotations

import copy
import errno
import filecmp
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import dcmwrite, write_file_meta_info

from dicom_io.incoming import IncomingFile
from dicom_io.uids import is_valid_uid

logger = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
"""Name of the quarantine folder below the spool root (never a valid UID)."""

DUPLICATES_DIR = "duplicates"
"""Folder below the spool root for copies of known instances with other bytes (never a UID)."""

TEMP_SUFFIX = ".tmp"
"""Suffix of in-flight temporary files (hidden: they also start with a dot)."""

INCOMING_PREFIX = ".incoming-"
"""Name prefix of the files data sets are streamed to while they arrive (in the root)."""

_PREAMBLE = b"\x00" * 128 + b"DICM"


class SpoolError(Exception):
    """A spool write or move failed; nothing was left half-written.

    Parameters
    ----------
    message
        Human-readable description.
    path
        The destination that could not be written.
    out_of_space
        True when the underlying cause is ``ENOSPC``/``EDQUOT`` (disk or quota full).

    Notes
    -----
    The original :class:`OSError` (if any) is kept as ``__cause__``.
    """

    def __init__(self, message: str, *, path: Path, out_of_space: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.out_of_space = out_of_space


def _is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Placed:
    """Where :meth:`Spool.place_encoded` put the bytes of one received instance."""

    path: Path
    """The final name, or the kept-aside copy in ``duplicates/`` when ``kept_aside``."""
    size: int
    created: bool
    """True when a new file was created (remove it if the instance is then not committed)."""
    kept_aside: bool
    """The final name held other bytes: this copy is in ``duplicates/``, the original stays."""


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        logger.exception("cannot remove spool temp file", extra={"path": str(path)})


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Atomic, fsync-ed storage of DICOM PS3.10 files below ``root``.

    Parameters
    ----------
    root
        Spool folder; created (with parents) when missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def duplicates_dir(self) -> Path:
        """Folder holding copies of known instances that arrived with other bytes."""
        return self.root / DUPLICATES_DIR

    def relative(self, path: Path | str) -> str:
        """Return ``path`` as stored in the database: relative to the root when inside it."""
        resolved = Path(path).resolve()
        if resolved.is_relative_to(self.root):
            return resolved.relative_to(self.root).as_posix()
        return str(resolved)

    def resolve(self, stored: str) -> Path:
        """Return the file path of a database path (relative to the root, or legacy absolute)."""
        return self.root / stored

    @property
    def quarantine_dir(self) -> Path:
        """Folder holding quarantined files and their ``.reason.txt`` notes."""
        return self.root / QUARANTINE_DIR

    def free_bytes(self) -> int:
        """Bytes available to us on the spool's file system (``statvfs`` ``f_bavail``)."""
        return int(shutil.disk_usage(self.root).free)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Return the spool path of one instance.

        Parameters
        ----------
        study_uid, series_uid, sop_uid
            Study, Series and SOP Instance UIDs (PS3.5 section 9.1 syntax).

        Returns
        -------
        Path
            ``root/<study>/<series>/<sop>.dcm`` (not created).

        Raises
        ------
        ValueError
            If any UID is malformed (the argument is named in the message).
        """
        for name, value in (
            ("study_uid", study_uid),
            ("series_uid", series_uid),
            ("sop_uid", sop_uid),
        ):
            if not is_valid_uid(value):
                raise ValueError(f"{name} is not a valid DICOM UID: {value!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def write(self, ds: Dataset, file_meta: FileMetaDataset, path: Path) -> int:
        """Encode ``ds`` with ``file_meta`` as a PS3.10 file at ``path``, atomically.

        The dataset is encoded in ``file_meta.TransferSyntaxUID`` (PS3.10 section 7.1);
        ``ds`` itself is not modified.

        Parameters
        ----------
        ds
            The dataset (pixel data already in the file meta's transfer syntax).
        file_meta
            File meta information (group 0002).
        path
            Destination, normally from :meth:`path_for`.

        Returns
        -------
        int
            Bytes written.

        Raises
        ------
        SpoolError
            On any encoding or I/O error; the temporary file is removed.
        """
        to_write = copy.copy(ds)
        to_write.file_meta = file_meta

        def _encode(fh: BinaryIO) -> None:
            dcmwrite(fh, to_write, enforce_file_format=True)

        return self._atomic_write(path, _encode)

    def write_encoded(
        self, file_meta: FileMetaDataset, encoded_dataset: bytes | memoryview, path: Path
    ) -> int:
        """Write an already-encoded dataset (as received on the wire) as a PS3.10 file.

        This is the listener's fast path: the bytes of the C-STORE Data Set are stored as
        received (same transfer syntax, including deflated streams), preceded by the
        preamble, ``DICM`` prefix and the encoded file meta information (PS3.10 section 7.1).

        Parameters
        ----------
        file_meta
            File meta information; its Transfer Syntax UID must be the one the bytes use.
        encoded_dataset
            The encoded dataset without file meta.
        path
            Destination, normally from :meth:`path_for`.

        Returns
        -------
        int
            Bytes written.

        Raises
        ------
        SpoolError
            On any encoding or I/O error; the temporary file is removed.
        """

        def _encode(fh: BinaryIO) -> None:
            fh.write(_PREAMBLE)
            write_file_meta_info(DicomFileLike(fh), file_meta, enforce_standard=True)
            fh.write(encoded_dataset)

        return self._atomic_write(path, _encode)

    def place_encoded(
        self, file_meta: FileMetaDataset, encoded_dataset: bytes | memoryview, path: Path
    ) -> Placed:
        """Like :meth:`write_encoded`, but never replace an existing file at ``path``.

        Returns
        -------
        Placed
            ``path`` itself when the name was free (created) or held identical bytes (nothing
            written); a new file in ``duplicates/`` when it held other bytes (kept aside).

        Raises
        ------
        SpoolError
            On any encoding or I/O error; nothing is left behind.
        """

        def _encode(fh: BinaryIO) -> None:
            fh.write(_PREAMBLE)
            write_file_meta_info(DicomFileLike(fh), file_meta, enforce_standard=True)
            fh.write(encoded_dataset)

        return self._place(path, _encode)

    def place(self, ds: Dataset, file_meta: FileMetaDataset, path: Path) -> Placed:
        """Like :meth:`write`, but never replace an existing file (see :meth:`place_encoded`)."""
        to_write = copy.copy(ds)
        to_write.file_meta = file_meta

        def _encode(fh: BinaryIO) -> None:
            dcmwrite(fh, to_write, enforce_file_format=True)

        return self._place(path, _encode)

    def _place(self, path: Path, encode: Callable[[BinaryIO], None]) -> Placed:
        target = self._check_inside_root(path)
        tmp = _temp_name(target)
        try:
            size = self._write_durable(tmp, encode)
            return self._link_into_place(tmp, target, size)
        except Exception as exc:
            raise SpoolError(
                f"cannot place {target}: {exc}", path=target, out_of_space=_is_out_of_space(exc)
            ) from exc
        finally:
            _unlink_quietly(tmp)

    def open_incoming(self, file_meta: FileMetaDataset) -> IncomingFile:
        """Start a PS3.10 file whose data set bytes will be appended as they arrive.

        The file is a temporary one in the root (removed by :meth:`sweep_temp_files` if a
        crash leaves it); :meth:`place_incoming` gives it its final name.

        Raises
        ------
        OSError
            When the file cannot be created (nothing is left behind).
        """
        header = DicomBytesIO()
        header.write(_PREAMBLE)
        write_file_meta_info(header, file_meta, enforce_standard=True)
        tmp = self.root / f"{INCOMING_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}"
        return IncomingFile(tmp, header.getvalue())

    def place_incoming(self, incoming: IncomingFile, path: Path) -> Placed:
        """Make ``incoming`` durable and place it at ``path`` (never replacing a file there).

        The same guarantees as :meth:`place_encoded`; the temporary name is removed.

        Raises
        ------
        SpoolError
            On a write error met while receiving, or any I/O error now.
        """
        target = self._check_inside_root(path)
        try:
            incoming.sync()
            self._make_dirs(target.parent)
            return self._link_into_place(incoming.path, target, incoming.size)
        except OSError as exc:
            raise SpoolError(
                f"cannot place {target}: {exc}", path=target, out_of_space=_is_out_of_space(exc)
            ) from exc
        finally:
            _unlink_quietly(incoming.path)

    def _link_into_place(self, tmp: Path, target: Path, size: int) -> Placed:
        """Link the durable ``tmp`` at ``target`` (one directory fsync), or settle a collision."""
        try:
            os.link(tmp, target)  # fails atomically when the name exists
        except FileExistsError:
            return self._settle_collision(tmp, target, size)
        _fsync_dir(target.parent)
        return Placed(path=target, size=size, created=True, kept_aside=False)

    def _settle_collision(self, tmp: Path, target: Path, size: int) -> Placed:
        if filecmp.cmp(tmp, target, shallow=False):
            return Placed(path=target, size=size, created=False, kept_aside=False)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        aside = self.duplicates_dir / f"{stamp}_{uuid.uuid4().hex[:8]}_{target.name}"
        self._make_dirs(self.duplicates_dir)
        os.link(tmp, aside)
        _fsync_dir(self.duplicates_dir)
        logger.warning(
            "a known instance arrived with other bytes; kept aside",
            extra={"kept_aside": str(aside)},
        )
        return Placed(path=aside, size=size, created=True, kept_aside=True)

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move ``path`` into ``root/quarantine/`` and record ``reason`` next to it.

        The new name is ``<UTC timestamp>_<random>_<original name>`` so repeated quarantines
        of the same name never collide; the reason goes to ``<new name>.reason.txt``.

        Parameters
        ----------
        path
            File to move (inside or outside the spool).
        reason
            Why the file is quarantined (no patient identifiers, please).

        Returns
        -------
        Path
            The quarantined file's new path.

        Raises
        ------
        SpoolError
            If the file cannot be moved or the reason cannot be written.
        """
        source = Path(path)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        target = self.quarantine_dir / f"{stamp}_{uuid.uuid4().hex[:8]}_{source.name}"
        try:
            self._make_dirs(self.quarantine_dir)
            shutil.move(os.fspath(source), os.fspath(target))
            _fsync_dir(self.quarantine_dir)
        except OSError as exc:
            raise SpoolError(
                f"cannot quarantine {source}: {exc}",
                path=target,
                out_of_space=_is_out_of_space(exc),
            ) from exc
        note = self.quarantine_dir / f"{target.name}.reason.txt"
        text = f"{reason}\noriginal: {source}\nquarantined_at: {stamp}Z\n".encode()

        def _note(fh: BinaryIO) -> None:
            fh.write(text)

        self._atomic_write(note, _note)
        logger.warning("file quarantined", extra={"quarantine_path": str(target), "reason": reason})
        return target

    def sweep_temp_files(self, min_age_s: float = 3600.0) -> int:
        """Delete temporary files left by a crash during a write.

        Parameters
        ----------
        min_age_s
            Only files older than this (by mtime) are deleted, so in-flight writes survive.

        Returns
        -------
        int
            Number of files removed.
        """
        cutoff = time.time() - min_age_s
        removed = 0
        for candidate in self._iter_temp_files():
            try:
                if candidate.stat().st_mtime < cutoff:
                    candidate.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            logger.info("stale spool temp files removed", extra={"count": removed})
        return removed

    # -- internals -----------------------------------------------------------------------

    def _iter_temp_files(self) -> Iterable[Path]:
        return self.root.rglob(f".*{TEMP_SUFFIX}")

    def _check_inside_root(self, path: Path) -> Path:
        resolved = Path(path).resolve()
        if resolved.parent != self.root and self.root not in resolved.parents:
            raise ValueError(f"path is outside the spool root {self.root}: {path}")
        return resolved

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` (and parents up to root), fsync-ing each new entry's parent."""
        missing: list[Path] = []
        current = directory
        while not current.exists():
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
        for new_dir in reversed(missing):
            try:
                new_dir.mkdir()
            except FileExistsError:
                continue
            _fsync_dir(new_dir.parent)

    def _write_durable(self, tmp: Path, encode: Callable[[BinaryIO], None]) -> int:
        """Create ``tmp`` (exclusively), write it with ``encode``, fsync it; return its size."""
        self._make_dirs(tmp.parent)
        with open(tmp, "xb") as fh:
            encode(fh)
            fh.flush()
            os.fsync(fh.fileno())
            return fh.tell()

    def _atomic_write(self, path: Path, encode: Callable[[BinaryIO], None]) -> int:
        target = self._check_inside_root(path)
        tmp = _temp_name(target)
        try:
            size = self._write_durable(tmp, encode)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except Exception as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                logger.exception("cannot remove spool temp file", extra={"path": str(tmp)})
            out_of_space = _is_out_of_space(exc)
            raise SpoolError(
                f"cannot write {target}: {exc}", path=target, out_of_space=out_of_space
            ) from exc
        return size


def _temp_name(target: Path) -> Path:
    """Return a hidden, unique temporary name beside ``target`` (swept by ``TEMP_SUFFIX``)."""
    return target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
