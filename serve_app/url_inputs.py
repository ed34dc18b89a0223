"""Fetching an image from a URL a client names, without letting the URL reach inside.

A URL input makes the service an HTTP client on the caller's behalf, so a URL
could point it at the machine itself (`http://127.0.0.1:8265/`), the private
network, or a cloud metadata endpoint (`http://169.254.169.254/`). `UrlFetcher`
refuses all of those:

- only `http` and `https`, no credentials in the URL;
- the host is resolved here, every address it resolves to is vetted (private,
  loopback, link-local, multicast, reserved, unspecified, shared and other
  special-purpose addresses are refused, IPv4 and IPv6 alike, including IPv4
  addresses embedded in IPv6: mapped `::ffff:a.b.c.d`, 6to4, NAT64, Teredo);
- the connection goes to the vetted address itself: the request URL carries the
  IP and the original name travels as the `Host` header and the TLS server name
  (httpx's `sni_hostname` request extension; certificates are verified against
  the name). Nothing resolves the name a second time, so DNS rebinding between
  the check and the connection cannot redirect it;
- redirects are followed by hand, each hop parsed, resolved and vetted again, at
  most `max_redirects`;
- the body is read as it streams and refused past `max_bytes`; the whole fetch,
  every hop included, has one deadline. No proxy from the environment is used
  (it would connect on our behalf to wherever it likes), connections are never
  reused (a TLS connection made for one name must not serve another), and
  content encodings are refused (a compressed body could expand past the limit
  in one chunk).

Errors are `ProblemError`s a client can act on, all 4xx: the URL is the
client's input, and a remote server's failure is not this service's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable

import httpx

from serve_app.problems import ProblemError

__all__ = ["Resolver", "UrlFetcher", "refusal_reason", "system_resolver"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""Resolves (host, port) to IP address strings; injectable so tests can play DNS."""

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_URL_LENGTH = 2048
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_USER_AGENT = "Strata-url-input/1"


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operating system resolves `host` to, in its order of preference.

    Numeric spellings (`2130706433`, `0x7f.1`, `127.1`) resolve here to the address
    they denote, so they are vetted as that address."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, which the network may deliver to:
    IPv4-mapped, 6to4, Teredo (the client) and NAT64 (the well-known prefix)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal_reason(address: str | IPAddress, *, allow_private: bool = False) -> str | None:
    """Why the service must not connect to `address` ("a loopback address", ...), or
    None when it may: a public internet address. With `allow_private` (tests and
    development only) private, loopback, link-local and reserved addresses are
    allowed too; unspecified and multicast addresses never are."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = refusal_reason(embedded, allow_private=allow_private)
            if reason is not None:
                return f"{reason} ({embedded}, inside the IPv6 address {ip})"
            if ip.ipv4_mapped is not None or ip in _NAT64:
                # Delivered to the IPv4 address alone (NAT64 is how IPv6-only
                # networks reach public IPv4 sites), so its class decides.
                return None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if allow_private:
        return None
    for test, reason in (
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private or special-purpose address"),
        (not ip.is_global, "not a public internet address"),
    ):
        if test:
            return reason
    return None


def _refused(detail: str) -> ProblemError:
    return ProblemError(422, "URL refused", detail, slug="url-refused")


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, "Invalid URL", detail, slug="invalid-url")


def _failed(detail: str) -> ProblemError:
    return ProblemError(422, "Could not fetch the URL", detail, slug="url-fetch-failed")


def parse_url(url: str) -> httpx.URL:
    """`url` as the client will send it, when it is an absolute http(s) URL with a
    host and no credentials; else a 422."""
    if len(url) > _MAX_URL_LENGTH:
        raise _invalid(f"the URL is longer than {_MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise _invalid(f"{url!r} is not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        raise _invalid(f"{url!r}: only http and https URLs are fetched")
    if not parsed.host:
        raise _invalid(f"{url!r} names no host")
    if parsed.userinfo:
        # `http://example.com@127.0.0.1/` goes to 127.0.0.1: credentials in a URL
        # are refused outright, so no one is misled about where it points.
        raise _invalid(f"{url!r}: URLs with credentials (user:password@) are not fetched")
    return parsed


class UrlFetcher:
    """Fetches one URL's body under the limits it was made with.

    :param resolver: host name to addresses; the system's by default. Tests inject
        one to play DNS answers (rebinding) that cannot be arranged here.
    :param ssl_context: certificates to trust; the certifi bundle by default.
    :param transport: an httpx transport; tests inject one to stand in for servers
        on the public internet, which cannot be reached here.
    """

    def __init__(self, *, max_bytes: int, timeout_s: float, max_redirects: int,
                 allow_private_networks: bool = False, resolver: Resolver = system_resolver,
                 ssl_context: ssl.SSLContext | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.allow_private_networks = allow_private_networks
        self._resolver = resolver
        self._ssl_context = ssl_context or httpx.create_ssl_context()
        self._transport = transport

    async def fetch(self, url: str) -> bytes:
        """The body of `url` (after redirects), or a 4xx `ProblemError` saying why not."""
        target = parse_url(url)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(target)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise ProblemError(408, "URL fetch timed out",
                               f"fetching {url} did not finish within {self.timeout_s:g} s",
                               slug="url-timeout") from exc

    async def _fetch(self, target: httpx.URL) -> bytes:
        client = httpx.AsyncClient(
            transport=self._transport, verify=self._ssl_context, trust_env=False, follow_redirects=False,
            timeout=self.timeout_s, limits=httpx.Limits(max_keepalive_connections=0),
        )
        async with client:
            for hop in range(self.max_redirects + 1):
                addresses = await self._vetted_addresses(target, redirected=hop > 0)
                response = await self._connect(client, target, addresses)
                try:
                    if response.status_code in _REDIRECTS:
                        target = self._redirect_target(target, response)
                        continue
                    if not 200 <= response.status_code < 300:
                        raise _failed(f"{target} answered {response.status_code} "
                                      f"{response.reason_phrase}".rstrip())
                    return await self._read(target, response)
                finally:
                    await response.aclose()
        raise _failed(f"more than {self.max_redirects} redirects; the last pointed to {target}")

    async def _vetted_addresses(self, target: httpx.URL, *, redirected: bool) -> list[str]:
        host = target.raw_host.decode("ascii")
        what = f"the redirect to {target}" if redirected else str(target)
        try:
            addresses = [str(ipaddress.ip_address(host))]  # an IP literal needs no lookup
        except ValueError:
            addresses = None
        try:
            if addresses is None:
                addresses = await self._resolver(host, target.port or _default_port(target))
        except (OSError, UnicodeError) as exc:
            raise _failed(f"{what}: the host {host} does not resolve ({exc})") from exc
        if not addresses:
            raise _failed(f"{what}: the host {host} resolves to no address")
        for address in addresses:
            try:
                reason = refusal_reason(address, allow_private=self.allow_private_networks)
            except ValueError as exc:
                raise _refused(f"{what}: the host {host} resolves to {address!r}, not an IP address") from exc
            if reason is not None:
                shown = "" if host == address else f"its host {host} resolves to {address}, "
                raise _refused(f"{what} is refused: {shown}{reason}; only public internet addresses are fetched")
        return addresses

    async def _connect(self, client: httpx.AsyncClient, target: httpx.URL, addresses: list[str]) -> httpx.Response:
        """The response of the first vetted address that accepts a connection."""
        headers = {
            # The name the URL gave, though the connection goes to the vetted IP.
            "Host": target.netloc.decode("ascii"),
            "User-Agent": _USER_AGENT,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
        }
        failure: Exception | None = None
        for address in addresses:
            request = client.build_request("GET", target.copy_with(host=address), headers=headers,
                                           extensions={"sni_hostname": target.raw_host.decode("ascii")})
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                failure = exc
            except httpx.TimeoutException:
                raise
            except httpx.HTTPError as exc:
                raise _failed(f"{target}: {_describe(exc)}") from exc
        raise _failed(f"{target}: could not connect ({_describe(failure)})")

    def _redirect_target(self, current: httpx.URL, response: httpx.Response) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise _failed(f"{current} answered {response.status_code} without a Location")
        try:
            joined = current.join(location)
        except (httpx.InvalidURL, ValueError) as exc:
            raise _failed(f"{current} redirected to an invalid URL {location!r}") from exc
        try:
            return parse_url(str(joined))
        except ProblemError as exc:
            raise _refused(f"the redirect from {current} is refused: {exc.detail}") from exc

    async def _read(self, target: httpx.URL, response: httpx.Response) -> bytes:
        too_large = ProblemError(413, "URL body too large",
                                 f"{target} holds more than the limit of {self.max_bytes} bytes",
                                 slug="url-too-large")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _failed(f"{target} sent a {encoding!r}-encoded body; only unencoded bodies are accepted")
        chunks, received = [], 0
        try:
            async for chunk in response.aiter_bytes():  # = raw: encoded bodies were refused above
                received += len(chunk)
                if received > self.max_bytes:
                    raise too_large
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as exc:
            raise _failed(f"{target}: the body broke off ({_describe(exc)})") from exc
        return b"".join(chunks)


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no address"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."
