"""The listener's instance sink: commits each received instance's row before the C-STORE ack."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.proc import set_thread_role
from db.ingest import NewInstance, PatientIdPolicy, record_instance
from dicom_io.scp import ReceivedInstance, SinkUnavailable
from dicom_io.select import is_never_classified

log = logging.getLogger(__name__)


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
    ) -> None:
        self._sessions = sessions
        self._policy = policy
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
        item = NewInstance(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            study_instance_uid=instance.study_instance_uid,
            series_instance_uid=instance.series_instance_uid,
            modality=instance.modality,
            patient_id=instance.patient_id,
            calling_ae=instance.calling_ae,
            peer_host=instance.peer_host,
            path=self._stored_path(instance.path),
            size_bytes=instance.size_bytes,
            transfer_syntax_uid=instance.transfer_syntax_uid,
            reopens_study=not is_never_classified(instance.sop_class_uid),
            differs_from_spooled=instance.differs_from_spooled,
        )
        try:
            return record_instance(self._sessions, item, self._policy)
        except SQLAlchemyError as exc:
            log.error(
                "database unavailable while recording an instance",
                extra={"error": type(exc).__name__, "sop_instance_uid": instance.sop_instance_uid},
            )
            raise SinkUnavailable(f"database error: {type(exc).__name__}") from exc
