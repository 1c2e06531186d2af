"""Defensive copies of source headers: what radflag copies into its SR and SC must be valid.

Real archives send present-but-empty Type 2 attributes, absent Type 3 attributes, anonymiser
hashes in dates, lower-case code strings, over-long names and odd character sets. The SR
(:mod:`dicom_io.sr`) and the heatmap SC (:mod:`dicom_io.sc`) copy the Patient, General Study
and Patient Study modules of a source image (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2), so every value
they copy is checked against its value representation (PS3.5 6.2) first:

- Type 2 attributes of the Patient and General Study modules that are absent are added
  empty (PS3.3 C.7.1.1, C.7.2.1);
- DA, TM, DT, AS, CS, AE, UI, DS and IS values that break their VR are repaired when the
  intent is unambiguous (``2020.01.31`` -> ``20200131``, ``10:20:30`` -> ``102030``,
  ``f`` -> ``F``) and otherwise emptied (a zero-length value is valid for Type 2 and 3
  attributes, PS3.5 7.4.5); code strings with enumerated values (Patient's Sex, Laterality,
  Patient Orientation...) keep only defined values (``MALE`` -> ``M``);
- strings longer than their VR allows are truncated to the VR maximum (PS3.5 Table 6.2-1),
  person names per component group (64 characters), with at most 3 groups of 5 components;
- control characters are removed where the VR forbids them (all but ST, LT, UT);
- text in any source character set is decoded by pydicom (ISO_IR 100, ISO_IR 192,
  ISO 2022 IR 87/IR 13 ...) and the copy is re-declared as ISO_IR 192 (UTF-8) when it holds
  non-ASCII text, so names in Latin-1 or Japanese survive unchanged (PS3.5 6.1.2.3);
- private elements, Pixel Data and values pydicom cannot decode at all are left out.

The Study, Series and SOP Instance UIDs are never altered: a source without valid ones is
rejected earlier by :func:`dicom_io.reader.read_header`.
Every change is returned as a :class:`HeaderRepair`, so the pipeline can audit it.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import format_number_as_ds

from dicom_io.uids import is_valid_uid

MAX_CHARS: dict[str, int] = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DA": 8,
    "DS": 16,
    "DT": 26,
    "IS": 12,
    "LO": 64,
    "LT": 10240,
    "SH": 16,
    "ST": 1024,
    "TM": 14,
    "UI": 64,
    "UC": 2**32 - 2,
    "UT": 2**32 - 2,
}
"""Maximum value length in characters per VR (PS3.5 Table 6.2-1)."""

PN_GROUP_MAX_CHARS = 64
"""Maximum length of one person-name component group (PS3.5 6.2, PN)."""

TEXT_VRS = frozenset({"ST", "LT", "UT"})
"""VRs whose values may contain CR, LF, FF and TAB (PS3.5 6.1.3)."""

STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UT"}
)

TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
"""Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
the SR and SC must carry: added empty when a source lacks them."""

KEPT_UIDS = frozenset({"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"})
"""UIDs that identify the source; never changed here."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")
_DT = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_AS = re.compile(r"^\d{3}[DWMY]$")
_CS = re.compile(r"^[A-Z0-9 _]*$")
_IS = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class HeaderRepair:
    """One change made to a copied attribute.

    Attributes
    ----------
    keyword
        Attribute keyword (or tag) with its VR, e.g. ``PatientBirthDate (DA)``.
    action
        ``emptied``, ``repaired``, ``truncated`` or ``removed``.
    reason
        Why, without the value itself (values may identify the patient).
    """

    keyword: str
    action: str
    reason: str

    def __str__(self) -> str:
        return f"{self.keyword}: {self.action} ({self.reason})"


@dataclass(frozen=True)
class RepairedSource:
    """A source header safe to copy, and what was changed to make it so."""

    dataset: Dataset
    repairs: tuple[HeaderRepair, ...]


def _valid_date(text: str) -> bool:
    try:
        datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return False
    return True


def _valid_time(text: str) -> bool:
    match = _TM.match(text)
    if match is None:
        return False
    hh, mm, ss = (int(g) if g else 0 for g in match.groups()[:3])
    return hh < 24 and mm < 60 and ss < 61


