"""pytest fixtures for the real peers; each skips with a clear reason when its peer is missing.

Enable in a test module with ``from tests.peers.fixtures import netns, orthanc, storescp``
(ruff: add ``# noqa: F401``) or in a conftest with ``pytest_plugins = ["tests.peers.fixtures"]``.
All fixtures are function-scoped: each test gets its own namespace and fresh peers
(Orthanc starts in well under a second).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.dcmtk import StoreSCP, dcmtk_available
from tests.peers.netns import NetNamespace, namespaces_available
from tests.peers.orthanc import OrthancPeer, orthanc_available

_NS_OK: bool | None = None


def require_namespaces() -> None:
    """Skip the calling test when network namespaces cannot be created here."""
    global _NS_OK
    if _NS_OK is None:
        _NS_OK = namespaces_available()
    if not _NS_OK:
        pytest.skip("cannot create network namespaces (needs root and util-linux unshare)")


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    """A private network namespace with only ``lo`` (closed, with all it started, at teardown)."""
    require_namespaces()
    with NetNamespace() as ns:
        yield ns


@pytest.fixture
def storescp(netns: NetNamespace, tmp_path: Path) -> Iterator[StoreSCP]:
    """DCMTK ``storescp`` (AE ``STORESCP``) in ``netns``, writing to ``tmp_path / "storescp"``."""
    if not dcmtk_available():
        pytest.skip("DCMTK not installed in /usr/bin")
    with StoreSCP(tmp_path / "storescp", ns=netns) as scp:
        yield scp


@pytest.fixture
def orthanc(netns: NetNamespace, tmp_path: Path) -> Iterator[OrthancPeer]:
    """Orthanc (AE ``ORTHANC``) in ``netns`` with no modalities; add them with ``set_modality``."""
    if not orthanc_available():
        pytest.skip("Orthanc not installed (/usr/sbin/Orthanc)")
    with OrthancPeer(tmp_path / "orthanc", ns=netns) as peer:
        yield peer
