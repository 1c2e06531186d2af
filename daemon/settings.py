"""One typed settings object, read from TOML and ``RADFLAG_*`` environment overrides.

Every key is validated at start-up; a bad key gets a message that names it. Environment
overrides use a double underscore between levels: ``RADFLAG_LISTENER__PORT=11113``,
``RADFLAG_DATABASE__URL=postgresql+psycopg://…``. Values are parsed as JSON when they are
valid JSON (numbers, booleans, lists), else taken as strings.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_io.peers import parse_peer_rule
from dicom_io.select import CHEST_BODY_PARTS, NON_FRONTAL_VIEWS, SelectionRules
from dicom_io.tls import ClientTls, ServerTls

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash/control chars

ENV_PREFIX = "RADFLAG_"
CONFIG_ENV = "RADFLAG_CONFIG"
"""Environment variable naming the configuration file when ``--config`` is not given."""

DEFAULT_DATABASE_URL = "sqlite:///radflag-data/radflag.db"
_SQLITE_DRIVERS = frozenset({"sqlite", "sqlite+pysqlite"})
_POSTGRES_DRIVERS = frozenset({"postgresql+psycopg"})


def validate_database_url(value: str) -> str:
    """Check a database URL strictly: scheme and driver radflag supports, a database named.

    Accepted: ``sqlite:///path`` (``sqlite+pysqlite``) and ``postgresql+psycopg://…/dbname``.
    Whether a SQLite file's folder exists is checked at start-up (``daemon.startup``).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(f"{value!r} is not a database URL") from None
    if url.drivername in _SQLITE_DRIVERS:
        if not url.database:
            raise ValueError("a sqlite URL needs a file: sqlite:///path/radflag.db")
        return value
    if url.drivername in _POSTGRES_DRIVERS:
        if not url.database:
            raise ValueError("a postgresql+psycopg URL needs a database name after the host")
        return value
    hint = " (write postgresql+psycopg://)" if url.get_backend_name() == "postgresql" else ""
    raise ValueError(
        f"unsupported scheme {url.drivername!r}{hint}: use sqlite:///path/radflag.db "
        "or postgresql+psycopg://user@host/dbname"
    )


def validate_ae_title(value: str) -> str:
    """Check an Application Entity title (PS3.5 Table 6.2-1, VR AE): 1–16 printable characters.

    Leading/trailing spaces are not significant and are removed.
    """
    stripped = value.strip()
    if not stripped or not _AE_RE.match(stripped):
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)"
        )
    return stripped


