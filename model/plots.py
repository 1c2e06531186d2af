"""ROC, precision-recall and calibration plots of an evaluation (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after selecting the headless backend
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from model.metrics import roc_auc  # noqa: E402

PLOT_FILES = ("roc.png", "precision_recall.png", "calibration.png")


def _curve_points(
    y: npt.NDArray[np.bool_], s: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Return (false positive rate, true positive rate, precision) for descending thresholds."""
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last_of_tie = np.r_[np.nonzero(np.diff(ss))[0], len(ss) - 1]
    tp = np.cumsum(ys)[last_of_tie].astype(np.float64)
    fp = np.cumsum(~ys)[last_of_tie].astype(np.float64)
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    precision = np.r_[1.0, tp / np.maximum(tp + fp, 1.0)]
    return fpr, tpr, precision


def write_plots(
    labels: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float64],
    threshold: float,
    out_dir: Path,
    title: str,
    n_bins: int = 10,
) -> list[Path]:
    """Write ``roc.png``, ``precision_recall.png`` and ``calibration.png`` to ``out_dir``.

    Parameters
    ----------
    labels
        True for positive images.
    scores
        P(positive) per image.
    threshold
        Operating threshold, marked on the ROC and PR curves.
    out_dir
        Folder (created if needed).
    title
        Plot title prefix (model name and data set).
    n_bins
        Equal-width probability bins of the calibration (reliability) diagram.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, precision = _curve_points(y, s)
    pred = s >= threshold
    op_tpr = float((pred & y).sum() / max(int(y.sum()), 1))
    op_fpr = float((pred & ~y).sum() / max(int((~y).sum()), 1))
    op_ppv = float((pred & y).sum() / max(int(pred.sum()), 1))
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUC {roc_auc(y, s):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.plot([op_fpr], [op_tpr], "o", c="red", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"{title}\nROC, n={len(y)}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    written.append(_save(fig, out_dir / PLOT_FILES[0]))

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot(tpr, precision, lw=2, label="precision-recall")
    prevalence = float(y.mean()) if len(y) else 0.0
    ax.axhline(prevalence, ls="--", c="grey", lw=1, label=f"prevalence {prevalence:.2f}")
    ax.plot([op_tpr], [op_ppv], "o", c="red", label=f"threshold {threshold:.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(f"{title}\nprecision-recall, n={len(y)}", fontsize=9)
    ax.legend(loc="lower left", fontsize=8)
    written.append(_save(fig, out_dir / PLOT_FILES[1]))

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1]), 0, n_bins - 1)
    mean_pred, frac_pos, counts = [], [], []
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            mean_pred.append(float(s[sel].mean()))
            frac_pos.append(float(y[sel].mean()))
            counts.append(int(sel.sum()))
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    ax.plot(mean_pred, frac_pos, "o-", lw=2, label="model")
    for x_val, y_val, c in zip(mean_pred, frac_pos, counts, strict=True):
        ax.annotate(str(c), (x_val, y_val), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(
        xlabel="mean predicted probability",
        ylabel="fraction positive",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.set_title(f"{title}\ncalibration ({n_bins} bins, counts shown), n={len(y)}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    written.append(_save(fig, out_dir / PLOT_FILES[2]))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
