"""Training of a binary classifier bundle from labelled image files.

One preprocessing function (:func:`model.preprocess.preprocess`) is used for training,
evaluation and serving. Images are preprocessed once and cached in memory; MONAI
augmentations are applied to the cached tensors of the training split only.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import platform
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import monai
import numpy as np
import numpy.typing as npt
import timm
import torch
from tqdm import tqdm

from model.augment import AUGMENTATION_SUMMARY, augment_batch, build_augmentation
from model.bundle import (
    PNEUMONIA_FINDING,
    Bundle,
    CodedFinding,
    ModelCard,
    build_network,
    load_bundle,
    save_bundle,
)
from model.data import LabeledImage, PatientSplit, patient_split, read_dataset
from model.metrics import binary_metrics, bootstrap_ci, choose_threshold, roc_auc
from model.preprocess import PreprocessSpec, load_image_file, preprocess

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the model card)."""

    data: Path
    out: Path
    arch: str = "resnet10t"
    epochs: int = 12
    input_size: int = 160
    channels: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    test_fraction: float = 0.10
    seed: int = 0
    patience: int = 4
    target_sensitivity: float = 0.95
    positive_class: str = "pneumonia"
    name: str = "radflag-pneumonia"
    version: str = "0.1.0"
    limit: int | None = None
    resume: Path | None = None
    stop_after: int | None = None
    checkpoint_dir: Path | None = None
    weights_dtype: str = "float32"
    modalities: list[str] = field(default_factory=lambda: ["CR", "DX"])
    finding: CodedFinding = PNEUMONIA_FINDING
    description: str = ""
    limitations: str = ""
    data_attribution: str = ""
    command: str = ""
    progress: bool = True
    exclude: dict[str, list[str]] = field(default_factory=dict)
    init: Path | None = None
    head_epochs: int = 2
    finetune_lr_scale: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary of the settings that shape the model."""
        return {
            "arch": self.arch,
            "epochs_max": self.epochs,
            "input_size": self.input_size,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "seed": self.seed,
            "patience": self.patience,
            "target_sensitivity": self.target_sensitivity,
            "limit": self.limit,
            "exclude": {k: sorted(v) for k, v in sorted(self.exclude.items())},
            "init": str(self.init) if self.init is not None else None,
            "head_epochs": self.head_epochs if self.init is not None else 0,
            "finetune_lr_scale": self.finetune_lr_scale if self.init is not None else 1.0,
        }


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    bundle: Bundle
    history: list[dict[str, float]]
    split: PatientSplit


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs.

    Parameters
    ----------
    seed
        The seed.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stratified_limit(records: list[LabeledImage], limit: int, seed: int) -> list[LabeledImage]:
    """Keep ``limit`` records, sampled by patient, keeping class proportions roughly.

    Parameters
    ----------
    records
        All records.
    limit
        Number of images wanted.
    seed
        Shuffle seed.
    """
    if limit >= len(records):
        return records
    rng = random.Random(seed)
    shuffled = list(records)
    rng.shuffle(shuffled)
    by_label: dict[str, list[LabeledImage]] = {}
    for rec in shuffled:
        by_label.setdefault(rec.label, []).append(rec)
    out: list[LabeledImage] = []
    for recs in by_label.values():
        out.extend(recs[: max(1, round(limit * len(recs) / len(records)))])
    return out[:limit]


def cache_images(
    records: list[LabeledImage], spec: PreprocessSpec, progress: bool, desc: str
) -> torch.Tensor:
    """Preprocess every image once into a float16 (N, C, S, S) tensor.

    Parameters
    ----------
    records
        Images to read.
    spec
        Preprocessing spec.
    progress
        Show a tqdm bar.
    desc
        Bar label.

    Raises
    ------
    ValueError
        Listing unreadable images (nothing is dropped silently).
    """
    out = torch.empty(
        (len(records), spec.channels, spec.input_size, spec.input_size), dtype=torch.float16
    )
    errors: list[str] = []
    for i, rec in enumerate(tqdm(records, desc=desc, disable=not progress, mininterval=5)):
        try:
            pixels, meta = load_image_file(rec.path)
            out[i] = torch.from_numpy(preprocess(pixels, meta, spec))
        except (ValueError, OSError) as exc:
            errors.append(f"{rec.path}: {exc}")
    if errors:
        raise ValueError(f"{len(errors)} unreadable images, e.g. " + "; ".join(errors[:5]))
    return out


def _lr_lambda(
    total_steps: int, warmup_steps: int, head_steps: int = 0, finetune_scale: float = 1.0
) -> Callable[[int], float]:
    """Warm-up, then cosine decay; after ``head_steps`` (phase 2) scaled by ``finetune_scale``."""

    def factor(step: int) -> float:
        phase = finetune_scale if step >= head_steps > 0 else 1.0
        if step < warmup_steps:
            return phase * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return phase * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


def init_from_bundle(bundle: Bundle) -> torch.nn.Module:
    """Return a network with ``bundle``'s backbone weights and a freshly initialised head.

    Parameters
    ----------
    bundle
        The bundle to fine-tune from (its architecture and preprocessing are kept).
    """
    net = build_network(bundle.card.architecture, bundle.card.preprocess_spec)
    net.load_state_dict(bundle.model.state_dict())
    reset = getattr(net, "reset_classifier", None)
    if reset is None:
        raise ValueError(f"{bundle.card.architecture} has no reset_classifier (not a timm model)")
    reset(1)
    return net


def head_parameters(net: torch.nn.Module) -> set[int]:
    """Return the ids of the classifier head's parameters (timm ``get_classifier``).

    Parameters
    ----------
    net
        A timm network.
    """
    get_classifier = getattr(net, "get_classifier", None)
    if get_classifier is None:
        raise ValueError(f"{type(net).__name__} has no get_classifier (not a timm model)")
    head: torch.nn.Module = get_classifier()
    ids = {id(p) for p in head.parameters()}
    if not ids:
        raise ValueError(f"{type(net).__name__} has a classifier head without parameters")
    return ids


def set_phase(net: torch.nn.Module, head_ids: set[int], frozen_backbone: bool) -> None:
    """Put ``net`` in training mode for phase 1 (head only) or phase 2 (all layers).

    In phase 1 the backbone's parameters get no gradient and its BatchNorm statistics
    stay fixed (backbone in eval mode); only the head trains.

    Parameters
    ----------
    net
        The network.
    head_ids
        From :func:`head_parameters`.
    frozen_backbone
        True for phase 1.
    """
    for param in net.parameters():
        param.requires_grad_(not frozen_backbone or id(param) in head_ids)
    net.train()
    if frozen_backbone:
        net.eval()
        head: torch.nn.Module = net.get_classifier()  # type: ignore[operator]
        head.train()


def predict_cached(
    net: torch.nn.Module, images: torch.Tensor, batch_size: int = 64
) -> npt.NDArray[np.float64]:
    """Return sigmoid outputs of ``net`` on cached images (eval mode, inference mode).

    Parameters
    ----------
    net
        Network with one output logit.
    images
        (N, C, S, S) tensor.
    batch_size
        Forward batch size.
    """
    net.eval()
    outs: list[npt.NDArray[np.float64]] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            logits = net(images[start : start + batch_size].float()).reshape(-1)
            outs.append(torch.sigmoid(logits).double().numpy())
    return np.concatenate(outs) if outs else np.empty(0, dtype=np.float64)


def _split_digest(split: PatientSplit) -> str:
    text = "|".join(
        ",".join(sorted({r.patient_id for r in part}))
        for part in (split.train, split.val, split.test)
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_torch_save(obj: dict[str, Any], target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(target)


def train(config: TrainConfig) -> TrainResult:
    """Train, choose the threshold on validation, measure, and write a bundle.

    Parameters
    ----------
    config
        Run settings.

    Returns
    -------
    TrainResult
        The saved bundle (loaded back), per-epoch history and the split.

    Raises
    ------
    ValueError
        On unusable data (not two classes, unknown positive class, unreadable images).
    """
    started = time.perf_counter()
    seed_everything(config.seed)
    init_bundle = load_bundle(config.init) if config.init is not None else None
    records = read_dataset(config.data, config.exclude)
    classes = sorted({r.label for r in records})
    if len(classes) != 2:
        raise ValueError(f"need exactly two classes, found {classes}")
    if config.positive_class not in classes:
        raise ValueError(f"positive class {config.positive_class!r} not in {classes}")
    if config.limit is not None:
        records = stratified_limit(records, config.limit, config.seed)
    split = patient_split(
        records, config.val_fraction, config.seed, config.positive_class, config.test_fraction
    )
    if not split.train or not split.val:
        raise ValueError("training or validation split is empty; use more data")
    if init_bundle is not None:
        # fine-tuning keeps the initial bundle's network and preprocessing
        spec = init_bundle.card.preprocess_spec
        arch = init_bundle.card.architecture
        if (arch, spec.input_size, spec.channels) != (
            config.arch,
            config.input_size,
            config.channels,
        ):
            logger.info(
                "fine-tuning uses the initial bundle's architecture and preprocessing",
                extra={"arch": arch, "input_size": spec.input_size, "channels": spec.channels},
            )
        config.arch, config.input_size, config.channels = arch, spec.input_size, spec.channels
    else:
        spec = PreprocessSpec(input_size=config.input_size, channels=config.channels)
    x_train = cache_images(split.train, spec, config.progress, "cache train")
    x_val = cache_images(split.val, spec, config.progress, "cache val")
    y_train = torch.tensor(
        [r.label == config.positive_class for r in split.train], dtype=torch.float32
    )
    y_val = np.array([r.label == config.positive_class for r in split.val], dtype=bool)

    net = (
        init_from_bundle(init_bundle)
        if init_bundle is not None
        else build_network(config.arch, spec)
    )
    head_ids = head_parameters(net)
    head_epochs = config.head_epochs if init_bundle is not None else 0
    n_pos = float(y_train.sum())
    n_neg = float(len(y_train) - n_pos)
    pos_weight = torch.tensor([n_neg / max(n_pos, 1.0)])
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(x_train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        _lr_lambda(
            steps_per_epoch * config.epochs,
            min(steps_per_epoch, 100),
            head_steps=steps_per_epoch * head_epochs,
            finetune_scale=config.finetune_lr_scale if init_bundle is not None else 1.0,
        ),
    )
    aug = build_augmentation(config.input_size)

    ckpt_dir = config.checkpoint_dir or Path(tempfile.gettempdir()) / "radflag-train" / (
        f"{config.name}-{config.version}"
    )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    digest = _split_digest(split)
    history: list[dict[str, float]] = []
    best_auc, best_epoch, best_state = -1.0, -1, copy.deepcopy(net.state_dict())
    start_epoch, prior_duration_s = 0, 0.0
    if config.resume is not None:
        ckpt = torch.load(config.resume, map_location="cpu", weights_only=False)
        if ckpt["split_digest"] != digest or ckpt["config"] != config.to_dict():
            raise ValueError(f"checkpoint {config.resume} was made with other data/settings")
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        best_auc, best_epoch, best_state = ckpt["best_auc"], ckpt["best_epoch"], ckpt["best_state"]
        prior_duration_s = ckpt["duration_s"]
        logger.info(
            "resumed training", extra={"checkpoint": str(config.resume), "epoch": start_epoch}
        )

    for epoch in range(start_epoch, config.epochs):
        if config.stop_after is not None and epoch - start_epoch >= config.stop_after:
            logger.info("stopping after this run's epoch budget", extra={"epoch": epoch})
            break
        if best_epoch >= 0 and epoch - best_epoch > config.patience:
            logger.info("early stopping", extra={"epoch": epoch, "best_epoch": best_epoch})
            break
        seed_everything(config.seed + epoch)
        aug.set_random_state(seed=config.seed + epoch)
        order = torch.randperm(
            len(x_train), generator=torch.Generator().manual_seed(config.seed + epoch)
        )
        set_phase(net, head_ids, frozen_backbone=epoch < head_epochs)
        total_loss, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not config.progress,
            mininterval=10,
        )
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            xb = augment_batch(aug, x_train[idx].float())
            loss = loss_fn(net(xb).reshape(-1), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
        probs = predict_cached(net, x_val)
        val_auc = roc_auc(y_val, probs)
        val_loss = float(
            torch.nn.functional.binary_cross_entropy(
                torch.from_numpy(probs).clamp(1e-7, 1 - 1e-7),
                torch.from_numpy(y_val.astype(np.float64)),
            )
        )
        val_acc = float(((probs >= 0.5) == y_val).mean())
        record = {
            "epoch": epoch + 1,
            "train_loss": total_loss / max(seen, 1),
            "val_loss": val_loss,
            "val_auc": val_auc,
            "val_accuracy_at_0.5": val_acc,
            "lr": float(scheduler.get_last_lr()[0]),
            "phase": 1.0 if epoch < head_epochs else 2.0,
        }
        history.append(record)
        if val_auc > best_auc + 1e-4 or best_epoch < 0:
            best_auc, best_epoch = val_auc, epoch
            best_state = copy.deepcopy(net.state_dict())
        elapsed = prior_duration_s + time.perf_counter() - started
        _atomic_torch_save(
            {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "history": history,
                "best_auc": best_auc,
                "best_epoch": best_epoch,
                "best_state": best_state,
                "duration_s": elapsed,
                "split_digest": digest,
                "config": config.to_dict(),
            },
            ckpt_dir / CHECKPOINT_FILE,
        )
        msg = (
            f"epoch {epoch + 1}: train_loss {record['train_loss']:.4f} val_loss {val_loss:.4f} "
            f"val_auc {val_auc:.4f} val_acc@0.5 {val_acc:.4f} ({elapsed:.0f}s)"
        )
        if config.progress:
            tqdm.write(msg)
        logger.info(msg)

    net.load_state_dict(best_state)
    set_phase(net, head_ids, frozen_backbone=False)
    net.eval()
    val_probs = predict_cached(net, x_val)
    threshold = choose_threshold(y_val, val_probs, config.target_sensitivity)
    metrics: dict[str, Any] = {
        "validation": {
            **binary_metrics(y_val, val_probs, threshold),
            "ci95_bootstrap": bootstrap_ci(y_val, val_probs, threshold, n_resamples=500),
            "note": "threshold chosen on this split; early stopping also used it (optimistic)",
        }
    }
    if split.test:
        x_test = cache_images(split.test, spec, config.progress, "cache test")
        y_test = np.array([r.label == config.positive_class for r in split.test], dtype=bool)
        test_probs = predict_cached(net, x_test)
        metrics["test"] = {
            **binary_metrics(y_test, test_probs, threshold),
            "ci95_bootstrap": bootstrap_ci(y_test, test_probs, threshold, n_resamples=500),
            "note": "held-out patients never used for training, early stopping or threshold",
        }
    duration_s = prior_duration_s + time.perf_counter() - started
    training = {
        "data": str(config.data),
        "data_attribution": config.data_attribution,
        "classes_images": {c: sum(r.label == c for r in records) for c in classes},
        "split": {
            "method": "patient-level, stratified by patient label, seeded shuffle",
            **split.describe(config.positive_class),
        },
        "command": config.command,
        "duration_s": round(duration_s, 1),
        "epochs_run": len(history),
        "best_epoch": best_epoch + 1,
        "history": history,
        "class_imbalance": f"BCE pos_weight={float(pos_weight):.4f} (n_neg/n_pos)",
        "augmentation": AUGMENTATION_SUMMARY,
        "threshold_rule": (
            f"highest threshold with validation sensitivity >= {config.target_sensitivity}, "
            "else Youden"
        ),
        "settings": config.to_dict(),
        **(
            {
                "init": {
                    "bundle": str(config.init),
                    "name": init_bundle.card.name,
                    "version": init_bundle.card.version,
                    "weights_sha256": init_bundle.card.weights_sha256,
                },
                "fine_tuning": (
                    f"two-phase: epochs 1-{head_epochs} new head only (backbone frozen, "
                    f"BatchNorm statistics fixed), then all layers at "
                    f"{config.finetune_lr_scale}x the learning rate"
                ),
            }
            if init_bundle is not None
            else {}
        ),
        **({"excluded": config.to_dict()["exclude"]} if config.exclude else {}),
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "monai": monai.__version__,
        },
    }
    card = ModelCard(
        name=config.name,
        version=config.version,
        architecture=config.arch,
        classes=classes,
        positive_class=config.positive_class,
        preprocessing=spec.to_dict(),
        threshold=threshold,
        modalities=config.modalities,
        finding=config.finding,
        training=training,
        metrics=metrics,
        weights_dtype=config.weights_dtype,
        description=config.description
        or f"{config.arch} classifier of {config.positive_class} vs "
        f"{[c for c in classes if c != config.positive_class][0]} trained from scratch by radflag.",
        limitations=config.limitations,
    )
    bundle = save_bundle(config.out, net, card)
    return TrainResult(bundle=bundle, history=history, split=split)
