"""The admin HTTP application: read-only API, dashboard, metrics and health (FastAPI).

Routes
------
``GET /healthz``, ``GET /readyz``, ``GET /metrics``
    No token. Liveness; readiness (database, models, spool); Prometheus text format.
``GET /dashboard/``
    The static dashboard page (no token; it asks for one and fetches the API with it).
``GET /api/v1/...``
    ``Authorization: Bearer <token>`` (RFC 6750 §2.1). The OpenAPI description is at
    ``/api/v1/openapi.json``. With no token configured the API answers 503.

Nothing here writes to the database. Answers identify studies by UID only; any key naming a
patient is removed from free-form parts (audit details, model cards) as a second line of
defence.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from daemon.http.health import (
    check_database,
    check_destinations,
    check_models,
    check_writable,
)
from daemon.http.schemas import (
    CheckOut,
    DeadLetterOut,
    FailureOut,
    HealthOut,
    HourOut,
    LatencyOut,
    LoadedModelOut,
    ModelUsageOut,
    OverviewOut,
    ReadyOut,
    StageLatencyOut,
    StudyOut,
    ThroughputOut,
)
from db.admin_models import list_models
from db.admin_timeline import study_timeline
from db.dashboard_queries import failed_studies, hourly_throughput, queue_gauges
from db.models import utcnow
from db.outbox import DeliveryState, list_deliveries
from db.queries import list_studies
from db.stats import collect_stats

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).with_name("dashboard")
API_PREFIX = "/api/v1"
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
"""Headers on every answer: the dashboard loads only its own files (no inline script)."""
_UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"  # PS3.5 9.1: digits and dots, at most 64 characters


@dataclass(frozen=True)
class ApiContext:
    """What the HTTP application reads; built by the daemon (``daemon.http.server``).

    Attributes
    ----------
    sessions, engine
        The radflag database.
    registry
        The daemon's Prometheus registry.
    loaded_models
        Models the daemon has loaded.
    spool_dir, results_dir
        Folders that must be writable for the daemon to be ready.
    min_free_bytes
        Free space the spool needs (``listener.min_free_disk_mb``).
    token
        Bearer token of the API; "" disables the API.
    started_at
        When the daemon started.
    is_stopping
        True once the daemon is shutting down (``/healthz`` then answers 503).
    version
        radflag's version.
    warnings
        The daemon's current warnings (shown on the dashboard and in ``/readyz``).
    """

    sessions: sessionmaker[Session]
    engine: Engine
    registry: CollectorRegistry
    loaded_models: tuple[LoadedModelOut, ...]
    spool_dir: Path
    results_dir: Path
    min_free_bytes: int
    token: str
    started_at: datetime
    is_stopping: Callable[[], bool]
    version: str
    warnings: Callable[[], list[str]] = field(default=lambda: [])
    """Start-up warnings of the daemon (no destination, none reachable)."""


def scrub(value: Any) -> Any:
    """Return ``value`` without any mapping key that names a patient (recursively)."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if "patient" not in str(k).lower()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


_BEARER = HTTPBearer(auto_error=False, description="The `[http] token` of this radflag.")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
"""The ``Authorization: Bearer`` credentials of a request (RFC 6750 §2.1), if any."""


def _bearer_guard(token: str) -> Callable[[HTTPAuthorizationCredentials | None], None]:
    def require_token(credentials: BearerCredentials) -> None:
        if not token:
            raise HTTPException(503, "the API is disabled: no [http] token is configured")
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
            raise HTTPException(
                401,
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="radflag"'},
            )

    return require_token


def create_api(ctx: ApiContext) -> FastAPI:
    """Build the FastAPI application on ``ctx``."""
    app = FastAPI(
        title="radflag admin API",
        version=ctx.version,
        description=(
            "Read-only view of a radflag DICOM AI gateway: studies and their flags, failures, "
            "dead letters, throughput, latency, models. Bearer token required."
        ),
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=None,  # Swagger UI would load its assets from a CDN
        redoc_url=None,
    )

    @app.exception_handler(SQLAlchemyError)
    async def _db_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("API: database error", extra={"error": type(exc).__name__})
        return JSONResponse({"detail": "database unavailable"}, status_code=503)

    @app.middleware("http")
    async def _security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if request.url.path.startswith(API_PREFIX):
            response.headers["Cache-Control"] = "no-store"
        return response

    _add_probes(app, ctx)
    app.include_router(_api_router(ctx))

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR, html=True), name="dashboard")
    return app


