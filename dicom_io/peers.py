"""Who may associate: the calling AE title allow-list, optionally bound to source addresses.

An entry is either an AE title (``"PACS"``: that title from any address) or an AE title bound
to an IP address or network (``"PACS@10.1.2.3"``, ``"CR_ROOM1@10.20.0.0/16"``; several entries
may name the same title). Because an AE title may itself contain ``@`` (PS3.5 VR AE allows
it), the text after the *last* ``@`` is a binding only when it parses as an IP address or
network; otherwise the whole entry is the title.

A request whose calling AE title is not allowed from its source address is rejected at
association time with A-ASSOCIATE-RJ result *rejected-permanent*, source *service-user*,
reason *calling-AE-title-not-recognized* (PS3.8 9.3.4, reason 3). An empty allow-list
accepts every caller.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from dicom_io.ae_titles import validate_ae_title

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PeerRule:
    """One allow-list entry: a calling AE title and, optionally, its allowed source network."""

    ae_title: str
    network: IPNetwork | None = None

    def matches_host(self, host: str) -> bool:
        """Return True when ``host`` (an IP address string) is allowed by this rule."""
        if self.network is None:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.version == self.network.version and address in self.network

    def __str__(self) -> str:
        return self.ae_title if self.network is None else f"{self.ae_title}@{self.network}"


def parse_peer_rule(entry: str, name: str = "allowed_calling_aes") -> PeerRule:
    """Parse ``"AE"`` or ``"AE@address-or-network"``.

    Parameters
    ----------
    entry
        The allow-list entry.
    name
        Setting name used in error messages.

    Returns
    -------
    PeerRule
        The parsed rule.

    Raises
    ------
    ValueError
        If the AE title part is not a valid AE title (PS3.5 6.2).
    """
    title, sep, host = entry.strip().rpartition("@")
    if sep and title:
        try:
            network = ipaddress.ip_network(host.strip(), strict=False)
        except ValueError:
            network = None
        if network is not None:
            return PeerRule(validate_ae_title(title, name), network)
    return PeerRule(validate_ae_title(entry, name))


@dataclass(frozen=True)
class CallingAePolicy:
    """The calling AE allow-list of the listener.

    Parameters
    ----------
    rules
        Allow-list entries; empty accepts every caller.
    """

    rules: tuple[PeerRule, ...] = ()

    @classmethod
    def from_entries(
        cls, entries: Iterable[str], name: str = "allowed_calling_aes"
    ) -> CallingAePolicy:
        """Build the policy from ``"AE"`` / ``"AE@network"`` strings (see the module docstring)."""
        return cls(tuple(parse_peer_rule(entry, name) for entry in entries))

    @property
    def restricted(self) -> bool:
        """True when an allow-list is configured."""
        return bool(self.rules)

    def rejection(self, calling_ae: str, host: str) -> str | None:
        """Return why ``calling_ae`` from ``host`` is refused, or None when it is allowed."""
        if not self.rules:
            return None
        known = [r for r in self.rules if r.ae_title == calling_ae]
        if not known:
            return "calling AE title not recognized"
        if not any(r.matches_host(host) for r in known):
            return "calling AE title not allowed from this address"
        return None
