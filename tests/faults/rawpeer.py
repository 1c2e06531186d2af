"""A hostile DICOM peer on raw sockets: whole, half-sent and malformed PDUs (PS3.8 9.3).

PDUs are encoded by pynetdicom from primitives and then cut or corrupted, so every byte a
test sends is a real PDU or a known mutation of one.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, cast

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    P_DATA,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
CALLING_AE_SLICE = slice(26, 42)
"""Bytes of the Calling-AE-title field in an A-ASSOCIATE-RQ (PS3.8 Table 9-11)."""


def associate_rq(called: str = "RADFLAG", calling: str = "ATTACKER") -> bytes:
    """A complete A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(VERIFICATION, [ImplicitVRLittleEndian])
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1.1"
    primitive.user_information = [max_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def with_calling_ae_bytes(rq: bytes, field: bytes) -> bytes:
    """``rq`` with its 16-byte Calling-AE-title field replaced by ``field`` (padded)."""
    return rq[: CALLING_AE_SLICE.start] + field.ljust(16, b" ")[:16] + rq[CALLING_AE_SLICE.stop :]


def p_data(payload: bytes, context_id: int = 1) -> bytes:
    """A P-DATA-TF PDU with one command fragment (last) carrying ``payload``."""
    primitive = P_DATA()
    primitive.presentation_data_value_list = [cast(Any, [context_id, b"\x03" + payload])]
    pdu = P_DATA_TF()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


@dataclass
class Ending:
    """How the listener ended a raw connection."""

    elapsed_s: float
    received: bytes
    closed: bool

    def pdu_types(self) -> list[int]:
        """PDU types (first byte of each PDU) in what was received."""
        types, data = [], self.received
        while len(data) >= 6:
            pdu_type, _, length = struct.unpack(">BBL", data[:6])
            types.append(pdu_type)
            data = data[6 + length :]
        return types


class RawPeer:
    """One TCP connection to the listener from ``source`` (any 127.0.0.0/8 address)."""

    def __init__(self, port: int, *, source: str = "127.0.0.2", host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((source, 0))
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.opened = time.monotonic()
        self.last_sent = self.opened

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.last_sent = time.monotonic()

    def read_pdu(self, timeout_s: float = 10) -> bytes:
        """Read one whole PDU."""
        self.sock.settimeout(timeout_s)
        header = self._exactly(6)
        (length,) = struct.unpack(">L", header[2:])
        return header + self._exactly(length)

    def associate(self, calling: str = "ATTACKER") -> None:
        """Establish an association (Verification); raise unless A-ASSOCIATE-AC."""
        self.send(associate_rq(calling=calling))
        answer = self.read_pdu()
        if answer[0] != 0x02:
            raise AssertionError(f"association not accepted: PDU type {answer[0]:#04x}")

    def wait_end(self, timeout_s: float) -> Ending:
        """Read until the listener closes (or ``timeout_s``); time since the last send."""
        received = bytearray()
        deadline = time.monotonic() + timeout_s
        closed = False
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except OSError:  # reset
                closed = True
                break
            if not chunk:
                closed = True
                break
            received.extend(chunk)
        return Ending(time.monotonic() - self.last_sent, bytes(received), closed)

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the listener")
            data.extend(chunk)
        return bytes(data)