def _fix_da(text: str) -> str | None:
    candidate = re.sub(r"^(\d{4})[.\-/](\d{2})[.\-/](\d{2})$", r"\1\2\3", text.strip())
    return candidate if _DA.match(candidate) and _valid_date(candidate) else None


def _fix_tm(text: str) -> str | None:
    candidate = text.strip()
    if re.match(r"^\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?$", candidate):
        candidate = candidate.replace(":", "")
    return candidate if _valid_time(candidate) else None


def _fix_dt(text: str) -> str | None:
    candidate = text.strip()
    if not _DT.match(candidate) or len(candidate) > MAX_CHARS["DT"]:
        return None
    if len(candidate) >= 8 and not _valid_date(candidate[:8]):
        return None
    return candidate


def _fix_as(text: str) -> str | None:
    candidate = text.strip().upper()
    return candidate if _AS.match(candidate) else None


def _fix_cs(text: str) -> str | None:
    candidate = text.strip().upper()
    if _CS.match(candidate) and len(candidate) <= MAX_CHARS["CS"]:
        return candidate
    return None


def _fix_ds(text: str) -> str | None:
    try:
        number = float(text)
    except ValueError:
        return None
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return text.strip() if len(text.strip()) <= 16 else format_number_as_ds(number)


def _fix_is(text: str) -> str | None:
    candidate = text.strip()
    if _IS.match(candidate) and -(2**31) <= int(candidate) < 2**31:
        return candidate
    return None


_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(text: str) -> bool:
    """Return True for a UID of PS3.5 9.1: digits and dots, no leading zeros, <= 64 chars."""
    return len(text) <= 64 and _UID.match(text) is not None and is_valid_uid(text)


def _fix_ui(text: str) -> str | None:
    candidate = text.strip().rstrip("\x00")
    return candidate if valid_uid(candidate) else None


_DIRECTION = re.compile(r"^[APRLHF]{1,3}$")
"""Patient Orientation values: anatomical direction letters (PS3.3 C.7.6.1.1.1)."""

_SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}

ENUMERATED: dict[str, Callable[[str], str | None]] = {
    "PatientSex": lambda v: _SEX.get(v),
    "Laterality": lambda v: v if v in ("R", "L") else None,
    "ImageLaterality": lambda v: v if v in ("R", "L", "U", "B") else None,
    "BurnedInAnnotation": lambda v: v if v in ("YES", "NO") else None,
    "RecognizableVisualFeatures": lambda v: v if v in ("YES", "NO") else None,
    "PatientOrientation": lambda v: v if _DIRECTION.match(v) else None,
}
"""Code strings with enumerated values (PS3.3) copied into results: others are emptied."""

_FIXERS: dict[str, Callable[[str], str | None]] = {
    "DA": _fix_da,
    "TM": _fix_tm,
    "DT": _fix_dt,
    "AS": _fix_as,
    "CS": _fix_cs,
    "DS": _fix_ds,
    "IS": _fix_is,
    "UI": _fix_ui,
}


