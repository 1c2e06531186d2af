from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import build_network, load_bundle
from model.data import LabeledImage, patient_split, read_class_folders, read_dataset
from model.infer import Classifier
from model.train import CHECKPOINT_FILE, TrainConfig, cache_images, train
from tests.conftest import shared_path


def _config(data: Path, tmp_path: Path, **kw: object) -> TrainConfig:
    values: dict[str, object] = {
        "data": data,
        "out": tmp_path / "bundle",
        "arch": "resnet10t",
        "epochs": 4,
        "input_size": 32,
        "batch_size": 8,
        "lr": 3e-3,
        "val_fraction": 0.25,
        "test_fraction": 0.0,
        "patience": 10,
        "checkpoint_dir": tmp_path / "ckpt",
        "progress": False,
        "command": "pytest",
    }
    values.update(kw)
    return TrainConfig(**values)  # type: ignore[arg-type]


def test_tiny_training_loss_falls_and_bundle_round_trips(
    synthetic_dataset: Path, tmp_path: Path
) -> None:
    result = train(_config(synthetic_dataset, tmp_path))
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    card = result.bundle.card
    assert card.classes == ["normal", "pneumonia"] and card.positive_class == "pneumonia"
    assert 0.0 <= card.threshold <= 1.0
    for key in ("n", "accuracy", "auc", "sensitivity", "specificity", "threshold"):
        assert key in card.metrics["validation"]
    split = card.training["split"]
    assert split["train"]["patients"] + split["validation"]["patients"] == 24
    assert card.training["command"] == "pytest"
    assert (tmp_path / "ckpt" / CHECKPOINT_FILE).is_file()
    # save -> load -> identical outputs
    loaded = load_bundle(tmp_path / "bundle")
    images = cache_images(result.split.val, card.preprocess_spec, False, "val")
    arrays = [img.float().numpy() for img in images]
    before = Classifier(result.bundle, torch.device("cpu")).predict(arrays)
    after = Classifier(loaded, torch.device("cpu")).predict(arrays)
    np.testing.assert_array_equal(before, after)


def test_training_is_seeded_and_resume_is_exact(synthetic_dataset: Path, tmp_path: Path) -> None:
    straight = train(_config(synthetic_dataset, tmp_path / "a", epochs=3))
    # time-sliced run: 2 epochs now, then resume from the checkpoint for the last one
    first = train(_config(synthetic_dataset, tmp_path / "b", epochs=3, stop_after=2))
    assert [h["epoch"] for h in first.history] == [1, 2]
    cfg = _config(synthetic_dataset, tmp_path / "c", epochs=3)
    cfg.resume = tmp_path / "b" / "ckpt" / CHECKPOINT_FILE
    resumed = train(cfg)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history == straight.history
    assert resumed.bundle.card.weights_sha256 == straight.bundle.card.weights_sha256


def test_resume_refuses_other_settings(synthetic_dataset: Path, tmp_path: Path) -> None:
    train(_config(synthetic_dataset, tmp_path, epochs=1))
    cfg = _config(synthetic_dataset, tmp_path / "x", epochs=1, seed=5)
    cfg.resume = tmp_path / "ckpt" / CHECKPOINT_FILE
    with pytest.raises(ValueError, match="other data/settings"):
        train(cfg)


