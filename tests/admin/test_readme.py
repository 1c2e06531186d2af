"""The README's "Connect any PACS"/"Connect Orthanc" snippets are valid and name the shipped
files that the Orthanc end-to-end test configures Orthanc from."""

from __future__ import annotations

import json
import re
import tomllib

from daemon.settings import Settings
from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text()


def test_first_command_says_results_go_nowhere() -> None:
    first = re.search(r"```sh\n(.*?)```", README, re.S)
    assert first is not None
    assert "radflag serve" in first.group(1)
    assert "NO destination" in first.group(1) and "results go nowhere" in first.group(1)


def test_readme_destination_snippets_are_valid_settings() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        settings = Settings.model_validate(tomllib.loads(block))
        assert len(settings.destinations) == 1


def test_orthanc_snippets_are_shipped_and_named() -> None:
    for name in ("orthanc-radflag.json", "radflag-autoroute.lua"):
        assert f"deploy/orthanc/{name}" in README
        assert (REPO_ROOT / "deploy" / "orthanc" / name).is_file()
    cfg = json.loads((REPO_ROOT / "deploy" / "orthanc" / "orthanc-radflag.json").read_text())
    assert cfg["DicomModalities"]["radflag"][0] == "RADFLAG"
    lua = (REPO_ROOT / "deploy" / "orthanc" / "radflag-autoroute.lua").read_text()
    assert "function OnStableStudy" in lua and "RadflagForwarded" in cfg["UserMetadata"]
