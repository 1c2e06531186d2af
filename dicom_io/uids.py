"""UID syntax checks (DICOM PS3.5 section 9.1).

A UID is a string of numeric components separated by ``.``, at most 64 characters. The
checks here also make UIDs safe to use as file names: only digits and dots can pass.
"""

from __future__ import annotations

import re

UID_MAX_CHARS = 64
"""Maximum length of a UID (PS3.5 section 9.1)."""

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: object) -> bool:
    """Return True when ``value`` is a syntactically valid UID (PS3.5 section 9.1).

    Leading zeros inside a component are tolerated (some modalities emit them); they cannot
    make a path unsafe.

    Parameters
    ----------
    value
        Candidate UID, usually a ``str`` or :class:`pydicom.uid.UID`.

    Returns
    -------
    bool
        True for digits-and-dots strings of 1..64 characters without empty components.
    """
    if not isinstance(value, str):
        return False
    return 0 < len(value) <= UID_MAX_CHARS and _UID_RE.fullmatch(value) is not None


def clean_uid(value: object) -> str | None:
    """Return ``value`` stripped of padding (trailing NUL/space), or None when not a valid UID.

    Parameters
    ----------
    value
        Raw element value.

    Returns
    -------
    str or None
        The cleaned UID, or None when absent or malformed.
    """
    if value is None:
        return None
    text = str(value).strip("\x00 ")
    return text if is_valid_uid(text) else None
