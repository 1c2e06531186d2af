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

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE, no backslash/control chars

ENV_PREFIX = "RADFLAG_"


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


class ListenerSettings(_Section):
    """The DICOM listener (Storage SCP, PS3.4 Annex B)."""

    ae_title: AETitle = "RADFLAG"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aes: list[AETitle] = Field(default_factory=list)
    max_associations: int = Field(16, ge=1, le=1024)
    max_pdu_bytes: int = Field(4_194_304, ge=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        return [validate_ae_title(x) for x in v]


class StorageSettings(_Section):
    """Where received instances and produced results are kept."""

    spool_dir: Path = Path("radflag-data/spool")
    """Received instances, as PS3.10 files, in ``<study>/<series>/<sop>.dcm``; ``quarantine/``."""
    results_dir: Path = Path("radflag-data/results")
    """Result objects (SR) radflag produced, kept until and after delivery."""


class DatabaseSettings(_Section):
    """The SQL database (SQLite by default, PostgreSQL in production)."""

    url: str = "sqlite:///radflag-data/radflag.db"
    auto_create: bool = True
    """Create the schema in an empty database at start-up (else `radflag db upgrade` first)."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql:", "postgresql+")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return v


class CompletionSettings(_Section):
    """Study assembly: a study is ready after this long without a new instance."""

    quiet_period_s: float = Field(30.0, ge=0)
    check_interval_s: float = Field(2.0, gt=0)


class WorkerSettings(_Section):
    """The classification worker."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(16, ge=1, le=512)
    lease_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    poll_interval_s: float = Field(1.0, gt=0)


class DeliverySettings(_Section):
    """The outbox: retries with exponential backoff."""

    calling_ae_title: AETitle = "RADFLAG"
    max_attempts: int = Field(10, ge=1)
    backoff_base_s: float = Field(10.0, ge=0)
    backoff_max_s: float = Field(600.0, ge=0)
    check_interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(30.0, gt=0)


class DestinationSettings(_Section):
    """A DICOM node results are sent to (C-STORE SCP)."""

    name: str = ""
    ae_title: AETitle
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return validate_ae_title(v)

    @model_validator(mode="after")
    def _default_name(self) -> DestinationSettings:
        if not self.name:
            object.__setattr__(self, "name", f"{self.ae_title}@{self.host}:{self.port}")
        return self


class ModelSettings(_Section):
    """Model bundles to load; an empty list loads the bundled default pneumonia model."""

    bundles: list[Path] = Field(default_factory=list)


class PrivacySettings(_Section):
    """How patient identifiers are stored in the database."""

    store_patient_id_in_clear: bool = False
    pseudonym_key: str = ""
    """Key of the HMAC used to pseudonymise patient IDs; empty = a key file in the data folder."""


class LoggingSettings(_Section):
    """Log output (stderr)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


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
    privacy: PrivacySettings = PrivacySettings()
    logging: LoggingSettings = LoggingSettings()

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
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


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
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(_format_errors(exc, source)) from None
