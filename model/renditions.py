"""Render training images as hospitals send them, and measure how much the answer moves.

The rendition contract (issue 10): a radiograph must get one answer whatever its
rendition. :func:`render` turns an 8-bit training image into the stored values and pixel
attributes of a DX object (PS3.3 A.26: Image Pixel, Modality LUT and VOI LUT modules);
a :data:`RenditionReader` turns that into what the serving path hands to the model
(``daemon.renditions`` writes a real DICOM file and reads it back through ``dicom_io``;
:func:`direct_reader` maps the attributes without DICOM, for unit tests of the model side).
:func:`rendition_table` reports, per rendition, the mean absolute change of probability and
the decision agreement against the training rendition. numpy/PIL only: never pydicom.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from model.bundle import Bundle
from model.data import LabeledImage
from model.infer import Classifier
from model.metrics import binary_metrics
from model.pixels import PixelMeta
from model.preprocess import load_image_file

logger = logging.getLogger(__name__)

MAX_MEAN_ABS_DELTA_P = 0.02
MIN_AGREEMENT = 0.99
TRAINING_RENDITION = "jpeg"

UInt16Array = npt.NDArray[np.uint16]


@dataclass(frozen=True)
class RenditionSpec:
    """How to render one image: encoding, intensity attributes and geometry.

    Attributes
    ----------
    name
        Row label of the rendition table.
    bits_stored
        Bits Stored (0028,0101) of the DX object: 12, 14 or 16.
    window
        ``none``, ``narrow`` (VOI window inside the data range: 10 % clipped at each
        end), ``wide`` (a window 1.6 x the data range), ``sigmoid`` (VOI LUT Function
        SIGMOID, PS3.3 C.11.2.1.3.1) or ``lut`` (a VOI LUT Sequence, PS3.3 C.11.2.1.1).
    monochrome1
        Store inverted values with Photometric Interpretation MONOCHROME1.
    rescale
        Store ``(value - intercept) / slope`` with Rescale Slope 0.5 and Intercept -1024.
    shape
        Restored (rows, columns), or ``None`` to keep the training image's size.
    padding_px
        Width of a Pixel Padding border (PS3.3 C.7.5.1.1.2) around the image, 0 for none.
    """

    name: str
    bits_stored: int = 12
    window: str = "none"
    monochrome1: bool = False
    rescale: bool = False
    shape: tuple[int, int] | None = None
    padding_px: int = 0


# The renditions of the contract. Shapes restore plausible aspect ratios (rows/columns
# 0.75-1.5) at sizes up to 3000 px; the training JPEGs were squashed to 224 x 224.
RENDITIONS: tuple[RenditionSpec, ...] = (
    RenditionSpec("dx12_window_narrow", 12, "narrow"),
    RenditionSpec("dx12_window_wide", 12, "wide"),
    RenditionSpec("dx14_rescale_window", 14, "narrow", rescale=True),
    RenditionSpec("dx16_voi_lut_sequence", 16, "lut"),
    RenditionSpec("dx12_sigmoid", 12, "sigmoid"),
    RenditionSpec("dx12_monochrome1", 12, "narrow", monochrome1=True),
    RenditionSpec("dx12_aspect_0.75_1500x2000", 12, "narrow", shape=(1500, 2000)),
    RenditionSpec("dx14_aspect_1.22_2500x2048", 14, "narrow", shape=(2500, 2048)),
    RenditionSpec("dx12_aspect_1.5_3000x2000", 12, "wide", shape=(3000, 2000)),
    RenditionSpec("dx12_pixel_padding", 12, "narrow", padding_px=24),
    RenditionSpec(
        "dx14_hospital_mix",
        14,
        "narrow",
        monochrome1=True,
        rescale=True,
        shape=(2048, 1680),
        padding_px=96,
    ),
)


@dataclass(frozen=True)
class Rendition:
    """Stored pixel values and the attributes a DX object would carry for them.

    Attributes
    ----------
    name
        The :class:`RenditionSpec` name.
    pixels
        (rows, columns) stored values, uint16.
    bits_stored
        Bits Stored (0028,0101).
    photometric
        ``MONOCHROME1`` or ``MONOCHROME2``.
    rescale_slope, rescale_intercept
        Modality LUT (PS3.3 C.11.1.1.2).
    window_center, window_width, voi_lut_function
        VOI window (PS3.3 C.11.2.1.2), or None.
    voi_lut_descriptor, voi_lut_data
        VOI LUT Sequence item (PS3.3 C.11.2.1.1): (entries, first mapped, bits) and data.
    pixel_padding_value
        Pixel Padding Value (0028,0120), or None.
    """

    name: str
    pixels: UInt16Array
    bits_stored: int
    photometric: str = "MONOCHROME2"
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    window_center: float | None = None
    window_width: float | None = None
    voi_lut_function: str = "LINEAR"
    voi_lut_descriptor: tuple[int, int, int] | None = None
    voi_lut_data: UInt16Array | None = None
    pixel_padding_value: int | None = None


def _resized(grey: npt.NDArray[np.float32], shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Return ``grey`` resized to (rows, columns) ``shape`` (bicubic, float)."""
    img = Image.fromarray(grey, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _voi(spec: RenditionSpec, lo: float, hi: float) -> dict[str, Any]:
    """Return the VOI attributes of ``spec`` for values (after Modality LUT) in [lo, hi]."""
    span = hi - lo
    if spec.window == "narrow":
        return {"window_center": lo + 0.5 * span, "window_width": 0.8 * span}
    if spec.window == "wide":
        return {"window_center": lo + 0.5 * span, "window_width": 1.6 * span}
    if spec.window == "sigmoid":
        return {
            "window_center": lo + 0.5 * span,
            "window_width": span,
            "voi_lut_function": "SIGMOID",
        }
    if spec.window == "lut":
        first, entries = int(np.floor(lo)), int(np.ceil(span)) + 1
        ramp = np.linspace(0.0, 1.0, entries) ** 0.8
        data = np.rint(ramp * 4095.0).astype(np.uint16)
        return {"voi_lut_descriptor": (entries, first, 12), "voi_lut_data": data}
    if spec.window == "none":
        return {}
    raise ValueError(f"unknown window kind {spec.window!r}")


def render(image: npt.NDArray[np.uint8], spec: RenditionSpec, seed: int = 0) -> Rendition:
    """Render an 8-bit training image as a DX object's stored values and attributes.

    The grey levels are mapped linearly onto the top of the ``bits_stored`` range (as a
    detector's for-presentation output would be), with sub-level Gaussian dither so the
    higher bit depth is used; then optional resize to ``spec.shape``, inversion for
    MONOCHROME1 and a padding border. With ``rescale`` the stored values stay the same and
    the Modality LUT (slope 0.5, intercept -1024) changes what they mean; the VOI
    attributes are expressed in Modality LUT output units.

    Parameters
    ----------
    image
        (H, W) uint8 training image (255 is white).
    spec
        The rendition.
    seed
        Seed of the dither.
    """
    grey = np.asarray(image, dtype=np.float32)
    if spec.shape is not None:
        grey = _resized(grey, spec.shape)
    top = float(2**spec.bits_stored - 1)
    lo, hi = 0.05 * top, 0.95 * top
    step = (hi - lo) / 255.0
    rng = np.random.default_rng(seed)
    stored = lo + np.clip(grey, 0.0, 255.0) * step + rng.normal(0.0, 0.3 * step, grey.shape)
    stored = np.clip(np.rint(stored), 0.0, top)
    photometric = "MONOCHROME2"
    if spec.monochrome1:
        stored, photometric = top - stored, "MONOCHROME1"
    slope, intercept = (0.5, -1024.0) if spec.rescale else (1.0, 0.0)
    pixels = stored.astype(np.uint16)
    padding = None
    if spec.padding_px > 0:
        padding = 0
        pixels = np.pad(pixels, spec.padding_px, mode="constant", constant_values=padding)
    return Rendition(
        name=spec.name,
        pixels=pixels,
        bits_stored=spec.bits_stored,
        photometric=photometric,
        rescale_slope=slope,
        rescale_intercept=intercept,
        pixel_padding_value=padding,
        **_voi(spec, lo * slope + intercept, hi * slope + intercept),
    )


RenditionReader = Callable[[Rendition], tuple[npt.NDArray[Any], PixelMeta]]


def direct_reader(rendition: Rendition) -> tuple[npt.NDArray[Any], PixelMeta]:
    """Map a rendition onto (pixels, PixelMeta) without DICOM encoding.

    Mirrors what the reader hands the model (stored values, Modality LUT and first VOI
    window as attributes); a VOI LUT Sequence is not applied. The serving path proper is
    ``daemon.renditions.read_through_dicom``.

    Parameters
    ----------
    rendition
        From :func:`render`.
    """
    meta = PixelMeta(
        photometric=rendition.photometric,
        rescale_slope=rendition.rescale_slope,
        rescale_intercept=rendition.rescale_intercept,
        window_center=rendition.window_center,
        window_width=rendition.window_width,
        voi_lut_function=rendition.voi_lut_function,
        bits_stored=rendition.bits_stored,
    )
    return rendition.pixels, meta


@dataclass(frozen=True)
class RenditionRow:
    """One row of the rendition table.

    Attributes
    ----------
    name
        Rendition name.
    n
        Images.
    mean_abs_delta_p, max_abs_delta_p
        Mean and maximum of ``|p(rendition) - p(training rendition)|``.
    agreement
        Fraction of images with the same decision at the bundle threshold.
    metrics
        Accuracy, sensitivity, specificity, AUC, ... of this rendition at the threshold.
    rejected
        Fraction of images the bundle's applicability gate refuses (0 without a gate).
    """

    name: str
    n: int
    mean_abs_delta_p: float
    max_abs_delta_p: float
    agreement: float
    metrics: dict[str, Any]
    rejected: float = 0.0

    @property
    def passes(self) -> bool:
        """Whether the row meets the contract's targets."""
        return self.mean_abs_delta_p <= MAX_MEAN_ABS_DELTA_P and self.agreement >= MIN_AGREEMENT

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "rendition": self.name,
            "n": self.n,
            "mean_abs_delta_p": round(self.mean_abs_delta_p, 5),
            "max_abs_delta_p": round(self.max_abs_delta_p, 5),
            "agreement": round(self.agreement, 5),
            "passes": self.passes,
            "gate_rejected": round(self.rejected, 5),
            "metrics": self.metrics,
        }


