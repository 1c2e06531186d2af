"""A corpus of broken C-STORE data sets derived from real DICOM files and radiographs.

Each :class:`Mutant` is one real CR, DX or SC data set (a real file from the shared data,
or a real radiograph turned into DICOM) with a fresh SOP Instance UID, mutated in one of
the ways hospital networks break data sets: flipped bytes, truncation, wrong element
lengths and VRs, missing pixel data, Rows/Columns that do not match the pixels, data
encoded in another transfer syntax than the negotiated one, deep sequences, wrong UIDs and
SOP classes, odd calling AE titles. The bytes are sent as they are (pynetdicom's
``STORE_SEND_CHUNKED_DATASET``), so the listener parses exactly what a broken sender sent.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from tests.peers.dicomgen import make_dx_from_image

Rng = np.random.Generator
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
ODD_AE_TITLES = ("  LEADING", "lower case", "A", "X" * 16, "!#$%&()*+,-./", "MOD ALITY", "*")
"""Calling AE titles that are valid per PS3.5 (no backslash or control characters) but odd."""


@dataclass(frozen=True)
class Mutant:
    """One C-STORE to send: context, command UID, data set bytes and the calling AE."""

    kind: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str
    body: bytes
    calling_ae: str = "FUZZER"

    def write(self, path: Path) -> Path:
        """A PS3.10 file whose meta names the context and whose data set is :attr:`body`."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(self.sop_class_uid)
        meta.MediaStorageSOPInstanceUID = UID(self.sop_instance_uid)
        meta.TransferSyntaxUID = UID(self.transfer_syntax_uid)
        with path.open("wb") as fh:
            fh.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(fh, meta, enforce_standard=True)  # type: ignore[arg-type]
            fh.write(self.body)
        return path


def base_datasets(shared: Path, kermany: list[Path], work: Path) -> list[Dataset]:
    """Real CR, DX and SC data sets: shared-data files and radiographs turned into DICOM."""
    files = [
        shared / "dicom" / "chest-real" / "files" / "highdicom_dx_image.dcm",
        shared / "dicom" / "transfer-syntax-zoo" / "files" / "CR_hip_RG2_jpeg_extended.dcm",
        shared / "dicom" / "transfer-syntax-zoo" / "files" / "SC_rgb_jpeg_baseline.dcm",
    ]
    bases: list[Dataset] = [pydicom.dcmread(f) for f in files]
    kinds = [
        (DigitalXRayImageStorageForPresentation, "DX"),
        (ComputedRadiographyImageStorage, "CR"),
        (SecondaryCaptureImageStorage, "DX"),  # a DX header re-labelled as SC, as gateways do
    ]
    for i, (image, (sop_class, modality)) in enumerate(zip(kermany, kinds, strict=False)):
        built_as = sop_class if sop_class != SecondaryCaptureImageStorage else None
        ds = make_dx_from_image(
            image,
            work / f"base{i}.dcm",
            sop_class=built_as or DigitalXRayImageStorageForPresentation,
            modality=modality,
        )
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        _crop(ds, 96)  # real pixels, kept small: a thousand of them go through the daemon
        bases.append(ds)
    return bases


def _crop(ds: Dataset, size: int) -> None:
    pixels = ds.pixel_array[:size, :size].copy()
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()


def _encode(ds: Dataset) -> bytes:
    """The data set bytes (no preamble or meta) in ``ds.file_meta.TransferSyntaxUID``."""
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    (group_length,) = struct.unpack("<L", data[140:144])  # (0002,0000) UL, PS3.10 7.1
    return data[144 + group_length :]


def _fresh(base: Dataset, study_uid: str) -> Dataset:
    ds = copy.deepcopy(base)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    return ds


def _mutant(kind: str, ds: Dataset, body: bytes | None = None, **kw: str) -> Mutant:
    values = {
        "sop_class_uid": str(ds.file_meta.MediaStorageSOPClassUID),
        "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
        "sop_instance_uid": str(ds.file_meta.MediaStorageSOPInstanceUID),
        **kw,
    }
    return Mutant(kind=kind, body=_encode(ds) if body is None else body, **values)


def _elements(body: bytes, explicit: bool) -> list[tuple[int, int, int]]:
    """Top-level elements as ``(offset, length field offset, length width)`` (PS3.5 7.1)."""
    found, pos = [], 0
    while pos + 8 <= len(body):
        if explicit:
            vr = body[pos + 4 : pos + 6]
            if vr in LONG_VRS:
                at, width, header = pos + 8, 4, 12
            else:
                at, width, header = pos + 6, 2, 8
        else:
            at, width, header = pos + 4, 4, 8
        (length,) = struct.unpack("<L" if width == 4 else "<H", body[at : at + width])
        found.append((pos, at, width))
        if length == 0xFFFFFFFF:
            break  # undefined length: stop here
        pos += header + length
    return found


def flipped_bytes(ds: Dataset, rng: Rng) -> Mutant:
    body = bytearray(_encode(ds))
    for at in rng.integers(0, len(body), size=int(rng.integers(1, 24))):
        body[at] ^= int(rng.integers(1, 256))
    return _mutant("flipped_bytes", ds, bytes(body))


