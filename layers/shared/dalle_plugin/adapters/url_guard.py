"""Which URLs the plugin may fetch: https only, and never a private, loopback, link-local or metadata
address (checked after DNS resolution, and again for every redirect by the caller). The local stack
allows its own emulators on 127.0.0.1 by explicit setting.

The guard returns the address it vetted, and the caller connects to that address (keeping the host name
for the Host header and TLS), so a second DNS answer cannot swap in a private address after the check."""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable
from urllib.parse import urlsplit

from dalle_plugin.domain.errors import AssetUnreadable

Resolver = Callable[[str, int], list[str]]


def _resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class UrlGuard:
    def __init__(self, allow_private: bool = False, resolver: Resolver = _resolve):
        self.allow_private = allow_private
        self._resolver = resolver

    def __call__(self, url: str) -> str | None:
        """Raise ``AssetUnreadable`` naming the problem, or return the vetted address to connect to (None
        when private addresses are allowed: then the caller connects by name)."""
        try:
            parts = urlsplit(url)
            port = parts.port or 443
        except ValueError:
            raise AssetUnreadable("Refusing to fetch a malformed URL (bad host or port).") from None
        allowed_schemes = ("https", "http") if self.allow_private else ("https",)
        if parts.scheme not in allowed_schemes:
            raise AssetUnreadable(f"Refusing to fetch {parts.scheme or 'a relative'} URL: only https is allowed.")
        if not parts.hostname:
            raise AssetUnreadable("Refusing to fetch a URL without a host.")
        if parts.username or parts.password:
            raise AssetUnreadable("Refusing to fetch a URL with credentials in it.")
        if self.allow_private:
            return None
        try:
            addresses = self._resolver(parts.hostname, port)
        except (OSError, UnicodeError):
            raise AssetUnreadable(f"Could not resolve the host {parts.hostname}.") from None
        if not addresses or not all(_is_public(a) for a in addresses):
            raise AssetUnreadable(
                f"Refusing to fetch {parts.hostname}: it resolves to a private, loopback, link-local or "
                "metadata address."
            )
        # IPv4 first: a Lambda outside a VPC has no IPv6 route out
        return next((address for address in addresses if ":" not in address), addresses[0])