def _row(
    name: str,
    probs: npt.NDArray[np.float64],
    base: npt.NDArray[np.float64],
    labels: npt.NDArray[np.bool_],
    threshold: float,
    rejected: float,
) -> RenditionRow:
    delta = np.abs(probs - base)
    metrics = binary_metrics(labels, probs, threshold) if 0 < labels.sum() < len(labels) else {}
    return RenditionRow(
        name=name,
        n=len(probs),
        mean_abs_delta_p=float(delta.mean()),
        max_abs_delta_p=float(delta.max()),
        agreement=float(((probs >= threshold) == (base >= threshold)).mean()),
        metrics={k: v for k, v in metrics.items() if k != "confusion_matrix"},
        rejected=rejected,
    )


def rendition_table(
    bundle: Bundle,
    records: Sequence[LabeledImage],
    reader: RenditionReader = direct_reader,
    renditions: Sequence[RenditionSpec] = RENDITIONS,
    batch_size: int = 16,
) -> list[RenditionRow]:
    """Score every image in the training rendition and every other rendition.

    Each rendition goes through ``reader`` and then the bundle's :class:`Classifier` (the
    daemon's classifier and its one preprocessing function).

    Parameters
    ----------
    bundle
        The bundle to test.
    records
        Labelled images of the training source (JPEG/PNG).
    reader
        Turns a :class:`Rendition` into (pixels, PixelMeta) as the serving path does.
    renditions
        Renditions to test.
    batch_size
        Forward batch size.

    Returns
    -------
    list of RenditionRow
        The training rendition first (delta 0, agreement 1), then one row per rendition.
    """
    if not records:
        raise ValueError("no images to render")
    clf = Classifier(bundle, batch_size=batch_size)
    labels = np.array([r.label == bundle.card.positive_class for r in records], dtype=bool)
    images = [load_image_file(r.path) for r in records]
    first = clf.classify(images)
    base = np.array([p.probability for p in first], dtype=np.float64)
    refused = float(np.mean([p.not_applicable is not None for p in first]))
    rows = [_row(TRAINING_RENDITION, base, base, labels, clf.threshold, refused)]
    for spec in renditions:
        probs = np.empty(len(images), dtype=np.float64)
        n_refused = 0
        for i, (pixels, _) in enumerate(images):
            pred = clf.classify([reader(render(pixels, spec, seed=i))])[0]
            probs[i] = pred.probability
            n_refused += pred.not_applicable is not None
        rows.append(_row(spec.name, probs, base, labels, clf.threshold, n_refused / len(images)))
        logger.info("rendition scored", extra={"rendition": spec.name})
    return rows


