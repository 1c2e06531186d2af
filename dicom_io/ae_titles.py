"""AE title validation (PS3.5 section 6.2, VR AE)."""

from __future__ import annotations

AE_TITLE_MAX_CHARS = 16
"""Maximum length of an AE title (PS3.5 table 6.2-1, VR AE)."""


def validate_ae_title(value: str, name: str = "ae_title") -> str:
    r"""Validate an AE title (PS3.5 table 6.2-1, VR AE) and return it stripped.

    Parameters
    ----------
    value
        Candidate AE title.
    name
        Argument name used in the error message.

    Returns
    -------
    str
        The title without leading/trailing spaces.

    Raises
    ------
    ValueError
        If empty, longer than 16 characters, or containing ``\\`` or control characters.
    """
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > AE_TITLE_MAX_CHARS:
        raise ValueError(f"{name} must be 1-{AE_TITLE_MAX_CHARS} characters, got {value!r}")
    if "\\" in text or any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in text):
        raise ValueError(f"{name} contains characters not allowed in an AE title: {value!r}")
    return text
