"""Outbox entries of a result: one per destination and output kind, and IOCM rejection notes."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from daemon.settings import TRANSFER_SYNTAXES, Settings
from daemon.stages.payloads import Payloads
from db.queue import ClaimedStudy
from db.results import OutputRecord, PriorRevision, study_sender
from dicom_io.kos import build_rejection_note
from dicom_io.reader import read_dataset
from dicom_io.spool import Spool
from dicom_io.sr import AlgorithmInfo, model_identity


@dataclass
class Queued:
    """Outbox entries, and why some were not queued (audited as ``output_problems``)."""

    records: list[OutputRecord] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)


class OutputPlanner:
    """Turn written payloads into outbox entries for the configured destinations.

    Parameters
    ----------
    settings
        Destinations.
    sessions
        Session factory (the study's sender, for ``to_sender`` destinations).
    results
        The results spool (payload paths are stored relative to it).
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], results: Spool):
        self._settings = settings
        self._sessions = sessions
        self._results = results

    def outputs(self, claim: ClaimedStudy, payloads: Payloads, model_name: str) -> Queued:
        """One outbox entry per destination and output kind (PS3.4 B: one C-STORE each)."""
        queued = Queued()
        sender: tuple[str | None, str | None] | None = None
        for dest in self._settings.destinations:
            ae_title, host = dest.ae_title, dest.host
            if dest.to_sender:
                if sender is None:
                    sender = study_sender(self._sessions, claim.study_id)
                ae_title = ae_title or (sender[0] or claim.calling_ae or "")
                host = host or (sender[1] or "")
                if not ae_title or not host:
                    queued.problems[f"{model_name}:{dest.name}"] = (
                        "sender AE title or address unknown; nothing queued for this destination"
                    )
                    continue
            syntax = TRANSFER_SYNTAXES[dest.transfer_syntax]
            comprehensive_sr = dest.sr_sop_class == "comprehensive"
            for kind in dest.outputs:
                payload = payloads.variant(kind, syntax, comprehensive_sr=comprehensive_sr)
                if payload is None:
                    continue  # SC not built: the reason is in the problems (audited)
                sop_uid, path = payload
                queued.records.append(
                    OutputRecord(
                        destination=dest.name,
                        ae_title=ae_title,
                        host=host,
                        port=dest.port,
                        kind=kind,
                        sop_instance_uid=sop_uid,
                        payload_path=self._results.relative(path),
                    )
                )
        return queued

    def rejection_notes(
        self, claim: ClaimedStudy, algorithm: AlgorithmInfo, replaced: PriorRevision
    ) -> Queued:
        """IOCM rejection notes (KOS) for destinations with ``supersede = "iocm_reject"``.

        Each such destination gets one note rejecting the objects of the replaced revision it
        received (IHE RAD TF-3 4.66); the note's UIDs derive from the rejected instances.
        """
        queued = Queued()
        for dest in self._settings.destinations:
            sent = replaced.sent.get(dest.name, [])
            if dest.supersede != "iocm_reject" or not sent:
                continue
            try:
                rejected = [
                    read_dataset(self._results.resolve(o.payload_path), with_pixels=False)
                    for o in sent
                ]
                kos = build_rejection_note(
                    rejected, model_identity(algorithm), algorithm.manufacturer
                )
                path = self._results.path_for(
                    claim.study_instance_uid, str(kos.SeriesInstanceUID), str(kos.SOPInstanceUID)
                )
                self._results.write(kos, kos.file_meta, path)
            except Exception as exc:  # noqa: BLE001 - e.g. purged by retention; reason audited
                queued.problems[f"{algorithm.name}:{dest.name}:KOS"] = (
                    f"{type(exc).__name__}: {exc}"
                )
                continue
            queued.records.append(
                OutputRecord(
                    destination=dest.name,
                    ae_title=sent[0].ae_title,
                    host=sent[0].host,
                    port=sent[0].port,
                    kind="KOS",
                    sop_instance_uid=str(kos.SOPInstanceUID),
                    payload_path=self._results.relative(path),
                )
            )
        return queued
