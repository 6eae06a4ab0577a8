"""Which URLs the plugin may fetch: https only, and never a private, loopback, link-local or metadata
address (checked after DNS resolution, and again for every redirect by the caller). The one exception is an
explicit allow-list of exact ``host:port`` pairs (``ALLOWED_PRIVATE_HOSTS``), which may be private and may
use http: the local stack lists the emulators it starts, and nothing else; deployed, the list is empty.

The guard returns the address it vetted, and the caller connects to that address (keeping the host name
for the Host header and TLS), so a second DNS answer cannot swap in a private address after the check."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from dalle_plugin.domain.errors import AssetUnreadable

Resolver = Callable[[str, int], list[str]]
_DEFAULT_PORTS = {"https": 443, "http": 80}


def _resolve(host: str, port: int) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class UrlGuard:
    def __init__(self, allowed_private_hosts: Iterable[str] = (), resolver: Resolver = _resolve):
        # compared lower-case: a host name's case means nothing, and the port is digits
        self.allowed_private_hosts = frozenset(entry.lower() for entry in allowed_private_hosts)
        self._resolver = resolver

    def __call__(self, url: str) -> str:
        """Raise ``AssetUnreadable`` naming the problem, or return the vetted address to connect to."""
        try:
            parts = urlsplit(url)
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
        except ValueError:
            raise AssetUnreadable("Refusing to fetch a malformed URL (bad host or port).") from None
        host = parts.hostname or ""
        allow_listed = bool(host) and self._allow_listed(host, port)
        if parts.scheme != "https" and not (allow_listed and parts.scheme == "http"):
            raise AssetUnreadable(
                f"Refusing to fetch {parts.scheme or 'a relative'} URL: only https is allowed."
            )
        if not parts.hostname:
            raise AssetUnreadable("Refusing to fetch a URL without a host.")
        if parts.username or parts.password:
            raise AssetUnreadable("Refusing to fetch a URL with credentials in it.")
        try:
            addresses = self._resolver(parts.hostname, port)
        except (OSError, UnicodeError):
            raise AssetUnreadable(f"Could not resolve the host {parts.hostname}.") from None
        if not addresses or not (allow_listed or all(_is_public(a) for a in addresses)):
            raise AssetUnreadable(
                f"Refusing to fetch {parts.hostname}: it resolves to a private, loopback, link-local or "
                "metadata address."
            )
        # IPv4 first: a Lambda outside a VPC has no IPv6 route out
        return next((address for address in addresses if ":" not in address), addresses[0])

    def _allow_listed(self, hostname: str, port: int) -> bool:
        host = f"[{hostname}]" if ":" in hostname else hostname  # an IPv6 literal is written in brackets
        return f"{host}:{port}".lower() in self.allowed_private_hosts
