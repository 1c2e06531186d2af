"""Measure a bundle's applicability gate on chest radiographs and on non-chest images.

Usage (from the project root, with ../shared/data present)::

    python scripts/gate_report.py [--bundle DIR] [--json OUT] [--write-card]

Rows: false rejection on the Kermany validation/test splits, on the extra frontal
radiographs (ieee8023 PA/AP/AP Supine) by gate part, on the real adult JPEG 2000 DX (as
served, and turned upright with MONOCHROME2 grey scale); refusal on ieee8023 lateral views,
every non-chest image of the DICOM transfer-syntax zoo read through ``dicom_io`` as the
daemon does, the dog thorax DX, matplotlib's sample images, and heavily corrupted chest
radiographs. Rows marked ``held_out_negatives`` were never looked at while the gate was
designed (later frames of the multi-frame zoo files, corruption kinds added afterwards).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter
from pydicom import dcmread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.pipeline import model_input  # noqa: E402
from dicom_io.reader import read_image  # noqa: E402
from model.bundle import Bundle, default_bundle_path, load_bundle, write_card  # noqa: E402
from model.evaluate import card_split  # noqa: E402
from model.finalize import gate_part  # noqa: E402
from model.infer import Classifier  # noqa: E402
from model.pixels import PixelMeta  # noqa: E402
from model.preprocess import load_image_file, preprocess  # noqa: E402
from model.train import stratified_limit  # noqa: E402

Item = tuple[npt.NDArray[Any], PixelMeta]
DATA = Path("../shared/data")
KERMANY = DATA / "cxr" / "kermany-pneumonia-train"
IEEE = DATA / "cxr" / "ieee8023-covid-train"
ZOO = DATA / "dicom" / "transfer-syntax-zoo" / "files"
CHEST = DATA / "dicom" / "chest-real" / "files"
J2K = CHEST / "JPEG2KLossless_1s_1f_u_16_16.dcm"
DOG = CHEST / "highdicom_dx_image.dcm"
CORRUPTIONS_SEEN = ("shuffled", "salt_pepper", "uniform_noise", "tiled4", "jigsaw", "constant")
CORRUPTIONS_NEW = ("checkerboard", "rot45", "centre_zoom3", "stripes")
NOTE = (
    "No non-chest image fits or thresholds the gate (thresholds come from chest radiographs "
    "only). Rows of kind 'negative' were looked at while the method was chosen (features "
    "only / layout / stages / image cues compared on them), so their refusal rates are "
    "optimistic; rows of kind 'held-out' were measured once, after the method was fixed. "
    "ieee8023 'fit' patients are in the fit set, 'calibration' patients set the thresholds."
)


def dicom_item(path: Path) -> Item:
    """Read a DICOM file as the daemon does (first frame)."""
    return model_input(read_image(path))


def later_frames(path: Path) -> list[Item]:
    """Frames 2.. of a multi-frame file, greyscale, as 8/16-bit stored values."""
    ds = dcmread(path)
    frames = np.asarray(ds.pixel_array)
    if frames.ndim == 4:
        frames = frames.mean(axis=-1).astype(np.uint8)
    bits = int(ds.BitsStored)
    return [(f, PixelMeta(bits_stored=bits)) for f in frames[1:]]


def upright(item: Item) -> Item:
    """Turn the J2K DX upright and invert its grey scale (as a viewer should show it)."""
    px, meta = item
    flipped = px[::-1].astype(np.int64)
    return (int(px.max()) + int(px.min()) - flipped).astype(px.dtype), meta


def corrupt(img: npt.NDArray[np.uint8], kind: str, rng: np.random.Generator) -> Any:
    """Heavily corrupted versions of an 8-bit chest radiograph."""
    h, w = img.shape
    if kind == "shuffled":
        return rng.permutation(img.ravel()).reshape(img.shape)
    if kind == "salt_pepper":
        out = img.copy()
        mask = rng.random(img.shape) < 0.5
        out[mask] = rng.choice(np.array([0, 255], np.uint8), size=int(mask.sum()))
        return out
    if kind == "uniform_noise":
        return rng.integers(0, 256, img.shape).astype(np.uint8)
    if kind == "tiled4":
        return np.tile(img[::4, ::4], (4, 4))
    if kind == "jigsaw":
        b = 28
        tiles = img[: h // b * b, : w // b * b].reshape(h // b, b, w // b, b).swapaxes(1, 2)
        flat = tiles.reshape(-1, b, b)[rng.permutation((h // b) * (w // b))]
        return flat.reshape(h // b, w // b, b, b).swapaxes(1, 2).reshape(h // b * b, -1)
    if kind == "constant":
        return np.full(img.shape, int(img.mean()), np.uint8)
    if kind == "checkerboard":
        yy, xx = np.indices(img.shape)
        return (((yy // 16 + xx // 16) % 2) * 255).astype(np.uint8)
    if kind == "rot45":
        return np.asarray(Image.fromarray(img).rotate(45, fillcolor=0))
    if kind == "centre_zoom3":
        crop = img[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]
        return np.asarray(Image.fromarray(crop).resize((w, h)).filter(ImageFilter.SMOOTH))
    if kind == "stripes":
        return np.tile(((np.arange(h) // 12) % 2 * 255).astype(np.uint8)[:, None], (1, w))
    raise ValueError(kind)


def matplotlib_samples() -> list[Item]:
    """Photos, an MR head slice and terrain maps shipped with matplotlib."""
    sd = Path(matplotlib.get_data_path()) / "sample_data"
    with gzip.open(sd / "s1045.ima.gz") as fh:
        mri = np.frombuffer(fh.read(), np.uint16).reshape(256, 256)
    dem = np.load(sd / "jacksboro_fault_dem.npz")["elevation"]
    topo = np.load(sd / "topobathy.npz")["topo"]
    grey = [
        np.asarray(Image.open(sd / n).convert("L"))
        for n in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
    ]
    return [
        *((g, PixelMeta(bits_stored=8)) for g in grey),
        (mri.copy(), PixelMeta(bits_stored=16)),
        ((dem - dem.min()).astype(np.uint16), PixelMeta(bits_stored=16)),
        ((topo - topo.min()).astype(np.uint16), PixelMeta(bits_stored=16)),
    ]


def ieee_rows() -> list[dict[str, str]]:
    """Rows of the ieee8023 labels.csv."""
    with (IEEE / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def build_sets(bundle: Bundle) -> dict[str, tuple[str, list[Item]]]:
    """Every measured set: (kind, items); kind is ``chest`` or ``negative``/``held-out``."""
    val = card_split(bundle.card, "validation", KERMANY)
    test = card_split(bundle.card, "test", KERMANY)
    rows = ieee_rows()
    frontal = [r for r in rows if r["view"] != "L"]
    lateral = [r for r in rows if r["view"] == "L"]

    def files(selected: Sequence[dict[str, str]]) -> list[Item]:
        return [load_image_file(IEEE / r["filename"]) for r in selected]

    zoo = [dicom_item(p) for p in sorted(ZOO.glob("*.dcm"))]
    rng = np.random.default_rng(0)
    sample = [load_image_file(r.path)[0] for r in stratified_limit(test, 24, seed=3)]

    def corrupted(kinds: Sequence[str]) -> list[Item]:
        return [(corrupt(img, k, rng), PixelMeta(bits_stored=8)) for img in sample for k in kinds]

    frames = [
        f
        for name in ("MR_multiframe10_explicitLE.dcm", "US_multiframe30_jpeg_baseline_ybr.dcm")
        for f in later_frames(ZOO / name)
    ]
    j2k = dicom_item(J2K)
    sets: dict[str, tuple[str, list[Item]]] = {
        "kermany validation": ("chest", [load_image_file(r.path) for r in val]),
        "kermany test": ("chest", [load_image_file(r.path) for r in test]),
    }
    for part in ("fit", "calibration", "held-out"):
        chosen = [r for r in frontal if gate_part(r["patient_id"]) == part]
        sets[f"ieee8023 frontal, {part} patients"] = ("chest", files(chosen))
    sets["adult J2K DX upright, MONOCHROME2"] = ("chest", [upright(j2k)])
    sets["adult J2K DX as served (upside down, inverted)"] = ("negative", [j2k])
    sets["ieee8023 lateral views"] = ("negative", files(lateral))
    sets["zoo non-chest files (22 files, 10 images)"] = ("negative", zoo)
    sets["dog thorax DX"] = ("negative", [dicom_item(DOG)])
    sets["matplotlib sample images"] = ("negative", matplotlib_samples())
    sets["corrupted chest (6 kinds x 24 test images)"] = ("negative", corrupted(CORRUPTIONS_SEEN))
    sets["held out: later frames of multi-frame MR/US"] = ("held-out", frames)
    sets["held out: 4 new corruption kinds x 24"] = ("held-out", corrupted(CORRUPTIONS_NEW))
    return sets


def measure(bundle: Bundle, sets: dict[str, tuple[str, list[Item]]]) -> list[dict[str, Any]]:
    """Return one row per set: n, refused fraction, and the reasons' counts."""
    clf = Classifier(bundle, batch_size=32)
    gate = bundle.gate
    if gate is None:
        raise SystemExit("the bundle has no applicability gate")
    table = []
    for name, (kind, items) in sets.items():
        rows = clf.features([preprocess(p, m, clf.spec) for p, m in items])
        reasons = gate.assess(rows)
        refused = [r for r in reasons if r is not None]
        short: dict[str, int] = {}
        for r in refused:
            key = r.split("(")[0].split(":")[0].strip()
            short[key] = short.get(key, 0) + 1
        table.append(
            {
                "set": name,
                "kind": kind,
                "n": len(items),
                "refused": round(len(refused) / max(len(items), 1), 4),
                "reasons": short,
            }
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; optionally write it as JSON and into the card."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--write-card", action="store_true")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle or default_bundle_path())
    table = measure(bundle, build_sets(bundle))
    for row in table:
        what = "false rejection" if row["kind"] == "chest" else "refused"
        print(f"{row['set']:52s} n={row['n']:4d} {what} {row['refused']:.3f}  {row['reasons']}")
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    if args.write_card:
        section = {**bundle.card.applicability, "evaluation": table, "evaluation_note": NOTE}
        write_card(bundle.path, bundle.card.model_copy(update={"applicability": section}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
