"""Result objects of one model on one study, written once per encoding a destination needs."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_io.sc import encode_in
from dicom_io.spool import Spool
from dicom_io.sr import as_comprehensive_sr


class Payloads:
    """Result objects of one model on one study, written once per encoding a destination needs.

    The canonical file (Explicit VR Little Endian; the SR as Comprehensive 3D SR) lies at
    ``results/<study>/<series>/<sop>.dcm``; other encodings next to it with a suffix.
    """

    def __init__(self, results: Spool, study_uid: str) -> None:
        self._results = results
        self._study_uid = study_uid
        self._objects: dict[str, Dataset] = {}
        self._written: dict[tuple[str, bool, str], tuple[str, Path]] = {}

    def add(self, kind: str, ds: Dataset) -> None:
        """Add a result object (``SR`` or ``SC``) and write its canonical encoding."""
        self._objects[kind] = ds
        self.variant(kind, ExplicitVRLittleEndian)

    def variant(
        self, kind: str, syntax: str, *, comprehensive_sr: bool = False
    ) -> tuple[str, Path] | None:
        """Return ``(sop_instance_uid, path)`` of an encoding, writing it on first use.

        ``comprehensive_sr`` asks for the SR as Comprehensive SR instead of Comprehensive 3D SR.
        """
        base = self._objects.get(kind)
        if base is None:
            return None
        if kind == "SR" and syntax != ImplicitVRLittleEndian:
            syntax = ExplicitVRLittleEndian  # an SR has no pixels to compress
        comprehensive_sr = comprehensive_sr and kind == "SR"
        cache_key = (kind, comprehensive_sr, syntax)
        if cache_key in self._written:
            return self._written[cache_key]
        ds = as_comprehensive_sr(base) if comprehensive_sr else base
        encoded = ds if syntax == ExplicitVRLittleEndian else encode_in(ds, syntax)
        series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        path = self._results.path_for(self._study_uid, series_uid, sop_uid)
        if syntax != ExplicitVRLittleEndian:
            path = path.with_name(f"{sop_uid}.{UID(syntax).keyword or syntax}.dcm")
        self._results.write(encoded, encoded.file_meta, path)
        self._written[cache_key] = (sop_uid, path)
        return self._written[cache_key]