AETitle = Annotated[str, StringConstraints(min_length=1, max_length=16)]
Port = Annotated[int, Field(ge=0, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerTlsSettings(_Section):
    """DICOM TLS for the listener (PS3.15 B.9, BCP 195); PEM files."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    """CA of the clients; needed to verify client certificates."""
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _complete(self) -> ListenerTlsSettings:
        if self.enabled and not (self.cert_file and self.key_file):
            raise ValueError("enabled TLS needs cert_file and key_file")
        if self.require_client_cert and not self.ca_file:
            raise ValueError("require_client_cert needs ca_file")
        return self

    def to_server_tls(self) -> ServerTls | None:
        """Return the listener's TLS configuration, or None when disabled."""
        if not self.enabled:
            return None
        return ServerTls(
            cert_file=Path(self.cert_file),
            key_file=Path(self.key_file),
            ca_file=Path(self.ca_file) if self.ca_file else None,
            require_client_cert=self.require_client_cert,
        )


class ListenerSettings(_Section):
    """The DICOM listener (Storage SCP, PS3.4 Annex B)."""

    ae_title: AETitle = "RADFLAG"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aes: list[str] = Field(default_factory=list)
    """Entries ``"AE"`` or ``"AE@address-or-network"`` (see ``dicom_io.peers``)."""
    min_free_disk_mb: int = Field(512, ge=0)
    tls: ListenerTlsSettings = ListenerTlsSettings()
    max_associations: int = Field(16, ge=1, le=1024)
    max_associations_per_peer: int = Field(8, ge=1, le=1024)
    """Connections one source address may hold (at most ``max_associations``)."""
    max_pdu_bytes: int = Field(4_194_304, ge=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    """Idle limit, and the time a started PDU has to complete (stalled peers are aborted)."""
    shutdown_grace_s: float = Field(30.0, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        return [str(parse_peer_rule(x)) for x in v]


class StorageSettings(_Section):
    """Where received instances and produced results are kept."""

    spool_dir: Path = Path("radflag-data/spool")
    """Received instances, as PS3.10 files, in ``<study>/<series>/<sop>.dcm``; ``quarantine/``."""
    results_dir: Path = Path("radflag-data/results")
    """Result objects (SR) radflag produced, kept until and after delivery."""


class DatabaseSettings(_Section):
    """The SQL database (SQLite by default, PostgreSQL in production)."""

    url: str = DEFAULT_DATABASE_URL
    auto_create: bool = True
    """Create the schema in an empty database at start-up (else `radflag db upgrade` first)."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return validate_database_url(v)


OnDuplicateStudy = Literal["ignore", "resend", "reprocess"]
"""What a duplicate push of a finished study does (``[completion] on_duplicate_study``)."""


class CompletionSettings(_Section):
    """Study assembly: a study is ready after this long without a new instance."""

    quiet_period_s: float = Field(30.0, ge=0)
    check_interval_s: float = Field(2.0, gt=0)
    """Period of the cluster-wide completion job; the listener that received a study readies
    it at the end of its quiet period itself (:mod:`daemon.readiness`), this is the fallback."""
    on_duplicate_study: OnDuplicateStudy = "ignore"
    """A finished study pushed again (only instances already received): ``ignore`` it,
    ``resend`` its results to the destinations, or ``reprocess`` it."""


class WorkerSettings(_Section):
    """The classification worker."""

    device: Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")] = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    batch_size: int = Field(16, ge=1, le=512)
    """Largest batch the model runs; batches mix images of several studies."""
    batch_latency_ms: float = Field(50.0, ge=0, le=5000)
    """Longest wait after a batch's first image for more before the batch runs anyway."""
    studies_in_flight: int = Field(2, ge=1, le=64)
    """Studies claimed and processed at the same time (each with its lease kept alive).

    With SC outputs, 4 measured faster on 2 cores (a study's picture overlaps the next ones'
    decoding); with SR only it did not. Each one-image study whose heatmap picture is wanted
    keeps its decoded image, and each renders its picture (about 10 bytes per pixel)."""
    prepare_threads: int = Field(1, ge=1, le=64)
    """Threads decoding and preprocessing images; also the bound on decoded images held."""
    prepare_processes: int = Field(0, ge=0, le=64)
    """When > 0, worker processes that decode and preprocess images instead of the threads
    (except a one-image study's image whose heatmap picture is wanted). They take this work
    off the serve process's interpreter lock; each holds one decoded image and its own
    Python + torch (~300 MB). 0 = threads only."""
    max_pending_images: int = Field(64, ge=1, le=4096)
    """Preprocessed images waiting for the model; studies wait beyond it (backpressure)."""
    heatmaps: Literal["all", "positive"] = "all"
    """For which studies the heatmap picture (SC) is computed: all, or only positive ones."""
    torch_threads: int = Field(0, ge=0, le=256)
    """Intra-op threads of the model on CPU; 0 = PyTorch's default (one per core)."""
    lease_s: float = Field(30.0, gt=0)
    """A claimed study's lease, renewed every ``heartbeat_interval_s`` while it is processed;
    a process silent for one lease is dead and its work is taken over (database clock)."""
    heartbeat_interval_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    poll_interval_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> WorkerSettings:
        if self.heartbeat_interval_s * 2 > self.lease_s:
            raise ValueError("heartbeat_interval_s must be at most half of lease_s")
        return self


class DeliveryTlsSettings(_Section):
    """Client side of DICOM TLS, used for destinations with ``tls = true``; PEM files."""

    ca_file: str = ""
    """CA that signed the destinations' certificates; "" = the system trust store."""
    cert_file: str = ""
    key_file: str = ""
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> DeliveryTlsSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file must be given together")
        return self

    def to_client_tls(self) -> ClientTls:
        """Return the C-STORE client's TLS configuration."""
        return ClientTls(
            ca_file=Path(self.ca_file) if self.ca_file else None,
            cert_file=Path(self.cert_file) if self.cert_file else None,
            key_file=Path(self.key_file) if self.key_file else None,
            check_hostname=self.check_hostname,
        )


class DeliverySettings(_Section):
    """The outbox: retries with exponential backoff."""

    calling_ae_title: AETitle = "RADFLAG"
    max_attempts: int = Field(10, ge=1)
    backoff_base_s: float = Field(10.0, ge=0)
    backoff_max_s: float = Field(600.0, ge=0)
    check_interval_s: float = Field(2.0, gt=0)
    """Longest wait between two sender rounds; a round also starts at once when a study's
    results are recorded in this process or an association ends (:mod:`daemon.sendloop`)."""
    timeout_s: float = Field(30.0, gt=0)
    tls: DeliveryTlsSettings = DeliveryTlsSettings()
    max_parallel_destinations: int = Field(4, ge=1, le=64)
    """Destinations served at the same time (one association each)."""
    max_per_association: int = Field(100, ge=1)
    """Objects one association carries per round (the rest follow in the next round)."""
    claim_lease_s: float = Field(300.0, gt=0)
    """How long a claimed (SENDING) entry stays with its sender before others may take it."""
    backoff_jitter: float = Field(0.5, ge=0, le=1)
    """Each retry delay is drawn from ``[delay * (1 - jitter), delay]``."""


ResultKind = Literal["SR", "SC"]
"""Result objects: the TID 1500 Structured Report, the heatmap Secondary Capture."""

TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit_vr_little_endian": "1.2.840.10008.1.2.1",
    "implicit_vr_little_endian": "1.2.840.10008.1.2",
    "rle_lossless": "1.2.840.10008.1.2.5",
    "jpeg2000_lossless": "1.2.840.10008.1.2.4.90",
    "jpegls_lossless": "1.2.840.10008.1.2.4.80",
}
"""Transfer syntaxes a destination may ask for (PS3.5 A.2, A.4); names -> UIDs."""


def _default_outputs() -> list[ResultKind]:
    # Both by default: many viewers render no SR, every viewer shows the heatmap picture.
    return ["SR", "SC"]


class DestinationSettings(_Section):
    """A DICOM node results are sent to (C-STORE SCP).

    With ``to_sender = true`` the results of a study go back to the AE that sent it: the
    study's calling AE title and peer address, on ``port`` (``ae_title``/``host``, when
    given, override them).
    """

    name: str = ""
    ae_title: str = ""
    host: str = ""
    port: Annotated[int, Field(ge=1, le=65535)]
    to_sender: bool = False
    outputs: list[ResultKind] = Field(default_factory=_default_outputs, min_length=1)
    """What this destination receives: ``["SR"]``, ``["SC"]`` or ``["SR", "SC"]``."""
    sr_sop_class: Literal["auto", "comprehensive_3d", "comprehensive"] = "auto"
    """``auto`` sends Comprehensive 3D SR and falls back to Comprehensive SR if refused."""
    transfer_syntax: Literal[
        "explicit_vr_little_endian",
        "implicit_vr_little_endian",
        "rle_lossless",
        "jpeg2000_lossless",
        "jpegls_lossless",
    ] = "explicit_vr_little_endian"
    """Transfer syntax of sent images (SC); SRs use a native syntax (implicit if asked)."""
    tls: bool = False
    """Send over DICOM TLS (client settings in ``delivery.tls``)."""
    supersede: Literal["keep", "iocm_reject"] = "keep"
    """What a changed result does to the old one here: ``keep`` it (the new SR names it as
    predecessor), or also send an IHE IOCM rejection note (KOS) for it (``iocm_reject``)."""

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v) if v.strip() else ""

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("outputs must not repeat a kind")
        return v

    @model_validator(mode="after")
    def _default_name(self) -> DestinationSettings:
        if not self.to_sender and not (self.ae_title and self.host.strip()):
            raise ValueError("ae_title and host are required unless to_sender = true")
        if not self.name:
            name = (
                f"sender:{self.port}"
                if self.to_sender
                else f"{self.ae_title}@{self.host}:{self.port}"
            )
            object.__setattr__(self, "name", name)
        return self


class SelectionSettings(_Section):
    """Which received images the models apply to (``dicom_io.select``).

    The modalities come from each model card.
    """

    body_parts: list[str] = Field(default_factory=lambda: sorted(CHEST_BODY_PARTS))
    allow_missing_body_part: bool = True
    excluded_view_positions: list[str] = Field(default_factory=lambda: sorted(NON_FRONTAL_VIEWS))
    view_from_descriptions: bool = True
    human_only: bool = True
    exclude_derived_secondary: bool = True
    require_original: bool = False

    def to_rules(self) -> SelectionRules:
        """Return the selection rules these settings describe."""
        return SelectionRules(
            body_parts=frozenset(self.body_parts),
            allow_missing_body_part=self.allow_missing_body_part,
            excluded_view_positions=frozenset(self.excluded_view_positions),
            view_from_descriptions=self.view_from_descriptions,
            human_only=self.human_only,
            exclude_derived_secondary=self.exclude_derived_secondary,
            require_original=self.require_original,
        )


class ModelSettings(_Section):
    """Model bundles to load; an empty list loads the bundled default pneumonia model."""

    bundles: list[Path] = Field(default_factory=list)
    applicability_gate: bool = True
    """Refuse images the bundle's applicability gate finds unlike its training images
    (NOT_APPLICABLE with the reason). Off: every selected image is classified and the gate's
    verdict is only recorded in the audit detail."""


class PrivacySettings(_Section):
    """How patient identifiers are stored in the database."""

    store_patient_id_in_clear: bool = False
    pseudonym_key: str = ""
    """Key of the HMAC used to pseudonymise patient IDs; empty = a key file in the data folder."""


class RetentionSettings(_Section):
    """Purge of spooled pixel data of finished studies (results and audit rows stay)."""

    enabled: bool = True
    spool_max_age_days: float = Field(30.0, gt=0)
    """A study's received instances are purged this long after its last one arrived, once the
    study is DONE, NOT_APPLICABLE or FAILED."""
    check_interval_s: float = Field(3600.0, gt=0)
    max_studies_per_run: int = Field(500, ge=1)


class LoggingSettings(_Section):
    """Log output (stderr)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class HttpSettings(_Section):
    """The admin HTTP server: read-only API, dashboard, ``/metrics``, ``/healthz``, ``/readyz``."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8080
    """TCP port; 0 binds an ephemeral port."""
    token: str = ""
    """Bearer token of the API and the dashboard's data; "" = API answers 503 (metrics and
    health need no token)."""

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        if v and (len(v) < 16 or not v.isprintable() or " " in v):
            raise ValueError("must be at least 16 printable characters without spaces")
        return v


class Settings(_Section):
    """Everything radflag reads from its configuration."""

    listener: ListenerSettings = ListenerSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    completion: CompletionSettings = CompletionSettings()
    worker: WorkerSettings = WorkerSettings()
    delivery: DeliverySettings = DeliverySettings()
    destinations: list[DestinationSettings] = Field(default_factory=list)
    models: ModelSettings = ModelSettings()
    selection: SelectionSettings = SelectionSettings()
    privacy: PrivacySettings = PrivacySettings()
    retention: RetentionSettings = RetentionSettings()
    logging: LoggingSettings = LoggingSettings()
    http: HttpSettings = HttpSettings()

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        return self


class SettingsError(ValueError):
    """The configuration is invalid; ``str()`` lists one line per bad key."""


def _parse_env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        node = data
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise SettingsError(f"{name}: {'.'.join(path)} is not a section")
            node = child
        node[path[-1]] = _parse_env_value(raw)
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    """One line per bad key (a single bad key: one line in all)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    if len(lines) == 1:
        return f"invalid configuration ({source}): {lines[0]}"
    return "\n".join([f"invalid configuration ({source}):"] + [f"  {line}" for line in lines])


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the configuration.

    Parameters
    ----------
    path
        A TOML file; None for the embedded defaults.
    environ
        Environment to read ``RADFLAG_*`` overrides from (``os.environ`` by default).

    Raises
    ------
    SettingsError
        With one line per bad key.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    data = _apply_env(data, os.environ if environ is None else environ)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_format_errors(exc, source)) from None
    if path is None:
        return settings
    return resolve_paths(settings, path.resolve().parent)


def config_path(explicit: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """Return the configuration file to read: ``--config``, else ``$RADFLAG_CONFIG``, else None."""
    env = os.environ if environ is None else environ
    chosen = explicit or env.get(CONFIG_ENV) or None
    return Path(chosen) if chosen else None


def _under(base: Path, value: Path | str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _file_under(base: Path, value: str) -> str:
    return str(_under(base, value)) if value else value


def _sqlite_url_under(base: Path, url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername not in _SQLITE_DRIVERS or parsed.database in (None, "", ":memory:"):
        return url
    return parsed.set(database=str(_under(base, str(parsed.database)))).render_as_string(
        hide_password=False
    )


def resolve_paths(settings: Settings, base: Path) -> Settings:
    """Return ``settings`` with every relative path made absolute under ``base``.

    ``base`` is the folder of the configuration file, so that an admin command run from any
    directory finds the same database, spool and bundles as the daemon (embedded defaults
    with no file stay relative to the working directory).
    """
    st, lt, dt = settings.storage, settings.listener.tls, settings.delivery.tls
    return settings.model_copy(
        update={
            "storage": st.model_copy(
                update={
                    "spool_dir": _under(base, st.spool_dir),
                    "results_dir": _under(base, st.results_dir),
                }
            ),
            "database": settings.database.model_copy(
                update={"url": _sqlite_url_under(base, settings.database.url)}
            ),
            "models": settings.models.model_copy(
                update={"bundles": [_under(base, b) for b in settings.models.bundles]}
            ),
            "listener": settings.listener.model_copy(
                update={
                    "tls": lt.model_copy(
                        update={
                            k: _file_under(base, getattr(lt, k))
                            for k in ("cert_file", "key_file", "ca_file")
                        }
                    )
                }
            ),
            "delivery": settings.delivery.model_copy(
                update={
                    "tls": dt.model_copy(
                        update={
                            k: _file_under(base, getattr(dt, k))
                            for k in ("cert_file", "key_file", "ca_file")
                        }
                    )
                }
            ),
        }
    )
