"""Everything learned in radflag: preprocessing, bundles, inference, training and evaluation.

This package never imports pydicom or SQLAlchemy; it takes numpy arrays plus typed
metadata (:class:`model.pixels.PixelMeta`) and returns typed results.
"""

from __future__ import annotations

__all__: list[str] = []