def test_patient_split_has_no_overlap_and_is_seeded(synthetic_dataset: Path) -> None:
    records = read_dataset(synthetic_dataset)
    split = patient_split(records, 0.25, seed=3, positive_class="pneumonia", test_fraction=0.25)
    parts = [{r.patient_id for r in p} for p in (split.train, split.val, split.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(split.train) + len(split.val) + len(split.test) == len(records)
    again = patient_split(records, 0.25, seed=3, positive_class="pneumonia", test_fraction=0.25)
    assert again == split
    # both classes in validation (stratified)
    assert {r.label for r in split.val} == {"normal", "pneumonia"}


@pytest.mark.shared
def test_patient_split_on_kermany_has_no_overlap() -> None:
    records = read_dataset(shared_path("cxr", "kermany-pneumonia-train"))
    split = patient_split(records, 0.15, seed=0, positive_class="pneumonia", test_fraction=0.1)
    train_p = {r.patient_id for r in split.train}
    val_p = {r.patient_id for r in split.val}
    test_p = {r.patient_id for r in split.test}
    assert not (train_p & val_p) and not (train_p & test_p) and not (val_p & test_p)
    assert 0.10 < len(split.val) / len(records) < 0.20


def test_class_folders_and_bad_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        read_dataset(tmp_path / "missing")
    (tmp_path / "one" / "normal").mkdir(parents=True)
    with pytest.raises(ValueError, match="no labelled images"):
        read_dataset(tmp_path / "one")
    (tmp_path / "one" / "normal" / "a.png").write_bytes(b"x")
    recs = read_class_folders(tmp_path / "one")
    assert recs == [
        LabeledImage(tmp_path / "one" / "normal" / "a.png", "normal", "file:normal/a.png")
    ]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("filename,patient_id\na.png,1\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_dataset(csv_path)


def test_unreadable_training_image_is_reported(synthetic_dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lines = (synthetic_dataset / "labels.csv").read_text().splitlines()
    rows = [lines[0]] + [
        ",".join([str(synthetic_dataset / line.split(",")[0])] + line.split(",")[1:])
        for line in lines[1:]
    ]
    (data / "broken.png").write_bytes(b"garbage")
    rows.append("broken.png,normal,PX")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="unreadable images.*broken.png"):
        train(_config(data, tmp_path, epochs=1))


def test_init_fine_tunes_in_two_phases(synthetic_dataset: Path, tmp_path: Path) -> None:
    base = train(_config(synthetic_dataset, tmp_path / "base", epochs=2)).bundle
    base_state = base.model.state_dict()
    head_keys = {"fc.weight", "fc.bias"}  # resnet10t's timm classifier head
    # phase 1 only: the backbone (weights and BatchNorm statistics) must not move
    only_head = train(
        _config(synthetic_dataset, tmp_path / "p1", epochs=1, init=base.path, head_epochs=1)
    )
    state = only_head.bundle.model.state_dict()
    for key, value in base_state.items():
        if key in head_keys:
            assert not torch.equal(state[key], value), key
        else:
            assert torch.equal(state[key], value), key
    # phases 1 + 2: everything moves, phase 2 at the lower learning rate
    both = train(
        _config(
            synthetic_dataset,
            tmp_path / "p2",
            epochs=3,
            init=base.path,
            head_epochs=1,
            finetune_lr_scale=0.1,
            arch="resnet18",  # ignored: the initial bundle's architecture is kept
        )
    )
    card = both.bundle.card
    assert card.architecture == base.card.architecture
    assert [h["phase"] for h in both.history] == [1.0, 2.0, 2.0]
    assert both.history[1]["lr"] < 0.1 * 3e-3 + 1e-12
    assert card.training["init"]["weights_sha256"] == base.card.weights_sha256
    assert "two-phase" in card.training["fine_tuning"]
    # the last epoch's weights (the bundle keeps the best epoch, which may be phase 1's)
    last = torch.load(tmp_path / "p2" / "ckpt" / CHECKPOINT_FILE, weights_only=False)["model"]
    assert not torch.equal(last["conv1.0.weight"], base_state["conv1.0.weight"])


def test_exclude_rows_by_column(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "labels.csv").write_text(
        "filename,label,patient_id,view\na.png,covid,1,PA\nb.png,covid,1,L\nc.png,non-covid,2,AP\n"
    )
    kept = read_dataset(root, {"view": ["L"]})
    assert [r.path.name for r in kept] == ["a.png", "c.png"]
    assert len(read_dataset(root)) == 3
    with pytest.raises(ValueError, match="missing columns"):
        read_dataset(root, {"projection": ["L"]})


@pytest.mark.parametrize(
    "arch",
    [
        "resnet34",
        "resnet50",
        "efficientnet_b0",
        "efficientnet_b3",
        "densenet121",
        "resnet10t",  # CPU-fast families
        "mobilenetv3_small_050",
    ],
)
def test_architecture_builds_trains_one_step_and_explains(arch: str) -> None:
    from model.explain import grad_cam
    from model.preprocess import PreprocessSpec
    from model.train import head_parameters, set_phase

    torch.manual_seed(0)
    spec = PreprocessSpec(input_size=64, channels=3)
    net = build_network(arch, spec)
    head_ids = head_parameters(net)
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    set_phase(net, head_ids, frozen_backbone=False)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).reshape(-1), y)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
    net.eval()
    probs, cams = grad_cam(net, x[:2])
    assert probs.shape == (2,) and cams.ndim == 3 and cams.shape[0] == 2
    assert np.all(cams >= 0)
