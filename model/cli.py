"""``radflag model`` command: ``train``, ``evaluate`` and ``info``."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.renditions import RenditionReader

logger = logging.getLogger(__name__)


def _parse_excludes(items: list[str] | None) -> dict[str, list[str]]:
    """Turn ``["view=L", "view=LL"]`` into ``{"view": ["L", "LL"]}``."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        column, sep, value = item.partition("=")
        if not sep or not column.strip():
            raise SystemExit(f"error: --exclude wants COLUMN=VALUE, got {item!r}")
        out.setdefault(column.strip(), []).append(value.strip())
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from model.bundle import CodedFinding
    from model.train import TrainConfig, train

    config = TrainConfig(
        data=args.data,
        out=args.out,
        arch=args.arch,
        epochs=args.epochs,
        input_size=args.input_size,
        channels=args.channels,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        patience=args.patience,
        target_sensitivity=args.target_sensitivity,
        positive_class=args.positive_class,
        name=args.name,
        version=args.version,
        limit=args.limit,
        resume=args.resume,
        stop_after=args.stop_after,
        checkpoint_dir=args.checkpoint_dir,
        weights_dtype=args.weights_dtype,
        modalities=args.modalities.split(","),
        finding=CodedFinding(
            scheme=args.finding_scheme, value=args.finding_value, meaning=args.finding_meaning
        ),
        description=args.description,
        limitations=args.limitations,
        data_attribution=args.data_attribution,
        command="radflag " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        progress=not args.no_progress,
        exclude=_parse_excludes(args.exclude),
        init=args.init,
        head_epochs=args.head_epochs,
        finetune_lr_scale=args.finetune_lr_scale,
    )
    try:
        result = train(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.bundle.card.metrics, indent=2))
    print(f"bundle written to {result.bundle.path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.renditions:
        return _cmd_renditions(args)
    from model.bundle import BundleError, default_bundle_path, load_bundle, write_card
    from model.data import read_dataset
    from model.evaluate import (
        calibrate_threshold,
        card_split,
        evaluate,
        score_records,
        threshold_change,
    )

    try:
        bundle = load_bundle(args.bundle or default_bundle_path())
        if args.split is not None:
            records = card_split(bundle.card, args.split, args.labels)
            source = f"{args.split} split of {args.labels or bundle.card.training.get('data')}"
        elif args.labels is not None:
            records = read_dataset(args.labels, _parse_excludes(args.exclude) or None)
            source = str(args.labels)
        else:
            print("error: give --labels and/or --split", file=sys.stderr)
            return 2
        scores = score_records(bundle, records, progress=not args.no_progress)
        if args.target_sensitivity is not None:
            y, probs, _ = scores
            new = calibrate_threshold(y, probs, args.target_sensitivity)
            card = threshold_change(bundle.card, new, args.target_sensitivity, source)
            bundle = write_card(bundle.path, card)
            print(
                f"threshold {card.training['threshold_changes'][-1]['from']:.4f} -> {new:.4f} "
                f"(target sensitivity {args.target_sensitivity}) written to {bundle.path}"
            )
        result = evaluate(
            bundle,
            records,
            bootstrap=args.bootstrap,
            progress=False,
            plots=args.plots,
            scores=scores,
        )
    except (BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["labels"] = source
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    cm = result["confusion_matrix"]
    ci = result.get("ci95_bootstrap", {})

    def fmt(key: str) -> str:
        low_high = ci.get(key)
        interval = f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""
        return f"{key}={result[key]:.4f}{interval}"

    print(
        f"data: {source}\nn={result['n']} (positive {result['n_positive']}) "
        f"threshold={result['threshold']:.4f}\n"
        + "\n".join(
            fmt(k) for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auc")
        )
        + f"\nconfusion: tp={cm['tp']} fp={cm['fp']} tn={cm['tn']} fn={cm['fn']}"
    )
    for plot in result.get("plots", []):
        print(f"plot: {plot}")
    if result["unreadable"]:
        print(f"{len(result['unreadable'])} unreadable images (see JSON)", file=sys.stderr)
    return 0


def _split_records(args: argparse.Namespace, bundle: Any, split: str) -> list[Any]:
    from model.evaluate import card_split

    records: list[Any] = card_split(bundle.card, split, args.labels)
    return records


def _balanced_subset(records: list[Any], limit: int | None, seed: int = 0) -> list[Any]:
    """Return ``limit`` records, every class in proportion, in a seeded order."""
    from model.train import stratified_limit

    if limit is None or limit >= len(records):
        return records
    subset: list[Any] = stratified_limit(records, limit, seed)
    return subset


def _cmd_renditions(args: argparse.Namespace) -> int:
    from model.bundle import BundleError, default_bundle_path, load_bundle
    from model.finalize import record_renditions
    from model.renditions import direct_reader, format_table, rendition_table

    reader = args.rendition_reader or direct_reader
    try:
        bundle = load_bundle(args.bundle or default_bundle_path())
        split = args.split or "validation"
        records = _balanced_subset(_split_records(args, bundle, split), args.rendition_limit)
        rows = rendition_table(bundle, records, reader)
    except (BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    via = "dicom_io reader" if args.rendition_reader else "direct (no DICOM encoding)"
    data = (
        f"{len(records)} images of the {split} split (held-out patients) of "
        f"{bundle.card.training.get('data')}, rendered by model.renditions, read via {via}"
    )
    print(format_table(rows, data))
    table = [r.to_dict() for r in rows]
    if args.json is not None:
        args.json.write_text(json.dumps({"data": data, "rows": table}, indent=2) + "\n")
    if args.write_card:
        record_renditions(bundle, split, [{"data": data}, *table])
        print(f"rendition table written to the card of {bundle.path}")
    return 0 if all(r.passes for r in rows) else 1


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from model.bundle import BundleError, default_bundle_path, load_bundle
    from model.finalize import calibrate_bundle, default_data

    try:
        bundle = load_bundle(args.bundle or default_bundle_path())
        records = _split_records(args, bundle, "validation")
        source = f"validation split of {default_data(bundle, args.labels)}"
        bundle = calibrate_bundle(bundle, records, source)
    except (BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(bundle.card.training["calibration"], indent=2))
    return 0


def _cmd_fit_gate(args: argparse.Namespace) -> int:
    from model.bundle import BundleError, default_bundle_path
    from model.data import read_dataset
    from model.finalize import default_data, fit_bundle_gate, load_for_gate_fitting, portable

    try:
        bundle = load_for_gate_fitting(args.bundle or default_bundle_path())
        splits = {s: _split_records(args, bundle, s) for s in ("train", "validation", "test")}
        extra = (
            read_dataset(args.extra, _parse_excludes(args.extra_exclude) or None)
            if args.extra is not None
            else None
        )
        bundle = fit_bundle_gate(
            bundle,
            splits,
            source=default_data(bundle, args.labels),
            extra=extra,
            extra_source=portable(args.extra) if args.extra is not None else "",
            margin=args.margin,
        )
    except (BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(bundle.card.applicability, indent=2))
    return 0


def format_card(card_dict: dict[str, Any]) -> str:
    """Human-readable multi-line rendering of a model card.

    Parameters
    ----------
    card_dict
        ``ModelCard.model_dump()`` output.
    """
    lines = [
        f"{card_dict['name']} {card_dict['version']} ({card_dict['architecture']})",
        f"  classes: {', '.join(card_dict['classes'])} (positive: {card_dict['positive_class']})",
        f"  finding: {card_dict['finding']['scheme']} {card_dict['finding']['value']} "
        f'"{card_dict["finding"]["meaning"]}"',
        f"  modalities: {', '.join(card_dict['modalities'])}",
        f"  threshold: {card_dict['threshold']:.4f} (temperature {card_dict['temperature']:.3f})",
        f"  preprocessing: {card_dict['preprocessing']}",
        f"  weights: {card_dict['weights_dtype']} sha256 {card_dict['weights_sha256']}",
    ]
    for split_name, m in card_dict.get("metrics", {}).items():
        if isinstance(m, dict) and "accuracy" in m:
            lines.append(
                f"  {split_name}: n={m['n']} acc={m['accuracy']:.4f} auc={m['auc']:.4f} "
                f"sens={m['sensitivity']:.4f} spec={m['specificity']:.4f}"
            )
    gate = card_dict.get("applicability") or {}
    if gate:
        frr = gate.get("false_rejection", {})
        lines.append(
            "  applicability gate: "
            + f"{gate.get('method', '')}; FRR "
            + ", ".join(f"{k} {v['false_rejection_rate']:.4f}" for k, v in frr.items())
        )
    training = card_dict.get("training", {})
    for key in ("data", "command", "duration_s", "epochs_run", "best_epoch"):
        if key in training:
            lines.append(f"  training.{key}: {training[key]}")
    if card_dict.get("description"):
        lines.append(f"  description: {card_dict['description']}")
    if card_dict.get("limitations"):
        lines.append(f"  limitations: {card_dict['limitations']}")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from model.bundle import BundleError, default_bundle_path, load_bundle

    path = args.bundle or default_bundle_path()
    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"bundle: {bundle.path}")
    print(format_card(bundle.card.model_dump()))
    return 0


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    rendition_reader: RenditionReader | None = None,
) -> None:
    """Add the ``model`` command: ``train``, ``evaluate``, ``calibrate``, ``fit-gate``, ``info``.

    Each sub-command sets ``func`` (``callable(args) -> int``).

    Parameters
    ----------
    subparsers
        The caller's sub-parser collection.
    rendition_reader
        How ``evaluate --renditions`` reads a rendered image: the daemon passes
        ``daemon.renditions.read_through_dicom`` (real DICOM through ``dicom_io``); without
        it the attributes are mapped directly (the model package never imports pydicom).
    """
    model_p = subparsers.add_parser("model", help="train, evaluate and inspect model bundles")
    sub = model_p.add_subparsers(dest="model_command", required=True)

    t = sub.add_parser("train", help="train a bundle on labelled images")
    t.add_argument(
        "--data", type=Path, required=True, help="folder with labels.csv or class folders"
    )
    t.add_argument("--arch", default="resnet10t", help="timm architecture name")
    t.add_argument("--epochs", type=int, default=12, help="maximum number of epochs")
    t.add_argument(
        "--input-size", type=int, default=160, help="model input side in pixels (square)"
    )
    t.add_argument(
        "--channels", type=int, default=1, choices=(1, 3), help="input channels (greyscale: 1)"
    )
    t.add_argument("--batch-size", type=int, default=32, help="images per optimiser step")
    t.add_argument(
        "--lr", type=float, default=2e-3, help="peak AdamW learning rate (warm-up, cosine decay)"
    )
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="fraction of patients held out for validation (early stopping, threshold)",
    )
    t.add_argument(
        "--test-fraction",
        type=float,
        default=0.10,
        help="fraction of patients held out for the test metrics (never used to train)",
    )
    t.add_argument(
        "--seed", type=int, default=0, help="seed of the patient split, shuffling and init"
    )
    t.add_argument("--patience", type=int, default=4, help="early stopping on validation AUC")
    t.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        help="threshold: highest one reaching this validation sensitivity",
    )
    t.add_argument("--positive-class", default="pneumonia", help="label of the positive class")
    t.add_argument("--out", type=Path, default=Path("bundle"), help="bundle folder to write")
    t.add_argument("--name", default="radflag-pneumonia", help="bundle name in the card")
    t.add_argument("--version", default="0.1.0", help="bundle version in the card")
    t.add_argument("--limit", type=int, default=None, help="use only N images (smoke runs)")
    t.add_argument("--resume", type=Path, default=None, help="checkpoint.pt to continue from")
    t.add_argument(
        "--stop-after", type=int, default=None, help="run at most N epochs now (resume later)"
    )
    t.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="write checkpoint.pt here after every epoch (for --resume)",
    )
    t.add_argument(
        "--weights-dtype",
        default="float32",
        choices=("float32", "float16"),
        help="dtype of the stored weights",
    )
    t.add_argument("--modalities", default="CR,DX", help="comma-separated DICOM modalities served")
    t.add_argument("--finding-scheme", default="SCT", help="coding scheme of the finding (SR code)")
    t.add_argument("--finding-value", default="233604007", help="code value of the finding")
    t.add_argument("--finding-meaning", default="Pneumonia", help="code meaning of the finding")
    t.add_argument("--description", default="", help="model card: what the model does")
    t.add_argument(
        "--limitations", default="", help="model card: known limitations and intended use"
    )
    t.add_argument(
        "--data-attribution", default="", help="model card: citation and licence of the data"
    )
    t.add_argument(
        "--exclude",
        action="append",
        metavar="COLUMN=VALUE",
        help="leave out labels.csv rows with this value (repeatable), e.g. view=L",
    )
    t.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="BUNDLE",
        help="fine-tune from this bundle (its architecture and preprocessing; new head): "
        "phase 1 head only with the backbone frozen, phase 2 all layers at a lower LR",
    )
    t.add_argument("--head-epochs", type=int, default=2, help="phase 1 epochs with --init")
    t.add_argument(
        "--finetune-lr-scale", type=float, default=0.1, help="phase 2 LR factor with --init"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a bundle on labelled images")
    e.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    e.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="labels.csv or dataset folder (with --split: where the training data now is)",
    )
    e.add_argument(
        "--split",
        choices=("validation", "test"),
        default=None,
        help="rebuild this partition of the patient-level split recorded in the card",
    )
    e.add_argument(
        "--exclude",
        action="append",
        metavar="COLUMN=VALUE",
        help="leave out labels.csv rows with this value (repeatable), e.g. view=L",
    )
    e.add_argument("--json", type=Path, default=None, help="write all metrics as JSON here")
    e.add_argument("--plots", type=Path, default=None, help="write ROC/PR/calibration PNGs here")
    e.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        help="choose the threshold reaching this sensitivity on these (validation) images "
        "and write it into the bundle's card (weights unchanged)",
    )
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0: none)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.add_argument(
        "--renditions",
        action="store_true",
        help="rendition contract: render --split images (default validation) as DICOM DX "
        "variants and print mean |dp| and decision agreement vs the training JPEG; "
        "exit 1 when a rendition misses the targets",
    )
    e.add_argument(
        "--rendition-limit", type=int, default=None, help="use N images (class-stratified)"
    )
    e.add_argument(
        "--write-card", action="store_true", help="record the rendition table in the card"
    )
    e.set_defaults(func=_cmd_evaluate, rendition_reader=rendition_reader)

    c = sub.add_parser("calibrate", help="temperature scaling on the card's validation split")
    c.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    c.add_argument("--labels", type=Path, default=None, help="where the training data now is")
    c.set_defaults(func=_cmd_calibrate)

    g = sub.add_parser("fit-gate", help="fit the not-a-chest-radiograph applicability gate")
    g.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    g.add_argument("--labels", type=Path, default=None, help="where the training data now is")
    g.add_argument(
        "--extra",
        type=Path,
        default=None,
        help="more frontal chest radiographs (labels.csv dataset, e.g. adults): split by "
        "patient into fit / calibration / held-out parts",
    )
    g.add_argument(
        "--extra-exclude",
        action="append",
        metavar="COLUMN=VALUE",
        help="leave out --extra rows with this value (repeatable), e.g. view=L",
    )
    g.add_argument(
        "--margin",
        type=float,
        default=0.01,
        help="thresholds = largest calibration distance x (1 + margin)",
    )
    g.set_defaults(func=_cmd_fit_gate)

    i = sub.add_parser("info", help="print a bundle's model card")
    i.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    i.set_defaults(func=_cmd_info)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m model.cli model ...``).

    Parameters
    ----------
    argv
        Arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="radflag")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