def _clip(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, and to ``limit`` bytes once encoded as UTF-8.

    Validators (dciodvfy) count the bytes of a multi-byte value against the VR maximum, so
    non-ASCII text is cut on a character boundary until its UTF-8 form fits.
    """
    text = text[:limit]
    if text.isascii():
        return text
    encoded = text.encode("utf-8")[:limit]
    return encoded.decode("utf-8", errors="ignore")


def _fix_pn(text: str) -> str:
    groups = text.split("=")[:3]
    fixed = []
    for group in groups:
        components = group.split("^")[:5]
        fixed.append(_clip("^".join(c.strip() for c in components), PN_GROUP_MAX_CHARS))
    return "=".join(fixed).rstrip("=")


def _fix_text(vr: str, text: str) -> str:
    if vr not in TEXT_VRS:
        text = _CONTROL.sub("", text)
    limit = MAX_CHARS.get(vr)
    return text if limit is None else _clip(text, limit)


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _raw_text(value: Any, vr: str) -> str:
    """Return the value as written (DS/IS keep their original string when pydicom has it)."""
    original = getattr(value, "original_string", None)
    if vr in ("DS", "IS") and isinstance(original, str):
        return original
    return str(value)


class _Repairer:
    """Walks a data set (and its sequence items) and repairs every string value in place."""

    def __init__(self) -> None:
        self.repairs: list[HeaderRepair] = []

    def note(self, elem: DataElement | str, action: str, reason: str) -> None:
        name = f"{elem.keyword or elem.tag} ({elem.VR})" if isinstance(elem, DataElement) else elem
        self.repairs.append(HeaderRepair(name, action, reason))

    def dataset(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            if tag.is_private or tag == 0x7FE00010:
                del ds[tag]
                continue
            try:
                elem = ds[tag]
            except Exception as exc:  # noqa: BLE001 - pydicom cannot decode the raw value
                del ds[tag]
                self.note(str(tag), "removed", f"undecodable value: {type(exc).__name__}")
                continue
            if elem.VR == "SQ":
                for item in elem.value or []:
                    self.dataset(item)
            elif elem.VR in STRING_VRS and elem.keyword not in KEPT_UIDS:
                self.element(elem)

    def element(self, elem: DataElement) -> None:
        vr = str(elem.VR)
        values = _values(elem.value)
        if not values:
            return
        fixed: list[str] = []
        for value in values:
            text = _raw_text(value, vr)
            new = self._fix(vr, text)
            check = ENUMERATED.get(elem.keyword)
            if new is not None and check is not None:
                new = check(new)
            if new is None:
                self.note(elem, "emptied" if len(values) == 1 else "removed", f"invalid {vr}")
                continue
            if new != text:
                shortened = text.startswith(new) and len(new) < len(text)
                action = "truncated" if shortened else "repaired"
                self.note(elem, action, f"not a valid {vr} as sent")
            fixed.append(new)
        if fixed == [_raw_text(v, vr) for v in values]:
            return
        if not fixed:
            elem.value = None
        else:
            elem.value = fixed if len(fixed) > 1 else fixed[0]

    @staticmethod
    def _fix(vr: str, text: str) -> str | None:
        if vr == "PN":
            return _fix_pn(_CONTROL.sub("", text))
        fixer = _FIXERS.get(vr)
        if fixer is not None:
            return fixer(text)
        return _fix_text(vr, text)


def _needs_unicode(ds: Dataset) -> bool:
    for elem in ds.iterall():
        if elem.VR in STRING_VRS and any(not str(v).isascii() for v in _values(elem.value)):
            return True
    return False


def repair_source(ds: Dataset) -> RepairedSource:
    """Return a repaired deep copy of ``ds`` (without Pixel Data and private elements).

    Parameters
    ----------
    ds
        A source image header as read (:func:`dicom_io.reader.read_dataset`).

    Returns
    -------
    RepairedSource
        The copy, safe for highdicom to copy modules from and for pydicom to write, and the
        list of changes (attribute and reason, never the value).
    """
    source = copy.deepcopy(ds)
    if "PixelData" in source:
        del source.PixelData
    repairer = _Repairer()
    repairer.dataset(source)
    for keyword in TYPE2_COPIED:
        if keyword not in source:
            setattr(source, keyword, None)  # Type 2: present, zero length when unknown
    charset = source.get("SpecificCharacterSet")
    if _needs_unicode(source):
        if charset != "ISO_IR 192":
            repairer.note("SpecificCharacterSet (CS)", "repaired", "re-encoded as UTF-8")
        source.SpecificCharacterSet = "ISO_IR 192"
    elif "SpecificCharacterSet" in source:
        del source.SpecificCharacterSet  # plain ASCII: the default repertoire
    return RepairedSource(source, tuple(repairer.repairs))


def repair_sources(datasets: Iterable[Dataset]) -> tuple[list[Dataset], dict[str, list[str]]]:
    """Repair several sources; return the copies and the repairs by SOP Instance UID."""
    copies: list[Dataset] = []
    repairs: dict[str, list[str]] = {}
    for ds in datasets:
        repaired = repair_source(ds)
        copies.append(repaired.dataset)
        if repaired.repairs:
            repairs[str(ds.get("SOPInstanceUID", ""))] = [str(r) for r in repaired.repairs]
    return copies, repairs


__all__ = ["HeaderRepair", "RepairedSource", "repair_source", "repair_sources", "valid_uid"]
