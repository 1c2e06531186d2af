"""Process lifecycle: wire the database, models, listener, scheduler and worker together.

A process runs any subset of the roles ``listener``, ``worker``, ``sender`` and ``scheduler``
(``radflag serve --roles``; default all); each role is safe to run in several processes on
several hosts sharing one PostgreSQL database and one spool/results store. Every process
registers in the process registry (:mod:`db.cluster`) and renews its heartbeat by the database
clock; on start it reclaims at once the studies of its own dead previous incarnations.
Scheduled jobs that must run once per cluster (completion, lease expiry, reclaim of dead
processes, retention) take a PostgreSQL advisory lock (:mod:`db.locks`).

Nothing on the path of an idle study waits for a polling tick: the listener arms the study's
quiet-period deadline (:mod:`daemon.readiness`), which readies it and wakes the worker on
time; once the worker has recorded it, the sender's round starts at once
(:mod:`daemon.sendloop`). The periodic jobs stay as the cluster-wide fallback.

Start order: database schema check -> models loaded (warm) -> scheduler and worker -> listener
(accepting associations last). Stop order is the reverse: stop accepting associations and let
the ones in flight finish, stop the scheduler, let the worker finish its study, hand any lease
back to the queue. Everything is in the database, so the next start resumes where this one
stopped: RECEIVING studies complete, READY studies are classified, pending sends go out.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.delivery import Sender
from daemon.http.server import HttpServer, start_http_server
from daemon.metrics import (
    CountingSink,
    ObservedProcessor,
    PipelineMetrics,
    observe_delivery_round,
)
from daemon.models import LoadedModel, load_models
from daemon.pipeline import StudyProcessor
from daemon.proc import install_log_filter, remove_log_filter, serve_identity, set_thread_role
from daemon.readiness import ArmingSink, DeadlinePolicy, ReadinessTimer, ReadyQuietStudies
from daemon.retention import purge_spool
from daemon.sendloop import KickAfter, RoundLoop
from daemon.settings import Settings
from daemon.sink import DatabaseSink, DuplicatePushHandler
from daemon.versions import warn_version_drift
from daemon.warmup import warm_up_sr_encoder
from daemon.worker import Worker
from db.admin_models import ModelIdentity, record_models_in_use
from db.audit import AuditEventType, audit, set_audit_process
from db.cluster import (
    ROLES,
    ProcessIdentity,
    heartbeat,
    mark_stopped,
    reclaim_dead,
    register,
    relativize_instance_paths,
)
from db.engine import make_engine, make_session_factory
from db.ingest import PatientIdPolicy
from db.locks import cluster_singleton
from db.models import utcnow
from db.queue import expire_leases, mark_ready, release_own_leases
from db.schema import ensure_schema
from dicom_io.scp import Listener, ListenerConfig, ListenerEventKind
from dicom_io.spool import Spool

log = logging.getLogger(__name__)

TEMP_FILE_MAX_AGE_S = 3600.0
"""Age (mtime) after which a spool temporary file is a crash's leftover, and sweep period."""

_LISTENER_AUDIT: dict[str, AuditEventType] = {
    ListenerEventKind.ASSOCIATION_REJECTED.value: AuditEventType.ASSOCIATION_REJECTED,
    ListenerEventKind.STORE_FAILED.value: AuditEventType.INSTANCE_REJECTED,
}


def pseudonym_key(settings: Settings) -> bytes:
    """Return the HMAC key for patient IDs: configured, else a key file beside the spool.

    The key file is created once (0600) so that the same patient maps to the same key across
    restarts.
    """
    if settings.privacy.pseudonym_key:
        return settings.privacy.pseudonym_key.encode("utf-8")
    key_file = settings.storage.spool_dir.parent / "pseudonym.key"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_file.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        key = secrets.token_hex(32).encode("ascii")
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


