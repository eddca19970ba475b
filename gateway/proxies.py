"""The real client behind trusted reverse proxies (``OMNIGATE_TRUSTED_PROXIES``).

Only when the TCP peer is inside one of the trusted networks are ``X-Forwarded-For`` and
``X-Forwarded-Proto`` read; from any other peer they change nothing. The handlers then see
a clone of the request (``Request.clone``) whose ``remote``, ``scheme`` and so ``secure``
are the client's, so every per-address limit (sign-in throttling, webhooks, web chat
``hello``), the Secure flag of the session cookie and the web chat's own-origin check use
them without knowing about proxies.

- The client is the rightmost ``X-Forwarded-For`` address that is not itself a trusted
  proxy: everything to its right was written by proxies we trust, everything to its left
  came from the client and may be forged. When every address is trusted, the leftmost.
  An entry that is no address (``unknown``, an obfuscated name) ends the walk: the last
  trusted hop is then the client. ``1.2.3.4:5678`` and ``[2001:db8::1]:443`` are read
  without the port; IPv4-mapped IPv6 addresses as IPv4.
- The scheme is the ``X-Forwarded-Proto`` entry written by the proxy that received the
  client (proxies that append give one entry per hop), or the leftmost when there are
  fewer entries (proxies that pass the edge's value through). Only ``http``/``https``.
- ``X-Forwarded-Host`` is not read: the ``Host`` header is what the browser sent when the
  proxy passes it (nginx ``proxy_set_header Host $host``).

aiohttp-remotes was considered: its ``XForwardedFiltered`` reads the header whatever the
TCP peer (a client that connects directly can forge its address), and
``XForwardedStrict`` wants one set of addresses per hop instead of a set of networks.

The access log is written with the request aiohttp made, not the clone, so the middleware
also records the client there (``client_of``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address
SCHEMES = frozenset({"http", "https"})
CLIENT = web.RequestKey("forwarded_client", str)  # on aiohttp's own request object


def parse_networks(text: str | Iterable[str | Network]) -> list[Network]:
    """``"10.0.0.0/8, 192.0.2.7, ::1"`` as networks (an address alone: just it). Host bits
    in a network are dropped (``10.1.2.3/8`` is ``10.0.0.0/8``). ValueError names a bad
    entry."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    networks: list[Network] = []
    for part in parts:
        if isinstance(part, IPv4Network | IPv6Network):
            networks.append(part)
            continue
        entry = part.strip()
        if not entry:
            continue
        try:
            networks.append(ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(
                f"{entry!r} is not an IP address or network (e.g. 10.0.0.0/8, 192.0.2.7, "
                "fd00::/8)") from None
    return networks


def parse_address(text: str) -> Address | None:
    """An address as proxies write it (with or without a port, IPv6 in brackets or not);
    IPv4-mapped IPv6 as IPv4; None if it is none."""
    text = text.strip()
    if text.startswith("["):  # [2001:db8::1] or [2001:db8::1]:443
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # 192.0.2.1:5678
        text = text.partition(":")[0]
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Forwarded:
    remote: str
    scheme: str | None  # None: keep the connection's


def _trusted(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


def _entries(values: Iterable[str]) -> list[str]:
    """Every comma-separated entry of every copy of a header, in order."""
    return [entry.strip() for value in values for entry in value.split(",") if entry.strip()]


def resolve(
    peer: str | None, forwarded_for: Iterable[str], forwarded_proto: Iterable[str],
    trusted: Sequence[Network],
) -> Forwarded | None:
    """The client's address and scheme, or None when the peer is not a trusted proxy (the
    headers are then ignored). ``forwarded_for``/``forwarded_proto``: the header values."""
    address = None if peer is None else parse_address(peer)
    if address is None or not _trusted(address, trusted):
        return None
    hops = 0  # how many trusted proxies stand between the client and us, after the peer
    for entry in reversed(_entries(forwarded_for)):
        hop = parse_address(entry)
        if hop is None:
            break
        address = hop
        if not _trusted(hop, trusted):
            break
        hops += 1
    else:
        hops = max(hops - 1, 0)  # every hop trusted: the leftmost, written one hop earlier
    schemes = [entry.lower() for entry in reversed(_entries(forwarded_proto))]
    scheme = None
    if schemes:
        # the entry of the proxy that received the client (appended one per hop), else the
        # leftmost (the edge's, passed through)
        scheme = schemes[hops] if hops < len(schemes) else schemes[-1]
    return Forwarded(str(address), scheme if scheme in SCHEMES else None)


def forwarded_middleware(trusted: Sequence[Network]) -> Middleware:
    """Handlers get the client's address and scheme when the peer is a trusted proxy."""
    networks = tuple(trusted)

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        found = resolve(request.remote, request.headers.getall(hdrs.X_FORWARDED_FOR, ()),
                        request.headers.getall(hdrs.X_FORWARDED_PROTO, ()), networks)
        if found is None:
            return await handler(request)
        request[CLIENT] = found.remote  # for the access log, which gets this object
        if found.scheme is None:
            return await handler(request.clone(remote=found.remote))
        return await handler(request.clone(remote=found.remote, scheme=found.scheme))

    return forwarded


def client_of(request: web.BaseRequest) -> str | None:
    """The client's address: the forwarded one on aiohttp's request object, when the
    middleware found one, else the TCP peer."""
    return request.get(CLIENT) or request.remote
