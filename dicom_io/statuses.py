"""Named DIMSE status codes used by radflag (PS3.7 Annex C, PS3.4 Annex B.2.3).

Handlers return these constants, never bare numbers, and never raise into pynetdicom.
"""

from __future__ import annotations

SUCCESS = 0x0000
"""Success (PS3.7 C.1.1)."""

OUT_OF_RESOURCES = 0xA700
"""Refused: out of resources (PS3.4 B.2.3). The sender should retry later."""

DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
"""Error: data set does not match SOP class (PS3.4 B.2.3)."""

CANNOT_UNDERSTAND = 0xC210
"""Error: cannot understand (PS3.4 B.2.3, range C000-CFFF): the data set could not be decoded."""

PROCESSING_FAILURE = 0x0110
"""Failure: processing failure (PS3.7 C.4.2), used for unexpected internal errors."""

WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
"""Warning statuses of C-STORE (PS3.4 B.2.3, PS3.7 C.3): the instance was stored."""


def is_success_or_warning(status: int) -> bool:
    """Return True when a C-STORE response status means the instance was stored.

    Parameters
    ----------
    status
        The (0000,0900) Status value.

    Returns
    -------
    bool
        True for success (0x0000) and warnings (0x0001, 0xB000, 0xB006, 0xB007).
    """
    return status == SUCCESS or status in WARNING_STATUSES


def is_retryable_failure(status: int) -> bool:
    """Return True when a failed C-STORE may succeed if simply retried later.

    Refusals for lack of resources (``0xA7xx``, PS3.4 B.2.3; ``0x0213`` resource limitation,
    PS3.7 C.5) and unspecified processing failures (``0x0110``) are transient; data set
    errors (``0xA9xx``, ``0xCxxx``) and SOP class refusals (``0x0122``) are permanent.

    Parameters
    ----------
    status
        The (0000,0900) Status value of a failure response.

    Returns
    -------
    bool
        True when the failure is transient.
    """
    return (status & 0xFF00) == 0xA700 or status in (0x0213, PROCESSING_FAILURE)
