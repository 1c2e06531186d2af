"""The plan, prepare and classify stages alone (issue 15), without a database or a network."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import daemon.stages.reading
from daemon.models import LoadedModel
from daemon.pipeline import StudyProcessor
from daemon.stages.finish import Finisher
from daemon.stages.heatmap import heatmap_picture, key_image
from daemon.stages.inputs import model_input
from daemon.stages.plan import Selected, own_identity, plan_study
from daemon.stages.prepare import PrepareProcessDied, Preparer, prepare_image
from daemon.stages.reading import UnreadableInstance
from daemon.stages.verdict import gate_key, judge
from db.queue import ClaimedInstance, ClaimedStudy
from dicom_io.reader import read_image
from dicom_io.spool import Spool
from model.infer import ImagePrediction, aggregate_study
from model.preprocess import preprocess
from tests.daemon.conftest import make_settings
from tests.dicom_io.conftest import make_dx, save


def _study(tmp_path: Path, n: int, first_seed: int = 0, **dx: Any) -> ClaimedStudy:
    """A claimed study of ``n`` small DX instances written to ``tmp_path``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    instances = []
    for i in range(n):
        ds = make_dx(study_uid=study_uid, seed=first_seed + i, **dx)
        path = save(ds, tmp_path / f"{i:04d}.dcm")
        instances.append(
            ClaimedInstance(i, str(ds.SOPInstanceUID), str(ds.SOPClassUID), "DX", str(path))
        )
    return ClaimedStudy(1, study_uid, "test", datetime.now(UTC), 1, None, tuple(instances))


def _jobs(
    tmp_path: Path, claim: ClaimedStudy, models: list[LoadedModel]
) -> list[tuple[Selected, list[LoadedModel]]]:
    """The prepare jobs of ``claim``'s images as planned for the first model."""
    rules = make_settings(tmp_path, 1).selection.to_rules()
    plan = plan_study(claim, models, rules, own_identity(models))
    return [(sel, models) for sel in plan.models[0].chosen]


def _processor(tmp_path: Path, models: list[LoadedModel], **worker: Any) -> StudyProcessor:
    settings = make_settings(tmp_path, 1, worker={"device": "cpu", **worker})
    sessions = sessionmaker(create_engine(f"sqlite:///{tmp_path / 'unused.db'}"))
    return StudyProcessor(
        settings, sessions, Spool(tmp_path / "spool"), Spool(tmp_path / "results"), models
    )


class DecodedCounter:
    """Counts decoded images alive at once (each is freed when its last reference goes)."""

    def __init__(self) -> None:
        self.alive = 0
        self.peak = 0
        self.total = 0
        self._lock = threading.Lock()

    def read_image(self, path: Path) -> Any:
        image = read_image(path)
        with self._lock:
            self.alive += 1
            self.total += 1
            self.peak = max(self.peak, self.alive)
        weakref.finalize(image, self._freed)
        return image

    def _freed(self) -> None:
        with self._lock:
            self.alive -= 1


