"""Run the admin HTTP application (uvicorn) in a thread of the daemon, with bounded shutdown.

The socket is bound in the caller's thread, so a port already in use fails ``start()`` with a
clear error instead of ending a background thread; port 0 binds an ephemeral port
(:attr:`HttpServer.port`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from daemon.http.api import ApiContext, create_api
from daemon.http.schemas import LoadedModelOut
from db.models import utcnow

if TYPE_CHECKING:
    from daemon.app import Radflag

log = logging.getLogger(__name__)


class HttpServerError(RuntimeError):
    """The HTTP server could not bind its address or did not start in time."""


class HttpServer:
    """A uvicorn server on ``host:port`` in a daemon thread.

    Parameters
    ----------
    app
        The ASGI application.
    host, port
        Address to bind; port 0 = ephemeral.
    shutdown_timeout_s
        Longest wait for requests in flight at :meth:`stop`.
    """

    def __init__(
        self, app: FastAPI, host: str, port: int, *, shutdown_timeout_s: float = 5.0
    ) -> None:
        self._host = host
        self._requested_port = port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=max(1, int(shutdown_timeout_s)),
        )
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._socket is None:
            return self._requested_port
        return int(self._socket.getsockname()[1])

    def start(self, timeout_s: float = 10.0) -> None:
        """Bind, start serving in a thread and wait until it accepts connections.

        Raises
        ------
        HttpServerError
            When the address cannot be bound or the server does not start within ``timeout_s``.
        """
        try:
            infos = socket.getaddrinfo(
                self._host, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family = infos[0][0]
            self._socket = socket.create_server(
                (self._host, self._requested_port), family=family, reuse_port=False
            )
        except OSError as exc:
            raise HttpServerError(
                f"cannot bind the HTTP server to {self._host}:{self._requested_port}: {exc}"
            ) from exc
        sock = self._socket
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="radflag-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise HttpServerError("the HTTP server did not start")
            time.sleep(0.01)
        log.info("HTTP server listening", extra={"host": self._host, "port": self.port})

    def stop(self) -> bool:
        """Stop serving; return True when the thread ended within the shutdown timeout."""
        self._server.should_exit = True
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout=self._shutdown_timeout_s + 2.0)
            stopped = not self._thread.is_alive()
            if not stopped:
                self._server.force_exit = True
                self._thread.join(timeout=2.0)
                stopped = not self._thread.is_alive()
        if self._socket is not None:
            self._socket.close()
        if not stopped:
            log.warning("HTTP server thread still running at shutdown")
        return stopped


def _radflag_version() -> str:
    try:
        return version("radflag")
    except PackageNotFoundError:
        return "unknown"


def api_context(app: Radflag, is_stopping: threading.Event) -> ApiContext:
    """Return what the HTTP application reads from a running :class:`Radflag`."""
    settings = app.settings
    return ApiContext(
        sessions=app.sessions,
        engine=app.engine,
        registry=app.metrics.registry,
        loaded_models=tuple(
            LoadedModelOut(
                name=m.bundle.card.name,
                version=m.bundle.card.version,
                weights_sha256=m.bundle.card.weights_sha256,
                device=str(m.device),
                threshold=m.bundle.card.threshold,
                finding=m.bundle.card.finding.meaning,
            )
            for m in app.models
        ),
        spool_dir=app.spool.root,
        results_dir=app.results.root,
        min_free_bytes=settings.listener.min_free_disk_mb * 1024 * 1024,
        token=settings.http.token,
        started_at=utcnow(),
        is_stopping=is_stopping.is_set,
        version=_radflag_version(),
        warnings=lambda: list(getattr(app, "warnings", [])),
    )


def start_http_server(app: Radflag, is_stopping: threading.Event) -> HttpServer | None:
    """Start the admin HTTP server of ``app`` when ``[http] enabled``; else return None.

    Raises
    ------
    HttpServerError
        When the configured address cannot be bound.
    """
    http = app.settings.http
    if not http.enabled:
        return None
    if not http.token:
        log.warning("[http] token is empty: the admin API answers 503 (metrics and health work)")
    server = HttpServer(create_api(api_context(app, is_stopping)), http.host, http.port)
    server.start()
    return server
