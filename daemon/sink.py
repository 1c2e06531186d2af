"""The listener's instance sink: commits each received instance's row before the C-STORE ack."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.proc import set_thread_role
from daemon.settings import DestinationSettings, Settings
from db.admin_actions import Target, note_study_identifiers, on_duplicate_push
from db.ingest import NewInstance, PatientIdPolicy, record_instance
from dicom_io.reader import DecodeError, read_header
from dicom_io.scp import ReceivedInstance, SinkUnavailable
from dicom_io.select import ANALYSED_SOP_CLASSES, SECONDARY_CAPTURE_SOP_CLASSES, is_result_like

log = logging.getLogger(__name__)

_IDENTIFIER_TAGS = ["AccessionNumber", "StudyDate"]
_REMEMBERED_STUDIES = 4096


def destination_targets(
    destinations: Sequence[DestinationSettings], only: str | None = None
) -> list[Target]:
    """Return the configured destinations as resend targets; ``only`` = a name or AE title.

    Raises
    ------
    ValueError
        When ``only`` names no configured destination.
    """
    chosen = [d for d in destinations if only is None or only in (d.name, d.ae_title)]
    if only is not None and not chosen:
        known = ", ".join(f"{d.name} ({d.ae_title or 'sender'})" for d in destinations) or "none"
        raise ValueError(f"no configured destination named {only!r}; configured: {known}")
    return [
        Target(name=d.name, ae_title=d.ae_title, host=d.host, port=d.port, kinds=tuple(d.outputs))
        for d in chosen
    ]


class DuplicatePushHandler:
    """Acts once per burst when a finished study is pushed again (``on_duplicate_study``).

    Every instance of a re-pushed study is a duplicate; the first one triggers the action,
    the others within ``debounce_s`` are ignored.
    """

    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], *, debounce_s: float = 60.0
    ) -> None:
        self._mode = settings.completion.on_duplicate_study
        self._targets = destination_targets(settings.destinations)
        self._results_root = Path(settings.storage.results_dir)
        self._sessions = sessions
        self._debounce_s = debounce_s
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, instance: ReceivedInstance) -> None:
        """Resend or reprocess the instance's study if it is finished (never raises)."""
        if self._mode == "ignore" or not self._first_in_burst(instance.study_instance_uid):
            return
        try:
            done = on_duplicate_push(
                self._sessions,
                instance.study_instance_uid,
                self._mode,
                self._targets,
                self._results_root,
                actor=f"dup:{instance.calling_ae}@{instance.peer_host}",
            )
        except SQLAlchemyError as exc:
            log.error("duplicate push action failed", extra={"error": type(exc).__name__})
            return
        if done:
            log.info(
                "finished study pushed again",
                extra={"study_instance_uid": instance.study_instance_uid, "action": done},
            )

    def _first_in_burst(self, study_uid: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._recent.get(study_uid)
            self._recent[study_uid] = now
            self._recent.move_to_end(study_uid)
            while len(self._recent) > _REMEMBERED_STUDIES:
                self._recent.popitem(last=False)
        return last is None or now - last > self._debounce_s


def _reopens_study(instance: ReceivedInstance) -> bool:
    """Return False for a result object (loop guard): it must not reopen a finished study.

    CR/DX/CT images always reopen; results are recognised by content (non-image SOP
    classes) or, for a Secondary Capture, by its header (:func:`dicom_io.select.is_result_like`).
    """
    sop_class = instance.sop_class_uid
    if sop_class in ANALYSED_SOP_CLASSES and sop_class not in SECONDARY_CAPTURE_SOP_CLASSES:
        return True
    if sop_class not in ANALYSED_SOP_CLASSES:
        return False
    try:
        return not is_result_like(read_header(instance.path))
    except (DecodeError, OSError):
        return True  # the worker reads it again and records why it cannot


def new_instance(instance: ReceivedInstance, stored_path: str) -> NewInstance:
    """Return the row to commit for a received instance stored at ``stored_path``."""
    return NewInstance(
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        study_instance_uid=instance.study_instance_uid,
        series_instance_uid=instance.series_instance_uid,
        modality=instance.modality,
        patient_id=instance.patient_id,
        calling_ae=instance.calling_ae,
        peer_host=instance.peer_host,
        path=stored_path,
        size_bytes=instance.size_bytes,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        reopens_study=_reopens_study(instance),
        differs_from_spooled=instance.differs_from_spooled,
    )


class DatabaseSink:
    """Implements :class:`dicom_io.scp.InstanceSink` on the radflag database.

    Parameters
    ----------
    sessions
        Session factory.
    policy
        How patient IDs are stored (keyed hash by default).
    spool_root
        The spool root; paths below it are stored relative to it (hosts sharing the spool
        may mount it at other places). None stores paths as given.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        policy: PatientIdPolicy,
        spool_root: Path | None = None,
        *,
        on_duplicate: Callable[[ReceivedInstance], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._policy = policy
        self._on_duplicate = on_duplicate
        self._noted: OrderedDict[str, None] = OrderedDict()
        self._noted_lock = threading.Lock()
        self._root = spool_root.resolve() if spool_root is not None else None

    def _stored_path(self, path: Path) -> str:
        if self._root is not None and path.resolve().is_relative_to(self._root):
            return path.resolve().relative_to(self._root).as_posix()
        return str(path)

    def store(self, instance: ReceivedInstance) -> bool:
        """Commit the instance row; True for a new instance, False for a duplicate.

        Raises
        ------
        SinkUnavailable
            When the database cannot commit (the listener answers 0xA700, PS3.4 B.2.3).
        """
        set_thread_role("listener")  # called in pynetdicom's association threads
        item = new_instance(instance, self._stored_path(instance.path))
        try:
            is_new = record_instance(self._sessions, item, self._policy)
        except SQLAlchemyError as exc:
            log.error(
                "database unavailable while recording an instance",
                extra={"error": type(exc).__name__, "sop_instance_uid": instance.sop_instance_uid},
            )
            raise SinkUnavailable(f"database error: {type(exc).__name__}") from exc
        if is_new:
            self._note_identifiers(instance)
        elif self._on_duplicate is not None:
            self._on_duplicate(instance)
        return is_new

    def _note_identifiers(self, instance: ReceivedInstance) -> None:
        """Record the study's Accession Number and Study Date once per study (best effort)."""
        uid = instance.study_instance_uid
        with self._noted_lock:
            if uid in self._noted:
                return
            self._noted[uid] = None
            while len(self._noted) > _REMEMBERED_STUDIES:
                self._noted.popitem(last=False)
        try:
            ds = dcmread(instance.path, stop_before_pixels=True, specific_tags=_IDENTIFIER_TAGS)
            note_study_identifiers(
                self._sessions,
                uid,
                str(ds.get("AccessionNumber", "") or "").strip() or None,
                str(ds.get("StudyDate", "") or "").strip() or None,
            )
        except (OSError, InvalidDicomError, SQLAlchemyError, ValueError) as exc:
            log.debug("study identifiers not recorded", extra={"error": type(exc).__name__})
