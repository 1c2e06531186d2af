"""Verdict stage: apply the applicability gate and aggregate a model's image predictions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from daemon.models import LoadedModel
from daemon.stages.plan import ModelPlan, Selected
from dicom_io.sr import FindingResult
from model.infer import ImagePrediction, aggregate_study


@dataclass(frozen=True)
class ModelVerdict:
    """One model's answer for a study.

    Attributes
    ----------
    loaded
        The model.
    chosen
        The images the answer rests on (after the gate, when it applies).
    per_image
        Probability per SOP Instance UID of ``chosen``.
    probability, positive
        The card's study-level aggregation and its threshold decision.
    infer_ms
        Wait for the predictions once the last input was queued (the preparation of the
        images, overlapped with inference, is timed as ``decode``).
    cams
        Raw Grad-CAM map per SOP Instance UID of ``chosen``, where the classify pass
        computed them (heatmap pictures wanted), else empty.
    """

    loaded: LoadedModel
    chosen: tuple[Selected, ...]
    per_image: dict[str, float]
    probability: float
    positive: bool
    infer_ms: float
    cams: Mapping[str, npt.NDArray[np.float32]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def key(self) -> Selected:
        """Return the key image: the top probability (the heatmap picture's source)."""
        return max(self.chosen, key=lambda sel: self.per_image[sel.uid])

    def finding(self) -> FindingResult:
        """Return the finding as the SR/SC state it."""
        card = self.loaded.bundle.card
        return FindingResult(
            code_value=card.finding.value,
            code_scheme=card.finding.scheme,
            code_meaning=card.finding.meaning,
            probability=self.probability,
            present=self.positive,
        )


def judge(
    plan: ModelPlan, predictions: Sequence[ImagePrediction], gate: bool, infer_ms: float
) -> tuple[ModelVerdict | None, dict[str, str]]:
    """Return the model's verdict (None when the gate refused every image) and gate verdicts.

    With ``gate`` on, refused images are dropped; off, they are classified all the same
    and the gate's verdicts are only returned (for the audit).
    """
    pairs = list(zip(plan.chosen, predictions, strict=True))
    rejected = {s.uid: p.not_applicable for s, p in pairs if p.not_applicable is not None}
    if gate:
        pairs = [(s, p) for s, p in pairs if p.not_applicable is None]
    if not pairs:
        return None, rejected
    card = plan.loaded.bundle.card
    per_image = {s.uid: float(p.probability) for s, p in pairs}
    probability = aggregate_study(list(per_image.values()), card.aggregation)
    verdict = ModelVerdict(
        loaded=plan.loaded,
        chosen=tuple(s for s, _ in pairs),
        per_image=per_image,
        probability=probability,
        positive=probability >= card.threshold,
        infer_ms=infer_ms,
        cams={s.uid: p.cam for s, p in pairs if p.cam is not None},
    )
    return verdict, rejected


def gate_key(gate: bool) -> str:
    """Audit key of the gate's verdicts: refused (gate on) or only noted (gate off)."""
    return "not_applicable" if gate else "applicability_gate_ignored"
