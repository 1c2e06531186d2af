"""Fixtures of the corpus test: real peers and a real ``radflag serve`` (see tests/e2e)."""

from tests.e2e.conftest import start_serve  # noqa: F401 - fixture
from tests.peers.fixtures import netns, storescp  # noqa: F401 - fixtures
