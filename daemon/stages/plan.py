"""Plan stage: read the study's headers and select, per model, the images it classifies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from daemon.models import LoadedModel
from daemon.stages.reading import PermanentProcessingError, header_of
from db.queue import ClaimedInstance, ClaimedStudy
from db.retention import purged_instances
from dicom_io.reader import ImageHeader
from dicom_io.select import OwnIdentity, SelectionRules, select_images
from dicom_io.sr import AlgorithmInfo, device_observer_uid


@dataclass(frozen=True)
class Selected:
    """A selected image: its claimed instance and its header."""

    instance: ClaimedInstance
    header: ImageHeader

    @property
    def uid(self) -> str:
        """SOP Instance UID."""
        return self.header.sop_instance_uid


@dataclass(frozen=True)
class ModelPlan:
    """The images one model classifies in a study (selection order)."""

    loaded: LoadedModel
    chosen: tuple[Selected, ...]


@dataclass(frozen=True)
class StudyPlan:
    """What the study's models will classify, and the audited selection reasons per model."""

    models: tuple[ModelPlan, ...]
    reasons: dict[str, Any]

    def images(self) -> list[Selected]:
        """Every selected image once, in first-selection order."""
        unique: dict[str, Selected] = {}
        for plan in self.models:
            for sel in plan.chosen:
                unique.setdefault(sel.uid, sel)
        return list(unique.values())

    def models_of(self, uid: str) -> list[LoadedModel]:
        """Return the models that selected image ``uid``."""
        return [p.loaded for p in self.models if any(s.uid == uid for s in p.chosen)]


def agent_info(loaded: LoadedModel) -> AlgorithmInfo:
    """Return the identity of a loaded model as written into its results."""
    card, identity = loaded.bundle.card, loaded.bundle.identity
    return AlgorithmInfo(
        name=card.name,
        version=card.version,
        manufacturer=card.manufacturer,
        weights_sha256=identity.weights_sha256,
        threshold=card.threshold,
    )


def own_identity(models: list[LoadedModel]) -> OwnIdentity:
    """Return radflag's identity in the results of ``models`` (the loop guard's input)."""
    infos = [agent_info(m) for m in models]
    return OwnIdentity(
        manufacturers=frozenset(i.manufacturer for i in infos),
        model_names=frozenset(i.name[:64] for i in infos),
        device_observer_uids=frozenset(device_observer_uid(i) for i in infos),
    )


def refuse_purged_study(sessions: sessionmaker[Session], claim: ClaimedStudy) -> None:
    """Refuse a study whose images retention already purged (re-opened by a late image).

    Classifying what is left would report on a subset of the study as if it were all of it.

    Raises
    ------
    PermanentProcessingError
        Naming how many of the study's images are gone.
    """
    purged = purged_instances(sessions, claim.study_id)
    if purged:
        raise PermanentProcessingError(
            f"study re-opened after retention purged {len(purged)} of its "
            f"{len(claim.instances)} images; not re-classified from the remaining subset"
        )


def plan_study(
    claim: ClaimedStudy, models: list[LoadedModel], rules: SelectionRules, own: OwnIdentity
) -> StudyPlan:
    """Read every instance's header and select the images of each model (``IMAGES_SELECTED``).

    Raises
    ------
    UnreadableInstance
        When a header cannot be read (permanent).
    """
    headers = [Selected(inst, header_of(inst)) for inst in claim.instances]
    by_uid = {h.uid: h for h in headers}
    plans: list[ModelPlan] = []
    reasons: dict[str, Any] = {}
    for loaded in models:
        selection = select_images([h.header for h in headers], loaded.modalities, rules, own)
        chosen = tuple(by_uid[h.sop_instance_uid] for h in selection.selected)
        reasons[loaded.bundle.card.name] = {
            "selected": [s.uid for s in chosen],
            "excluded": {hdr.sop_instance_uid: why for hdr, why in selection.excluded},
        }
        if chosen:
            plans.append(ModelPlan(loaded, chosen))
    return StudyPlan(tuple(plans), reasons)