def truncated(ds: Dataset, rng: Rng) -> Mutant:
    body = _encode(ds)
    return _mutant("truncated", ds, body[: int(rng.integers(0, len(body)))])


def wrong_length(ds: Dataset, rng: Rng) -> Mutant:
    body = bytearray(_encode(ds))
    explicit = ds.file_meta.TransferSyntaxUID != ImplicitVRLittleEndian
    _, at, width = _pick(_elements(bytes(body), explicit), rng)
    limit = 0xFFFF if width == 2 else 0xFFFFFFFE
    value = int(rng.choice([0, 1, 3, limit, int(rng.integers(0, limit))]))
    body[at : at + width] = value.to_bytes(width, "little")
    return _mutant("wrong_length", ds, bytes(body))


def wrong_vr(ds: Dataset, rng: Rng) -> Mutant:
    body = bytearray(_encode(ds))
    if ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian:
        return wrong_length(ds, rng)
    offset, _, _ = _pick(_elements(bytes(body), True), rng)
    vr = rng.choice([b"SQ", b"US", b"UL", b"OB", b"UN", b"PN", b"XX", b"\x00\x00"])
    body[offset + 4 : offset + 6] = bytes(vr)
    return _mutant("wrong_vr", ds, bytes(body))


def missing_pixel_data(ds: Dataset, rng: Rng) -> Mutant:
    del ds.PixelData
    return _mutant("missing_pixel_data", ds)


def rows_columns_mismatch(ds: Dataset, rng: Rng) -> Mutant:
    ds.Rows = int(ds.Rows) * int(rng.integers(2, 5)) + int(rng.integers(0, 3))
    ds.Columns = max(1, int(ds.Columns) - int(rng.integers(0, 7)))
    return _mutant("rows_columns_mismatch", ds)


def garbage_transfer_syntax(ds: Dataset, rng: Rng) -> Mutant:
    """Data set bytes that are not in the negotiated transfer syntax."""
    choice = int(rng.integers(0, 3))
    if choice == 0 and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # encoded implicit ...
        body = _encode(ds)
        return _mutant(
            "garbage_transfer_syntax", ds, body, transfer_syntax_uid=ExplicitVRLittleEndian
        )
    if choice == 1:  # random bytes
        body = rng.integers(0, 256, size=int(rng.integers(16, 4096)), dtype=np.uint8).tobytes()
        return _mutant("garbage_transfer_syntax", ds, body)
    body = _encode(ds)  # big-endian-looking: every 16-bit word swapped
    swapped = bytearray(body)
    swapped[0 : len(body) - 1 : 2], swapped[1 : len(body) : 2] = (
        body[1::2],
        body[0 : len(body) - 1 : 2],
    )
    return _mutant("garbage_transfer_syntax", ds, bytes(swapped))


def deep_sequence(ds: Dataset, rng: Rng) -> Mutant:
    depth = int(rng.integers(20, 120))
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([inner])
        inner = outer
    ds.ReferencedImageSequence = inner.ReferencedImageSequence
    return _mutant("deep_sequence", ds)


def wrong_identity(ds: Dataset, rng: Rng) -> Mutant:
    """UIDs that are missing, malformed or disagree with the command / context."""
    choice = int(rng.integers(0, 4))
    if choice == 0:
        ds.SOPInstanceUID = "1.2.3.abc"
    elif choice == 1:
        del ds.StudyInstanceUID
    elif choice == 2:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR, in a CR/DX/SC context
    else:
        ds.SeriesInstanceUID = "9" * 70  # longer than 64 characters
    return _mutant("wrong_identity", ds)


def odd_values(ds: Dataset, rng: Rng) -> Mutant:
    ds.PatientName = "^" * int(rng.integers(65, 400))
    ds.add_new(0x00091010, "LO", "\x00\x01\x02 private junk")
    ds.StudyDate = "2024-13-45"
    ds.BitsStored = int(rng.choice([0, 1, 33]))
    return _mutant("odd_values", ds)


def odd_ae_title(ds: Dataset, rng: Rng) -> Mutant:
    """An unmutated data set from a sender with an odd but valid calling AE title."""
    return _mutant("odd_ae_title", ds, calling_ae=str(rng.choice(ODD_AE_TITLES)))


MUTATIONS: tuple[Callable[[Dataset, Rng], Mutant], ...] = (
    flipped_bytes,
    truncated,
    wrong_length,
    wrong_vr,
    missing_pixel_data,
    rows_columns_mismatch,
    garbage_transfer_syntax,
    deep_sequence,
    wrong_identity,
    odd_values,
    odd_ae_title,
)


def corpus(bases: list[Dataset], n: int, seed: int = 11, per_study: int = 10) -> Iterator[Mutant]:
    """``n`` mutants, round-robin over mutations and bases, ``per_study`` per study UID."""
    rng = np.random.default_rng(seed)
    study_uid = generate_uid()
    for i in range(n):
        if i % per_study == 0:
            study_uid = generate_uid()
        base = bases[i % len(bases)]
        mutate = MUTATIONS[(i // len(bases)) % len(MUTATIONS)]
        yield mutate(_fresh(base, study_uid), rng)


def _pick(items: list[tuple[int, int, int]], rng: Rng) -> tuple[int, int, int]:
    return items[int(rng.integers(0, len(items)))]
