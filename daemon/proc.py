"""Which process and role a log line comes from (host, pid, process id, role).

:class:`ProcessLogFilter` adds ``host``, ``pid``, ``process_id`` and ``role`` to every log
record; a thread names its role once with :func:`set_thread_role` (worker thread, scheduled
jobs, listener handlers).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from db.cluster import ProcessIdentity, new_identity

if TYPE_CHECKING:
    from daemon.settings import Settings

_local = threading.local()


def set_thread_role(role: str) -> None:
    """Name the role (``listener``, ``worker``, ``sender``, ``scheduler``) of this thread."""
    _local.role = role


def thread_role(default: str = "main") -> str:
    """Return the role set by :func:`set_thread_role` in this thread, else ``default``."""
    return str(getattr(_local, "role", default))


class ProcessLogFilter(logging.Filter):
    """Add the process identity and the thread's role to every record (never drops one)."""

    def __init__(self, process_id: str, default_role: str = "main") -> None:
        super().__init__()
        self.process_id = process_id
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.default_role = default_role

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate ``record``; always True."""
        record.process_id = self.process_id
        record.host = self.host
        record.pid = self.pid
        if not hasattr(record, "role"):
            record.role = thread_role(self.default_role)
        return True


def install_log_filter(process_id: str, default_role: str) -> ProcessLogFilter:
    """Attach a :class:`ProcessLogFilter` to every handler of the root logger."""
    flt = ProcessLogFilter(process_id, default_role)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    return flt


def remove_log_filter(flt: logging.Filter) -> None:
    """Detach ``flt`` from every handler of the root logger (on stop)."""
    for handler in logging.getLogger().handlers:
        handler.removeFilter(flt)


def serve_identity(settings: Settings, roles: Sequence[str]) -> ProcessIdentity:
    """Return a new identity for a ``radflag serve`` process of this configuration."""
    lst = settings.listener
    return new_identity(roles, f"{lst.ae_title}:{lst.port}:{settings.storage.spool_dir}")