def _add_probes(app: FastAPI, ctx: ApiContext) -> None:
    @app.get("/healthz", response_model=HealthOut, tags=["probes"])
    def healthz() -> JSONResponse:
        """Liveness: the process answers (503 while it stops)."""
        if ctx.is_stopping():
            return JSONResponse({"status": "stopping"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        response_model=ReadyOut,
        tags=["probes"],
        responses={503: {"model": ReadyOut, "description": "A check failed."}},
    )
    def readyz() -> JSONResponse:
        """Readiness: database reachable, a model loaded, spool and results writable."""
        checks = [
            check_database(ctx.engine),
            check_models([f"{m.name} {m.version}" for m in ctx.loaded_models]),
            check_writable("spool", ctx.spool_dir, ctx.min_free_bytes),
            check_writable("results", ctx.results_dir),
        ]
        ok = all(c.ok for c in checks) and not ctx.is_stopping()
        # Not a readiness failure (restarting would not help), but said where it is looked at.
        checks.append(check_destinations(ctx.warnings()))
        body = ReadyOut(
            status="ready" if ok else "not ready",
            checks=[CheckOut.model_validate(c) for c in checks],
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)

    @app.get("/metrics", tags=["probes"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics (text exposition format 0.0.4)."""
        return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)


def _api_router(ctx: ApiContext) -> APIRouter:
    router = APIRouter(
        prefix=API_PREFIX,
        dependencies=[Depends(_bearer_guard(ctx.token))],
        responses={401: {"description": "Missing or wrong bearer token."}, 503: {}},
    )
    loaded_keys = {(m.name, m.version, m.weights_sha256) for m in ctx.loaded_models}

    @router.get("/overview", response_model=OverviewOut, tags=["dashboard"])
    def overview() -> OverviewOut:
        """Studies and outbox entries per state, queue depth, backlog, loaded models."""
        g = queue_gauges(ctx.sessions)
        return OverviewOut(
            version=ctx.version,
            started_at=ctx.started_at,
            now=utcnow(),
            studies_by_state=g.studies_by_state,
            deliveries_by_state=g.deliveries_by_state,
            queue_depth=g.queue_depth,
            outbox_backlog=g.outbox_backlog,
            dead_letters=g.deliveries_by_state.get(DeliveryState.DEAD.value, 0),
            loaded_models=list(ctx.loaded_models),
            warnings=ctx.warnings(),
        )

    @router.get("/studies", response_model=list[StudyOut], tags=["studies"])
    def studies(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[StudyOut]:
        """List the most recently received studies with their flags."""
        return [StudyOut.model_validate(r) for r in list_studies(ctx.sessions, limit=limit)]

    @router.get("/studies/{study_instance_uid}", tags=["studies"])
    def study(
        study_instance_uid: Annotated[
            str, PathParam(max_length=64, pattern=_UID_PATTERN, description="(0020,000D)")
        ],
    ) -> dict[str, Any]:
        """Everything about one study: instances, results, deliveries, audit events."""
        timeline = study_timeline(ctx.sessions, study_instance_uid)
        if timeline is None:
            raise HTTPException(404, "unknown study")
        data: dict[str, Any] = scrub(timeline.as_dict())
        return data

    @router.get("/failures", response_model=list[FailureOut], tags=["dashboard"])
    def failures(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[FailureOut]:
        """Studies in FAILED or DELIVERY_FAILED, most recently changed first."""
        return [FailureOut.model_validate(f) for f in failed_studies(ctx.sessions, limit=limit)]

    @router.get("/dead-letters", response_model=list[DeadLetterOut], tags=["dashboard"])
    def dead_letters(limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[DeadLetterOut]:
        """List result objects given up after the last delivery attempt, newest first."""
        entries = list_deliveries(ctx.sessions, states=[DeliveryState.DEAD], limit=limit)
        return [DeadLetterOut.model_validate(e) for e in entries]

    @router.get("/throughput", response_model=ThroughputOut, tags=["dashboard"])
    def throughput(hours: Annotated[int, Query(ge=1, le=744)] = 24) -> ThroughputOut:
        """Instances received, studies classified, objects delivered, failures per UTC hour."""
        buckets = hourly_throughput(ctx.sessions, hours=hours)
        return ThroughputOut(hours=hours, buckets=[HourOut.model_validate(b) for b in buckets])

    @router.get("/latency", response_model=LatencyOut, tags=["dashboard"])
    def latency(hours: Annotated[int, Query(ge=1, le=744)] = 24) -> LatencyOut:
        """Per-stage latency percentiles of the studies first received in the last hours."""
        until = utcnow()
        stats = collect_stats(ctx.sessions, since=until - timedelta(hours=hours), until=until)
        return LatencyOut(
            since=until - timedelta(hours=hours),
            until=until,
            studies_in_window=stats.studies_in_window,
            latencies=[StageLatencyOut.model_validate(x) for x in stats.latencies],
        )

    @router.get("/models", response_model=list[ModelUsageOut], tags=["dashboard"])
    def models() -> list[ModelUsageOut]:
        """Every model radflag has used, with its card; ``loaded`` marks those running now."""
        return [
            ModelUsageOut(
                name=m.name,
                version=m.version,
                weights_sha256=m.weights_sha256,
                loaded=(m.name, m.version, m.weights_sha256) in loaded_keys,
                first_used_at=m.first_used_at,
                last_used_at=m.last_used_at,
                n_results=m.n_results,
                last_result_at=m.last_result_at,
                card=scrub(m.card),
            )
            for m in list_models(ctx.sessions)
        ]

    return router