def test_a_500_image_study_never_holds_more_decoded_images_than_configured(
    tmp_path: Path, tiny_models: list[LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = DecodedCounter()
    monkeypatch.setattr(daemon.stages.reading, "read_image", counter.read_image)
    claim = _study(tmp_path, 500)
    processor = _processor(tmp_path, tiny_models, prepare_threads=2, max_pending_images=16)
    try:
        plan = plan_study(claim, tiny_models, processor._rules, own_identity(tiny_models))
        classified = processor.classify(plan)
    finally:
        processor.close()
    (predictions,) = classified.predictions.values()
    assert counter.total == 500 and len(predictions) == 500
    assert counter.peak <= 2, counter.peak  # prepare_threads, not the study's size
    assert classified.kept == {}
    # spot-check that each prediction is its own image's (no mix-up in the batcher)
    clf = tiny_models[0].classifier
    for k in (0, 137, 499):
        sel = plan.models[0].chosen[k]
        pixels, meta = model_input(read_image(Path(sel.instance.path)))
        alone = clf.classify_prepared([preprocess(pixels, meta, clf.spec)])[0]
        assert predictions[k].probability == pytest.approx(alone.probability, abs=1e-5)


@pytest.mark.parametrize("outputs", [["SR", "SC"], ["SR"]])
def test_one_image_study_keeps_its_decoded_image_only_when_a_picture_is_wanted(
    tmp_path: Path, tiny_models: list[LoadedModel], outputs: list[str]
) -> None:
    claim = _study(tmp_path, 1)
    processor = _processor(tmp_path, tiny_models)
    dest = processor._settings.destinations[0].model_copy(update={"outputs": outputs})
    settings = processor._settings.model_copy(update={"destinations": [dest]})
    processor.close()
    processor = StudyProcessor(
        settings, sessionmaker(), Spool(tmp_path / "s"), Spool(tmp_path / "r"), tiny_models
    )
    try:
        plan = plan_study(claim, tiny_models, processor._rules, own_identity(tiny_models))
        classified = processor.classify(plan)
    finally:
        processor.close()
    wanted = [claim.instances[0].sop_instance_uid] if "SC" in outputs else []
    assert list(classified.kept) == wanted


@pytest.mark.parametrize("processes", [0, 2], ids=["threads", "processes"])
def test_prepare_stream_keeps_order_and_raises_an_unreadable_image_at_its_turn(
    tmp_path: Path, tiny_models: list[LoadedModel], processes: int
) -> None:
    claim = _study(tmp_path, 6)
    rules = make_settings(tmp_path, 1).selection.to_rules()
    plan = plan_study(claim, tiny_models, rules, own_identity(tiny_models))
    Path(claim.instances[4].path).write_bytes(b"not dicom at all")  # lost after the plan
    jobs = [(sel, tiny_models) for sel in plan.models[0].chosen]
    preparer = Preparer(threads=3, processes=processes)
    seen: list[str] = []
    with pytest.raises(UnreadableInstance) as raised:
        for prepared in preparer.stream(jobs, keep=False):
            seen.append(prepared.selected.instance.sop_instance_uid)
    preparer.close()
    assert seen == [i.sop_instance_uid for i in claim.instances[:4]]
    assert raised.value.instance == claim.instances[4] and raised.value.what == "pixel data"


def test_prepare_processes_give_the_threads_inputs_and_keep_pictures_local(
    tmp_path: Path, tiny_models: list[LoadedModel]
) -> None:
    claim = _study(tmp_path, 3)
    jobs = _jobs(tmp_path, claim, tiny_models)
    threads, procs = Preparer(threads=1), Preparer(threads=1, processes=1)
    try:
        local = list(threads.stream(jobs, keep=False))
        remote = list(procs.stream(jobs, keep=False))
        kept = list(procs.stream(jobs[:1], keep=True))  # a picture needs the decoded image
    finally:
        threads.close()
        procs.close()
    name = tiny_models[0].bundle.card.name
    for a, b in zip(local, remote, strict=True):
        assert a.selected == b.selected and a.grayscale_notes == b.grayscale_notes
        np.testing.assert_array_equal(a.inputs[name], b.inputs[name])
    assert all(r.decoded is None for r in remote) and kept[0].decoded is not None


def test_a_dead_prepare_process_is_a_transient_error_and_the_pool_restarts(
    tmp_path: Path, tiny_models: list[LoadedModel]
) -> None:
    claim = _study(tmp_path, 2)
    jobs = _jobs(tmp_path, claim, tiny_models)
    preparer = Preparer(threads=1, processes=1)
    try:
        for child in multiprocessing.active_children():  # e.g. killed for memory
            os.kill(child.pid or 0, signal.SIGKILL)
            child.join(10)
        with pytest.raises(PrepareProcessDied) as raised:
            list(preparer.stream(jobs, keep=False))
        assert isinstance(raised.value, daemon.stages.reading.TRANSIENT_ERRORS)  # retried
        assert len(list(preparer.stream(jobs, keep=False))) == 2  # a fresh pool
    finally:
        preparer.close()


def test_prepare_image_drops_the_decoded_image_unless_kept(
    tmp_path: Path, tiny_models: list[LoadedModel]
) -> None:
    claim = _study(tmp_path, 1)
    plan = plan_study(
        claim,
        tiny_models,
        make_settings(tmp_path, 1).selection.to_rules(),
        own_identity(tiny_models),
    )
    sel = plan.models[0].chosen[0]
    dropped = prepare_image(sel, tiny_models, keep=False)
    kept = prepare_image(sel, tiny_models, keep=True)
    assert dropped.decoded is None and kept.decoded is not None
    name = tiny_models[0].bundle.card.name
    np.testing.assert_array_equal(dropped.inputs[name], kept.inputs[name])
    spec = tiny_models[0].classifier.spec
    assert dropped.inputs[name].shape == (spec.channels, spec.input_size, spec.input_size)


def test_plan_selects_per_model_and_audits_exclusions(
    tmp_path: Path, tiny_models: list[LoadedModel]
) -> None:
    claim = _study(tmp_path, 2)
    lateral = make_dx(study_uid=claim.study_instance_uid, seed=9, ViewPosition="LL")
    path = save(lateral, tmp_path / "lateral.dcm")
    extra = ClaimedInstance(
        9, str(lateral.SOPInstanceUID), str(lateral.SOPClassUID), "DX", str(path)
    )
    claim = ClaimedStudy(
        1, claim.study_instance_uid, "t", claim.lease_expires_at, 1, None, (*claim.instances, extra)
    )
    rules = make_settings(tmp_path, 1).selection.to_rules()
    plan = plan_study(claim, tiny_models, rules, own_identity(tiny_models))
    reasons = plan.reasons[tiny_models[0].bundle.card.name]
    assert reasons["selected"] == [i.sop_instance_uid for i in claim.instances[:2]]
    assert list(reasons["excluded"]) == [extra.sop_instance_uid]
    assert [s.uid for s in plan.images()] == reasons["selected"]


@pytest.mark.parametrize("gate", [True, False])
def test_verdict_applies_or_only_audits_the_gate(
    tmp_path: Path, tiny_models: list[LoadedModel], gate: bool
) -> None:
    claim = _study(tmp_path, 3)
    rules = make_settings(tmp_path, 1).selection.to_rules()
    plan = plan_study(claim, tiny_models, rules, own_identity(tiny_models))
    rng = np.random.default_rng(3)
    probs = rng.random(3)
    preds = [
        ImagePrediction(float(p), bool(p >= 0.5), "out of domain" if k == 1 else None)
        for k, p in enumerate(probs)
    ]
    verdict, rejected = judge(plan.models[0], preds, gate, infer_ms=1.0)
    uids = [s.uid for s in plan.models[0].chosen]
    assert rejected == {uids[1]: "out of domain"}
    assert gate_key(gate) == ("not_applicable" if gate else "applicability_gate_ignored")
    assert verdict is not None
    kept = [0, 2] if gate else [0, 1, 2]
    assert list(verdict.per_image) == [uids[k] for k in kept]
    card = tiny_models[0].bundle.card
    assert verdict.probability == aggregate_study([probs[k] for k in kept], card.aggregation)
    assert verdict.key().uid == uids[max(kept, key=lambda k: probs[k])]
    refused = [ImagePrediction(0.9, True, "no") for _ in preds]
    none, all_rejected = judge(plan.models[0], refused, True, 1.0)
    assert none is None and set(all_rejected) == set(uids)


@pytest.mark.parametrize(
    ("outputs", "heatmaps", "expected"),
    [
        (["SR", "SC"], "all", (True, True)),
        (["SR", "SC"], "positive", (False, True)),
        (["SR"], "all", (False, False)),
    ],
)
def test_heatmap_pictures_for_all_or_only_positive_studies(
    tmp_path: Path,
    tiny_models: list[LoadedModel],
    outputs: list[str],
    heatmaps: str,
    expected: tuple[bool, bool],
) -> None:
    settings = make_settings(tmp_path, 1, worker={"heatmaps": heatmaps})
    dest = settings.destinations[0].model_copy(update={"outputs": outputs})
    settings = settings.model_copy(update={"destinations": [dest]})
    finisher = Finisher(settings, sessionmaker(), Spool(tmp_path / "r"), {})
    assert (finisher.wants_picture(False), finisher.wants_picture(True)) == expected


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_worker_device_accepts_cuda_n(tmp_path: Path, device: str) -> None:
    assert make_settings(tmp_path, None, worker={"device": device}).worker.device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU0"])
def test_worker_device_rejects_unknown_devices(tmp_path: Path, device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        make_settings(tmp_path, None, worker={"device": device})


def test_studies_in_flight_share_the_model_batches(
    tmp_path: Path, tiny_models: list[LoadedModel]
) -> None:
    """Three one-image studies classified from three threads go through fewer batches."""
    claims = [_study(tmp_path / f"s{k}", 1, first_seed=10 * k) for k in range(3)]
    processor = _processor(tmp_path, tiny_models, batch_latency_ms=1000)
    rules, own = processor._rules, own_identity(tiny_models)
    results: dict[int, float] = {}

    def one(k: int) -> None:
        plan = plan_study(claims[k], tiny_models, rules, own)
        (preds,) = processor.classify(plan).predictions.values()
        results[k] = preds[0].probability

    threads = [threading.Thread(target=one, args=(k,)) for k in range(3)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        (runner,) = processor.runners.values()
        assert runner.classify.items == 3 and runner.classify.batches < 3
    finally:
        processor.close()
    clf = tiny_models[0].classifier
    for k, claim in enumerate(claims):
        pixels, meta = model_input(read_image(Path(claim.instances[0].path)))
        alone = clf.classify_prepared([preprocess(pixels, meta, clf.spec)])[0].probability
        assert results[k] == pytest.approx(alone, abs=1e-5)
    assert len({round(p, 6) for p in results.values()}) == 3  # a mix-up would show


def test_heatmap_picture_uses_the_cam_of_the_classify_pass(
    tmp_path: Path, tiny_models: list[LoadedModel]
) -> None:
    """With SC wanted, no second forward: the picture equals the two-pass one."""
    claim = _study(tmp_path / "s", 1)
    settings = make_settings(tmp_path, 1, worker={"device": "cpu"})
    dest = settings.destinations[0].model_copy(update={"outputs": ["SR", "SC"]})
    settings = settings.model_copy(update={"destinations": [dest]})
    sessions = sessionmaker(create_engine(f"sqlite:///{tmp_path / 'unused.db'}"))
    processor = StudyProcessor(
        settings, sessions, Spool(tmp_path / "spool"), Spool(tmp_path / "results"), tiny_models
    )
    try:
        plan = plan_study(claim, tiny_models, processor._rules, own_identity(tiny_models))
        classified = processor.classify(plan)
        (preds,) = classified.predictions.values()
        assert preds[0].cam is not None
        verdict, _ = judge(plan.models[0], preds, False, 0.0)
        assert verdict is not None and set(verdict.cams) == {verdict.key().uid}
        (runner,) = processor.runners.values()
        key = key_image(verdict, classified.kept)
        single = heatmap_picture(verdict, key, runner)
        assert runner.heatmap.items == 0  # no second forward pass
        two_pass = heatmap_picture(dataclasses.replace(verdict, cams={}), key, runner)
        assert runner.heatmap.items == 1
    finally:
        processor.close()
    np.testing.assert_array_equal(single.display, two_pass.display)
    np.testing.assert_allclose(single.heatmap, two_pass.heatmap, atol=1e-5)


def test_four_studies_in_flight_fill_batches_and_bound_kept_images(
    tmp_path: Path, tiny_models: list[LoadedModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four one-image SR+SC studies in flight at once (the setting suggested with SC).

    Their images share batches, and decoded images alive stay within the prepare threads
    plus one kept per study in flight (not the number of studies queued).
    """
    worker = {"device": "cpu", "batch_latency_ms": 1000, "studies_in_flight": 4}
    settings = make_settings(tmp_path, 1, worker=worker)
    in_flight = settings.worker.studies_in_flight
    dest = settings.destinations[0].model_copy(update={"outputs": ["SR", "SC"]})
    settings = settings.model_copy(update={"destinations": [dest]})
    counter = DecodedCounter()
    monkeypatch.setattr(daemon.stages.reading, "read_image", counter.read_image)
    claims = [_study(tmp_path / f"s{k}", 1, first_seed=10 * k) for k in range(in_flight)]
    processor = StudyProcessor(
        settings, sessionmaker(), Spool(tmp_path / "s"), Spool(tmp_path / "r"), tiny_models
    )
    kept: dict[int, int] = {}
    start = threading.Barrier(in_flight)

    def one(k: int) -> None:
        plan = plan_study(claims[k], tiny_models, processor._rules, own_identity(tiny_models))
        start.wait(timeout=30)
        kept[k] = len(processor.classify(plan).kept)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(in_flight)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        (runner,) = processor.runners.values()
        assert runner.classify.items == in_flight and runner.classify.batches < in_flight
    finally:
        processor.close()
    assert kept == dict.fromkeys(range(in_flight), 1)  # each keeps its image for its picture
    assert counter.peak <= settings.worker.prepare_threads + in_flight, counter.peak
