"""SOP classes and transfer syntaxes radflag accepts as a Storage SCP (PS3.4 Annex B).

Transfer syntaxes are listed lossless-compressed first so that senders proposing several
transfer syntaxes in one presentation context keep their compression (PS3.5 Annex A; as the
acceptor pynetdicom picks the first of *our* syntaxes that the requestor also proposed).
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io.select import SECONDARY_CAPTURE_SOP_CLASSES

RESULT_SOP_CLASSES: tuple[UID, ...] = (
    UID("1.2.840.10008.5.1.4.1.1.88.11"),  # Basic Text SR
    UID("1.2.840.10008.5.1.4.1.1.88.22"),  # Enhanced SR
    UID("1.2.840.10008.5.1.4.1.1.88.33"),  # Comprehensive SR
    UID("1.2.840.10008.5.1.4.1.1.88.34"),  # Comprehensive 3D SR
    UID("1.2.840.10008.5.1.4.1.1.88.59"),  # Key Object Selection Document
    UID("1.2.840.10008.5.1.4.1.1.11.1"),  # Grayscale Softcopy Presentation State
    UID("1.2.840.10008.5.1.4.1.1.66.4"),  # Segmentation
)
"""Result objects a PACS routes along with a study (radflag's own SR, other vendors' AI
results): accepted and stored so a routed study never fails at the sender, never analysed
(the loop guard of :mod:`dicom_io.select`), and they never reopen a finished study."""

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    *(UID(u) for u in sorted(SECONDARY_CAPTURE_SOP_CLASSES - {SecondaryCaptureImageStorage})),
    CTImageStorage,
    *RESULT_SOP_CLASSES,
)
"""Storage SOP classes accepted by the listener (PS3.4 B.5): images radflag may analyse
(CR, DX, Secondary Capture single and multi-frame, CT) and :data:`RESULT_SOP_CLASSES`."""

VERIFICATION_SOP_CLASS: UID = Verification
"""Verification SOP class for C-ECHO (PS3.4 Annex A)."""

LOSSLESS_COMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    DeflatedExplicitVRLittleEndian,
)
"""Lossless compressed transfer syntaxes (PS3.5 Annex A.4, A.5, A.6)."""

UNCOMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
"""Native transfer syntaxes (PS3.5 Annex A.1-A.3)."""

LOSSY_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEG2000,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)
"""Lossy (or possibly lossy) compressed transfer syntaxes (PS3.5 Annex A.4)."""

STORAGE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    LOSSLESS_COMPRESSED_TRANSFER_SYNTAXES + LOSSY_TRANSFER_SYNTAXES + UNCOMPRESSED_TRANSFER_SYNTAXES
)
"""Everything the listener accepts for storage, in preference order.

Compressed syntaxes come first (lossless before lossy), native ones last: when a sender offers
its compressed syntax together with native ones in one presentation context, it keeps its
compression -- and is never asked to decompress data it may be unable to decode (DCMTK, for
example, cannot decompress JPEG Extended on the fly and the transfer would fail).
"""
