"""The listener's instance sink: commits each received instance's row before the C-STORE ack."""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.ingest import NewInstance, PatientIdPolicy, record_instance
from dicom_io.reader import DecodeError, read_header
from dicom_io.scp import ReceivedInstance, SinkUnavailable
from dicom_io.select import ANALYSED_SOP_CLASSES, SECONDARY_CAPTURE_SOP_CLASSES, is_result_like

log = logging.getLogger(__name__)


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


class DatabaseSink:
    """Implements :class:`dicom_io.scp.InstanceSink` on the radflag database.

    Parameters
    ----------
    sessions
        Session factory.
    policy
        How patient IDs are stored (keyed hash by default).
    """

    def __init__(self, sessions: sessionmaker[Session], policy: PatientIdPolicy) -> None:
        self._sessions = sessions
        self._policy = policy

    def store(self, instance: ReceivedInstance) -> bool:
        """Commit the instance row; True for a new instance, False for a duplicate.

        Raises
        ------
        SinkUnavailable
            When the database cannot commit (the listener answers 0xA700, PS3.4 B.2.3).
        """
        item = NewInstance(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            study_instance_uid=instance.study_instance_uid,
            series_instance_uid=instance.series_instance_uid,
            modality=instance.modality,
            patient_id=instance.patient_id,
            calling_ae=instance.calling_ae,
            peer_host=instance.peer_host,
            path=str(instance.path),
            size_bytes=instance.size_bytes,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            reopens_study=_reopens_study(instance),
        )
        try:
            return record_instance(self._sessions, item, self._policy)
        except SQLAlchemyError as exc:
            log.error(
                "database unavailable while recording an instance",
                extra={"error": type(exc).__name__, "sop_instance_uid": instance.sop_instance_uid},
            )
            raise SinkUnavailable(f"database error: {type(exc).__name__}") from exc
