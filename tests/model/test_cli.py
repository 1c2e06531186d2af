from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.bundle import Bundle, load_bundle
from model.cli import register


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radflag")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_register_adds_model_subcommands() -> None:
    parser = _parser()
    args = parser.parse_args(["model", "train", "--data", "x", "--epochs", "2", "--limit", "20"])
    assert callable(args.func) and args.epochs == 2 and args.limit == 20
    assert args.val_fraction == pytest.approx(0.15) and args.seed == 0
    assert callable(parser.parse_args(["model", "info"]).func)
    with pytest.raises(SystemExit):
        parser.parse_args(["model"])


def test_info_prints_card(tiny_bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["model", "info", "--bundle", str(tiny_bundle.path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "tiny-test 0.0.1 (resnet10t)" in out
    assert tiny_bundle.card.weights_sha256 in out


def test_info_on_broken_bundle_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parser().parse_args(["model", "info", "--bundle", str(tmp_path)])
    assert args.func(args) == 2
    assert "no model.json" in capsys.readouterr().err


def test_evaluate_writes_json(
    tiny_bundle: Bundle, synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    args = _parser().parse_args(
        [
            "model",
            "evaluate",
            "--bundle",
            str(tiny_bundle.path),
            "--labels",
            str(synthetic_dataset / "labels.csv"),
            "--json",
            str(out),
            "--bootstrap",
            "50",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    for key in (
        "n",
        "accuracy",
        "auc",
        "sensitivity",
        "specificity",
        "threshold",
        "ppv",
        "npv",
        "f1",
        "confusion_matrix",
        "ci95_bootstrap",
    ):
        assert key in result
    assert result["n"] == 48
    cm = result["confusion_matrix"]
    assert cm["tp"] + cm["fp"] + cm["tn"] + cm["fn"] == 48
    assert "accuracy=" in capsys.readouterr().out


def test_model_package_never_imports_dicom_or_sql() -> None:
    # Our own code must not import them (MONAI itself pulls in pydicom transitively).
    root = Path(__file__).resolve().parents[2] / "model"
    for source in root.rglob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("pydicom", "sqlalchemy"), (source, name)
    code = (
        "import sys, model.cli, model.train, model.evaluate, model.infer, model.bundle;"
        "sys.exit(1 if 'sqlalchemy' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_evaluate_writes_plots_and_all_intervals(
    tiny_bundle: Bundle, synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plots = tmp_path / "plots"
    out = tmp_path / "eval.json"
    args = _parser().parse_args(
        ["model", "evaluate", "--bundle", str(tiny_bundle.path)]
        + ["--labels", str(synthetic_dataset), "--plots", str(plots), "--json", str(out)]
        + ["--bootstrap", "30", "--no-progress"]
    )
    assert args.func(args) == 0
    for name in ("roc.png", "precision_recall.png", "calibration.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    result = json.loads(out.read_text())
    assert set(result["ci95_bootstrap"]) >= {"accuracy", "sensitivity", "specificity", "auc"}
    assert {"ppv", "npv", "f1"} <= set(result["ci95_bootstrap"])
    assert sorted(Path(p).name for p in result["plots"]) == [
        "calibration.png",
        "precision_recall.png",
        "roc.png",
    ]
    assert "plot: " in capsys.readouterr().out


def test_evaluate_target_sensitivity_rewrites_threshold_only(
    tiny_bundle: Bundle, synthetic_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = load_bundle(tiny_bundle.path).card
    args = _parser().parse_args(
        ["model", "evaluate", "--bundle", str(tiny_bundle.path), "--labels", str(synthetic_dataset)]
        + ["--target-sensitivity", "1.0", "--bootstrap", "0", "--no-progress"]
    )
    assert args.func(args) == 0
    after = load_bundle(tiny_bundle.path).card  # loads: sha256 still matches the weights
    assert after.weights_sha256 == before.weights_sha256
    change = after.training["threshold_changes"][-1]
    assert change["from"] == before.threshold and change["to"] == after.threshold
    assert change["target_sensitivity"] == 1.0
    # the threshold reaches the target on the data it was chosen on
    assert "sensitivity=1.0000" in capsys.readouterr().out


def test_evaluate_rebuilds_the_card_split(
    synthetic_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.evaluate import card_split
    from model.train import TrainConfig, train

    result = train(
        TrainConfig(
            data=synthetic_dataset,
            out=tmp_path / "b",
            epochs=1,
            input_size=32,
            batch_size=8,
            val_fraction=0.25,
            test_fraction=0.25,
            checkpoint_dir=tmp_path / "ckpt",
            progress=False,
        )
    )
    test_part = card_split(result.bundle.card, "test")
    assert [r.path for r in test_part] == [r.path for r in result.split.test]
    assert {r.patient_id for r in test_part}.isdisjoint({r.patient_id for r in result.split.train})
    args = _parser().parse_args(
        ["model", "evaluate", "--bundle", str(tmp_path / "b"), "--split", "test"]
        + ["--bootstrap", "0", "--no-progress"]
    )
    assert args.func(args) == 0
    assert f"n={len(result.split.test)} " in capsys.readouterr().out
