"""Print how a listener treats stalled, malformed and crowding peers (not a test).

Run it against any tree to compare behaviours, e.g. the current one::

    PYTHONPATH=. python -m tests.faults.compare_listener

(network timeout 2 s, ACSE timeout 30 s, 16 associations; peers on 127.0.0.2.)
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.faults.conftest import start_guarded
from tests.faults.rawpeer import RawPeer, associate_rq, p_data, with_calling_ae_bytes
from tests.peers.dcmtk import echoscu


def main() -> None:
    """Measure and print; exits hard so that a listener stuck on a stalled peer cannot hang."""
    logging.disable(logging.CRITICAL)
    running = start_guarded(Path(tempfile.mkdtemp()))
    port = running.port

    def slot_free_after(limit_s: float) -> str:
        start = time.monotonic()
        while running.listener.active_associations and time.monotonic() - start < limit_s:
            time.sleep(0.05)
        left = running.listener.active_associations
        return f">{limit_s}" if left else f"{time.monotonic() - start:.2f}"

    peer = RawPeer(port)
    peer.send(associate_rq()[:50])
    end = peer.wait_end(8)
    print(f"half A-ASSOCIATE-RQ: closed={end.closed} after {end.elapsed_s:.2f} s (waited <= 8)")
    peer.close()
    print(f"  slot free {slot_free_after(3)} s after the peer closed")
    peer = RawPeer(port)
    peer.associate()
    peer.send(p_data(b"x" * 100)[:30])
    end = peer.wait_end(8)
    print(
        f"half P-DATA-TF: closed={end.closed} A-ABORT={7 in end.pdu_types()} "
        f"after {end.elapsed_s:.2f} s"
    )
    peer.close()
    print(f"  slot free {slot_free_after(3)} s after the peer closed")
    peer = RawPeer(port)
    peer.send(with_calling_ae_bytes(associate_rq(), b"\xff" * 16))
    end = peer.wait_end(5)
    print(f"malformed AE title: PDUs {end.pdu_types()}, slot free after {slot_free_after(35)} s")
    held = [RawPeer(port) for _ in range(16)]
    for stalled in held:
        stalled.send(associate_rq()[:40])
    time.sleep(0.3)
    for label in ("with 16 stalled peers", "3 s later"):
        started = time.monotonic()
        echo = echoscu(port, called_aet="RADFLAG", timeout_s=5)
        took = time.monotonic() - started
        print(f"C-ECHO from 127.0.0.1 {label}: rc={echo.returncode} in {took:.2f} s")
        time.sleep(3)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