def format_table(rows: Sequence[RenditionRow], data: str) -> str:
    """Return the rendition table as text, with the data it was measured on.

    Parameters
    ----------
    rows
        From :func:`rendition_table`.
    data
        What the images are (printed in the header).
    """
    lines = [
        f"rendition invariance on {data} (targets: mean |dp| <= {MAX_MEAN_ABS_DELTA_P}, "
        f"agreement >= {MIN_AGREEMENT:.0%})",
        f"{'rendition':32s} {'n':>5s} {'mean|dp|':>9s} {'max|dp|':>8s} {'agree':>7s} "
        f"{'acc':>6s} {'sens':>6s} {'spec':>6s} {'auc':>6s} {'gate-rej':>8s}  ok",
    ]
    for row in rows:
        m = row.metrics

        def val(key: str, metrics: dict[str, Any] = m) -> str:
            return f"{metrics[key]:6.3f}" if key in metrics else f"{'-':>6s}"

        lines.append(
            f"{row.name:32s} {row.n:5d} {row.mean_abs_delta_p:9.4f} {row.max_abs_delta_p:8.4f} "
            f"{row.agreement:7.2%} {val('accuracy')} {val('sensitivity')} "
            f"{val('specificity')} {val('auc')} {row.rejected:8.2%}  "
            f"{'yes' if row.passes else 'NO'}"
        )
    return "\n".join(lines)
