import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from daemon.settings import Settings, SettingsError, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "radflag.example.toml"


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = getattr(ann, "__args__", (ann,))[0] if name == "destinations" else ann
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys |= _keys(sub, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _toml_keys(data: dict, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in data.items():
        if isinstance(v, dict):
            keys |= _toml_keys(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                keys |= _toml_keys(item, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def test_example_config_documents_every_key_and_loads() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert _toml_keys(data) == _keys(Settings)
    settings = load_settings(EXAMPLE, environ={})
    assert settings.listener.port == 11112
    assert settings.destinations[0].ae_title == "PACS"


def test_environment_overrides_with_double_underscore() -> None:
    s = load_settings(
        None,
        environ={
            "RADFLAG_LISTENER__PORT": "11999",
            "RADFLAG_LISTENER__ALLOWED_CALLING_AES": '["CT1", "DX2"]',
            "RADFLAG_DATABASE__URL": "postgresql+psycopg://u@h/db",
            "RADFLAG_UNRELATED": "x",
        },
    )
    assert s.listener.port == 11999
    assert s.listener.allowed_calling_aes == ["CT1", "DX2"]
    assert s.database.url.startswith("postgresql+psycopg")


def test_every_bad_key_gets_its_own_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[listener]\nae_title = "BAD\\\\AE"\nport = 70000\nprot = 1\n'
        "[completion]\nquiet_period_s = -1\n"
        '[[destinations]]\nae_title = "PACS"\nhost = "h"\n'
    )
    with pytest.raises(SettingsError) as info:
        load_settings(cfg, environ={})
    text = str(info.value)
    for expected in (
        "listener.ae_title",
        "listener.port",
        "listener.prot: unknown key",
        "completion.quiet_period_s",
        "destinations.0.port",
    ):
        assert expected in text


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "x.toml"
    bad.write_text("[listener\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(bad, environ={})
