"""C-ECHO to a DICOM node (Verification SOP Class, PS3.4 Annex A; PS3.7 9.1.5).

Used by ``radflag check`` and the start-up warning to say whether a destination answers.
The outcome names what happened in the words an administrator checks first: connection
refused, timed out, association rejected (with the PS3.8 9.3.4 reason), or the status.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


@dataclass(frozen=True)
class EchoOutcome:
    """Result of one C-ECHO: ``ok``, and ``detail`` saying why not (or the round trip)."""

    ok: bool
    detail: str


def _tcp_probe(host: str, port: int, timeout_s: float) -> str | None:
    """Return None when a TCP connection opens, else the cause in plain words."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except TimeoutError:
        return f"timed out after {timeout_s:g} s connecting to {host}:{port}"
    except ConnectionRefusedError:
        return f"connection refused by {host}:{port}"
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r}: {exc.strerror}"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"{host}:{port} unreachable ({exc.strerror})"
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"


def echo(
    host: str, port: int, called_ae: str, *, calling_ae: str = "RADFLAG", timeout_s: float = 5.0
) -> EchoOutcome:
    """Send one C-ECHO and say what happened.

    Parameters
    ----------
    host, port
        The node's address.
    called_ae, calling_ae
        AE titles of the association (PS3.8 9.3.2).
    timeout_s
        Bound on connecting, association negotiation and the response.
    """
    problem = _tcp_probe(host, port, timeout_s)
    if problem is not None:
        return EchoOutcome(False, problem)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae)
    try:
        if assoc.is_rejected:
            rej = assoc.acceptor.primitive
            reason = getattr(rej, "reason_str", None) or getattr(rej, "result_reason", "?")
            return EchoOutcome(False, f"association rejected by {called_ae}: {reason}")
        if not assoc.is_established:
            if assoc.rejected_contexts:  # the node answered but offers no Verification SCP
                return EchoOutcome(
                    True, f"{called_ae} accepts associations (it does not support C-ECHO)"
                )
            return EchoOutcome(False, f"association with {called_ae} aborted or timed out")
        status = assoc.send_c_echo()
        if not status or "Status" not in status:
            return EchoOutcome(False, f"no C-ECHO response from {called_ae} (timed out)")
        code = int(status.Status)
        if code != 0:
            return EchoOutcome(False, f"C-ECHO status 0x{code:04X} from {called_ae}")
        return EchoOutcome(True, f"C-ECHO to {called_ae}@{host}:{port} ok")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