class Radflag:
    """The running gateway.

    Parameters
    ----------
    settings
        Validated settings.
    models
        Already-loaded models (tests inject them); loaded from the settings when None.
    roles
        The roles this process runs (default: all of :data:`db.cluster.ROLES`).
    """

    def __init__(
        self,
        settings: Settings,
        models: list[LoadedModel] | None = None,
        roles: Sequence[str] = ROLES,
        identity: ProcessIdentity | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity or serve_identity(settings, roles)
        self.roles = self.identity.roles
        self.worker_id = self.identity.id
        self._log_filter: logging.Filter | None = install_log_filter(
            self.worker_id, ",".join(self.roles)
        )
        self.engine: Engine = make_engine(settings.database.url)
        ensure_schema(self.engine, create_if_empty=settings.database.auto_create)
        self.sessions: sessionmaker[Session] = make_session_factory(self.engine)
        self.metrics = PipelineMetrics(self.sessions)
        self.spool = Spool(settings.storage.spool_dir)
        self.results = Spool(settings.storage.results_dir)
        self.models = (
            models
            if models is not None
            else load_models(
                settings.models.bundles,
                settings.worker.device,
                settings.worker.batch_size,
                settings.worker.torch_threads,
            )
            if "worker" in self.roles
            else []
        )
        policy = PatientIdPolicy(
            key=pseudonym_key(settings), store_clear=settings.privacy.store_patient_id_in_clear
        )
        self.processor = StudyProcessor(
            settings, self.sessions, self.spool, self.results, self.models
        )
        self.send_loop = RoundLoop(self.deliver, settings.delivery.check_interval_s)
        """Sender rounds: periodic, and at once after a study is recorded (``sender`` role)."""
        quiet_s = settings.completion.quiet_period_s
        self.readiness = ReadinessTimer(
            DeadlinePolicy(quiet_period_s=quiet_s),
            ReadyQuietStudies(self.engine, self.sessions, quiet_s, self._on_ready),
        )
        """Per-study quiet-period deadlines armed by this process's listener."""
        self.worker = Worker(
            self.worker_id,
            self.sessions,
            ObservedProcessor(KickAfter(self.processor, self._kick_sender), self.metrics),
            lease_s=settings.worker.lease_s,
            poll_interval_s=settings.worker.poll_interval_s,
            heartbeat_interval_s=settings.worker.heartbeat_interval_s,
            spool_root=self.spool.root,
            studies_in_flight=settings.worker.studies_in_flight,
        )
        lst = settings.listener
        self.listener = Listener(
            ListenerConfig(
                ae_title=lst.ae_title,
                host=lst.host,
                port=lst.port,
                allowed_calling_aes=tuple(lst.allowed_calling_aes),
                max_associations=lst.max_associations,
                max_associations_per_peer=lst.max_associations_per_peer,
                max_pdu_bytes=lst.max_pdu_bytes,
                acse_timeout_s=lst.acse_timeout_s,
                dimse_timeout_s=lst.dimse_timeout_s,
                network_timeout_s=lst.network_timeout_s,
                min_free_bytes=lst.min_free_disk_mb * 1024 * 1024,
                tls=lst.tls.to_server_tls(),
            ),
            self.spool,
            CountingSink(
                ArmingSink(
                    DatabaseSink(
                        self.sessions,
                        policy,
                        on_duplicate=DuplicatePushHandler(settings, self.sessions),
                        spool_root=self.spool.root,
                    ),
                    self.readiness.arm,
                ),
                self.metrics,
            ),
            on_event=self.on_listener_event,
        )
        tls_names = [d.name for d in settings.destinations if d.tls]
        client_tls = settings.delivery.tls.to_client_tls().context() if tls_names else None
        self._delivery_tls = {name: client_tls for name in tls_names if client_tls is not None}
        self.sender = Sender(
            self.sessions, settings.delivery, self.results, self.worker_id, self._delivery_tls
        )
        self.sender.notify_free(self._kick_sender)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._stopped = threading.Event()
        self._started = False
        self.http: HttpServer | None = None
        self.warnings: list[str] = []
        """Start-up warnings (no reachable destination): logged, on the dashboard, /readyz."""

    def on_listener_event(self, kind: str, detail: dict[str, Any]) -> None:
        """Audit what the listener refused (rejected associations, failed C-STOREs).

        Called from pynetdicom's threads; best effort: when the database itself is what failed,
        the event is logged instead.
        """
        self.metrics.listener_event(kind)
        event = _LISTENER_AUDIT.get(kind)
        if event is None:
            return
        actor = f"scp:{detail.get('calling_ae', '?')}@{detail.get('peer_host', '?')}"
        try:
            with self.sessions.begin() as session:
                audit(
                    session,
                    event,
                    actor=actor,
                    study_instance_uid=detail.get("study_instance_uid"),
                    sop_instance_uid=detail.get("sop_instance_uid"),
                    detail={k: v for k, v in detail.items() if k != "patient_id"},
                )
        except SQLAlchemyError as exc:
            log.error(
                "could not audit a listener event",
                extra={"kind": kind, "error": type(exc).__name__},
            )

    # -- scheduled jobs -------------------------------------------------------------------
    def complete_studies(self) -> None:
        """Scheduled, once per cluster: ready quiet studies, expire leases, reclaim the dead.

        Wakes the local worker when something became ready.
        """
        set_thread_role("scheduler")
        with cluster_singleton(self.engine, "complete_studies") as mine:
            if not mine:
                return
            worker = self.settings.worker
            ready = mark_ready(self.sessions, self.settings.completion.quiet_period_s)
            expired = expire_leases(
                self.sessions,
                max_attempts=worker.max_attempts,
                actor=f"scheduler:{self.worker_id}",
            )
            reclaimed = reclaim_dead(
                self.sessions,
                self.identity,
                lease_s=worker.lease_s,
                max_attempts=worker.max_attempts,
            )
        if ready or expired or reclaimed:
            log.info(
                "studies ready",
                extra={
                    "ready": len(ready),
                    "leases_expired": len(expired),
                    "reclaimed": len(reclaimed),
                },
            )
            if "worker" in self.roles:
                self.worker.wake()

    def _on_ready(self, ready: list[str]) -> None:
        """Studies became READY at their deadline: wake the local worker."""
        log.info("studies ready", extra={"ready": len(ready), "trigger": "deadline"})
        if "worker" in self.roles:
            self.worker.wake()

    def _kick_sender(self) -> None:
        """Start a sender round now: outbox rows were just committed or a slot freed."""
        if "sender" in self.roles:
            self.send_loop.kick()

    def beat(self) -> None:
        """Scheduled in every process: renew this process's heartbeat (database clock)."""
        set_thread_role("heartbeat")
        try:
            if not heartbeat(self.sessions, self.identity):
                log.warning("this process had been declared dead; registration revived")
        except SQLAlchemyError as exc:
            log.error("heartbeat failed: %s", type(exc).__name__)

    def deliver(self) -> None:
        """One sender round (:attr:`send_loop`): send due outbox entries."""
        set_thread_role("sender")
        observe_delivery_round(self.metrics, self.sender.run_round())

    def purge_spool(self) -> None:
        """Scheduled, once per cluster: purge old pixel data and results of finished studies."""
        set_thread_role("scheduler")
        with cluster_singleton(self.engine, "retention") as mine:
            if mine:
                purge_spool(
                    self.sessions,
                    self.spool.root,
                    self.settings.retention,
                    results_root=self.results.root,
                )

    def sweep_temp_files(self) -> None:
        """Scheduled, once per cluster: delete temporary files a crash left in the spools.

        A C-STORE streams into a temporary file that is renamed into place only when complete
        (:meth:`dicom_io.spool.Spool.open_incoming`); a crash or a killed process leaves it.
        Only files untouched for :data:`TEMP_FILE_MAX_AGE_S` go (a write in progress updates
        its file's mtime far more often), so processes sharing the spool lose nothing.
        """
        set_thread_role("scheduler")
        with cluster_singleton(self.engine, "sweep_temp_files") as mine:
            if mine:
                for store in (self.spool, self.results):
                    store.sweep_temp_files(min_age_s=TEMP_FILE_MAX_AGE_S)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Register, reclaim dead incarnations' work, start jobs, worker, then the listener."""
        self.spool.root.mkdir(parents=True, exist_ok=True)
        self.results.root.mkdir(parents=True, exist_ok=True)
        set_audit_process(self.worker_id)
        self.http = start_http_server(self, self._stopped)  # first: a bad port fails early
        for m in self.models:  # a package version the card was not validated with: warn
            warn_version_drift(m.bundle.card.name, m.bundle.card.training)
        reclaimed = register(
            self.sessions,
            self.identity,
            max_attempts=self.settings.worker.max_attempts,
            detail={
                "ae_title": self.settings.listener.ae_title,
                "port": self.settings.listener.port,
            },
        )
        moved = relativize_instance_paths(self.sessions, self.spool.root)
        if reclaimed or moved:
            log.info(
                "start-up recovery",
                extra={"reclaimed_studies": len(reclaimed), "paths_made_relative": moved},
            )
        self._audit_started()
        if "worker" in self.roles:
            self._record_models()
            warm_s = warm_up_sr_encoder()  # the first study must not pay highdicom's tables
            log.debug("SR encoder warmed up", extra={"seconds": warm_s})
        self._schedule_jobs()
        self.scheduler.start()
        if "sender" in self.roles:
            self.send_loop.start()
        if "worker" in self.roles:
            self.worker.start()
        if "listener" in self.roles:
            self.readiness.start()
            self.listener.start()
        self._started = True
        threading.Thread(
            target=self._check_destinations, name="radflag-destinations", daemon=True
        ).start()
        log.info(
            "radflag started",
            extra={
                "ae_title": self.settings.listener.ae_title,
                "port": self.listener.port if "listener" in self.roles else None,
                "database": self.engine.dialect.name,
                "worker_id": self.worker_id,
                "roles": list(self.roles),
            },
        )

    def _audit_started(self) -> None:
        with self.sessions.begin() as session:
            audit(
                session,
                AuditEventType.DAEMON_STARTED,
                actor=f"daemon:{self.worker_id}",
                detail={
                    "ae_title": self.settings.listener.ae_title,
                    "port": self.settings.listener.port,
                    "roles": list(self.roles),
                    "models": [
                        {
                            "name": m.bundle.card.name,
                            "version": m.bundle.card.version,
                            "weights_sha256": m.bundle.card.weights_sha256,
                        }
                        for m in self.models
                    ],
                    "destinations": [d.name for d in self.settings.destinations],
                },
            )

    def _record_models(self) -> None:
        record_models_in_use(
            self.sessions,
            [
                ModelIdentity(
                    name=m.bundle.card.name,
                    version=m.bundle.card.version,
                    weights_sha256=m.bundle.card.weights_sha256,
                    card=m.bundle.card.model_dump(mode="json"),
                )
                for m in self.models
            ],
        )

    def _schedule_jobs(self) -> None:
        def every(job: Any, seconds: float, job_id: str, **kwargs: Any) -> None:
            self.scheduler.add_job(
                job,
                "interval",
                seconds=seconds,
                id=job_id,
                max_instances=1,
                coalesce=True,
                **kwargs,
            )

        every(self.beat, self.settings.worker.heartbeat_interval_s, "heartbeat")
        if "scheduler" in self.roles:
            every(self.complete_studies, self.settings.completion.check_interval_s, "complete")
            every(self.sweep_temp_files, TEMP_FILE_MAX_AGE_S, "sweep_temp", next_run_time=utcnow())
        if "scheduler" in self.roles and self.settings.retention.enabled:
            every(
                self.purge_spool,
                self.settings.retention.check_interval_s,
                "retention",
                next_run_time=utcnow(),
            )

    def _check_destinations(self) -> None:
        """Warn when results would reach no one: no destination, or none answers C-ECHO."""
        from daemon.startup import delivery_warning

        warning = delivery_warning(self.settings)
        if warning is not None:
            self.warnings.append(f"at start-up: {warning}")
            log.warning(warning, extra={"destinations": len(self.settings.destinations)})

    @property
    def port(self) -> int:
        """The listener's bound port."""
        return self.listener.port

    def stop(self) -> None:
        """Stop gracefully; safe to call more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._started:
            if "listener" in self.roles:
                self.listener.stop(grace_s=self.settings.listener.shutdown_grace_s)
                self.readiness.stop()
            # No new job from here on (avoids APScheduler's submit-after-shutdown race).
            self.scheduler.pause()
            self.scheduler.shutdown(wait=True)
            if not self.send_loop.stop(timeout_s=self.settings.delivery.timeout_s):
                log.warning("a sender round is still running at shutdown")
            grace_s = max(30.0, self.settings.listener.shutdown_grace_s)
            if "worker" in self.roles and not self.worker.stop(timeout_s=grace_s):
                log.warning("worker still busy at shutdown; its study goes back to the queue")
            self.processor.close()
            if not self.sender.stop(timeout_s=self.settings.delivery.timeout_s + 5):
                log.warning("a delivery still in flight at shutdown; its claim lapses")
        if self.http is not None:
            self.http.stop()
        released = release_own_leases(self.sessions, self.worker_id)
        mark_stopped(self.sessions, self.identity, "graceful stop")
        with self.sessions.begin() as session:
            audit(
                session,
                AuditEventType.DAEMON_STOPPED,
                actor=f"daemon:{self.worker_id}",
                detail={"released_studies": len(released)},
            )
        self.engine.dispose()
        log.info("radflag stopped", extra={"released_studies": len(released)})
        if self._log_filter is not None:
            remove_log_filter(self._log_filter)

    def run_until_signal(self) -> None:
        """Start, block until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested = threading.Event()

        def _handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
            stop_requested.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
        self.start()
        try:
            while not stop_requested.wait(1.0):
                pass
        finally:
            self.stop()
