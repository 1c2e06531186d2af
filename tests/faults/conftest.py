"""Fixtures for the fault-injection suite: a listener with short timeouts, real peers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_io.scp import Listener, ListenerConfig
from dicom_io.spool import Spool
from tests.daemon.conftest import pacs, start_app, tiny_bundle, tiny_models  # noqa: F401
from tests.dicom_io.conftest import SCP_AE, FakeSink, RunningListener

NETWORK_TIMEOUT_S = 2.0
"""The listener's network timeout in these tests: stalled peers must be gone within it."""
WATCHDOG_SLACK_S = 1.5
"""Watchdog grace (0.5 s) + accept-loop poll (0.25 s) + scheduling on a loaded 2-core box."""


def start_guarded(tmp_path: Path, **config: Any) -> RunningListener:
    """A listener on 127.0.0.1 with a short network timeout and a long ACSE timeout.

    The ACSE timeout (30 s) is far above the network timeout so that a test can tell a
    slot freed at once from one freed when pynetdicom's ACSE wait runs out.
    """
    values: dict[str, Any] = {
        "ae_title": SCP_AE,
        "host": "127.0.0.1",
        "port": 0,
        "max_associations": 16,
        "acse_timeout_s": 30.0,
        "dimse_timeout_s": 30.0,
        "network_timeout_s": NETWORK_TIMEOUT_S,
        **config,
    }
    spool = Spool(tmp_path / "spool")
    sink = FakeSink()
    events: list[tuple[str, dict[str, Any]]] = []
    listener = Listener(
        ListenerConfig(**values), spool, sink, on_event=lambda k, d: events.append((k, d))
    )
    listener.start()
    return RunningListener(listener, spool, sink, events)


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Callable[..., RunningListener]]:
    """Factory of listeners (see :func:`start_guarded`), stopped after the test."""
    started: list[RunningListener] = []

    def _start(**config: Any) -> RunningListener:
        running = start_guarded(tmp_path, **config)
        started.append(running)
        return running

    yield _start
    for running in started:
        running.listener.stop(grace_s=1)
