"""DICOM TLS (PS3.15 Annex B.9 / B.11, BCP 195 TLS Secure Transport Connection Profiles).

Builds :class:`ssl.SSLContext` objects for the listener (server side) and the C-STORE client.
Both sides require TLS 1.2 or newer and use the Python/OpenSSL default cipher suites, which
are a superset of the BCP 195 suites DCMTK proposes (``ECDHE-*-AES-*-GCM``), so the
non-downgrading BCP 195 profile (PS3.15 B.9) interoperates. Certificate files are PEM.

The listener may verify client certificates (mutual TLS, the "authenticated" part of
PS3.15 B.1 node authentication); the client always verifies the server certificate against
its CA file and, unless disabled, its host name.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
"""Lowest protocol version negotiated (BCP 195, PS3.15 B.9)."""


class TlsConfigError(ValueError):
    """A TLS setting is unusable (missing file, unreadable key, inconsistent options)."""


def _existing(path: Path | None, name: str) -> Path | None:
    if path is None:
        return None
    resolved = Path(path)
    if not resolved.is_file():
        raise TlsConfigError(f"{name}: file not found: {resolved}")
    return resolved


@dataclass(frozen=True)
class ServerTls:
    """TLS settings of the listener.

    Parameters
    ----------
    cert_file
        PEM certificate (chain) presented to peers.
    key_file
        PEM private key of ``cert_file`` (unencrypted).
    ca_file
        PEM CA bundle used to verify client certificates; required with
        ``require_client_cert``.
    require_client_cert
        True: a client without a certificate signed by ``ca_file`` is refused during the TLS
        handshake (before any DICOM PDU is read).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        if self.require_client_cert and self.ca_file is None:
            raise TlsConfigError("require_client_cert needs ca_file (the CA of the clients)")

    def context(self) -> ssl.SSLContext:
        """Build the server-side context.

        Returns
        -------
        ssl.SSLContext
            A ``PROTOCOL_TLS_SERVER`` context, TLS >= 1.2.

        Raises
        ------
        TlsConfigError
            If a file is missing or the key does not match the certificate.
        """
        cert = _existing(self.cert_file, "cert_file")
        key = _existing(self.key_file, "key_file")
        ca = _existing(self.ca_file, "ca_file")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MINIMUM_TLS_VERSION
        try:
            ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
            if ca is not None:
                ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"cannot load listener TLS certificate/key: {exc}") from exc
        if self.require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
        elif ca is not None:
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx


@dataclass(frozen=True)
class ClientTls:
    """TLS settings of the C-STORE client.

    Parameters
    ----------
    ca_file
        PEM CA bundle that signed the destinations' certificates; None uses the system store.
    cert_file, key_file
        Our client certificate and key, for destinations that require one (both or neither).
    check_hostname
        Verify that the destination's certificate names the host we connect to.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise TlsConfigError("cert_file and key_file must be given together")

    def context(self) -> ssl.SSLContext:
        """Build the client-side context (server certificate always verified).

        Returns
        -------
        ssl.SSLContext
            A ``PROTOCOL_TLS_CLIENT`` context, TLS >= 1.2, ``CERT_REQUIRED``.

        Raises
        ------
        TlsConfigError
            If a file is missing or unreadable.
        """
        ca = _existing(self.ca_file, "ca_file")
        cert = _existing(self.cert_file, "cert_file")
        key = _existing(self.key_file, "key_file")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = MINIMUM_TLS_VERSION
        ctx.check_hostname = self.check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            if ca is None:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                ctx.load_verify_locations(cafile=str(ca))
            if cert is not None and key is not None:
                ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"cannot load client TLS files: {exc}") from exc
        return ctx
