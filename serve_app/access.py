"""Who may call the API: optional API keys, per-key rate limits, and CORS.

With no key configured the API is open, as a service on 127.0.0.1 is. With keys
(the `STRATA_API_KEYS` environment variable, comma-separated, and/or the file
`auth.api_keys_file`, one per line; either form may be `name:key`; a source that is
set but holds no key is a startup error, not an open API) every request
must carry one, as `Authorization: Bearer <key>` or `X-Api-Key: <key>` (the
latter wins when both are sent), except on the open paths: the web page (`/`,
`/static/...`), liveness (`/healthz`) and the API reference (`/docs`, `/redoc`,
`/openapi.json`).

The web page cannot put a header on what the browser fetches by itself (its
EventSource, `<img>` and download links), so it signs in once: `POST /v1/session`
with a key sets an HttpOnly, SameSite=Strict cookie holding it, and the cookie then
counts as the key under `/v1/` (Strata's own API, all the page calls; the
compatible APIs' clients send header keys, and a cookie there would let a link run
their GET routes). Over HTTPS the cookie is `__Host-strata_key`, which browsers
refuse to let any other host (a sibling subdomain) set; over plain HTTP, where that
prefix cannot be used, `strata_key`. A request carrying the cookie's name twice
(one of them tossed in by another host) carries no cookie key. Against cross-site
request forgery the cookie counts on a request that changes something (any method
but GET/HEAD/OPTIONS) only with an `X-Requested-With` header, which a form on
another site cannot send and a script there cannot without a CORS grant. Signing
out (`DELETE /v1/session`) is open: clearing a cookie needs no key, and a revoked or
rate-limited one must not keep the page signed in.

`AccessMiddleware` wraps the whole app, so every route family (Strata's own and
the compatible APIs) is covered without declaring anything, and unknown paths
answer 401 too rather than telling a stranger what exists. It records who called
in the request's state (`request_owner`): a key id, never the key -- `name:<name>`
for a named key (so a renamed-in-place rotation keeps its jobs), else
`key:<first 16 hex of its SHA-256>`. Jobs are stored under that id and a key sees
only its own. Keys are compared in constant time (digests, every key checked)
and never logged or echoed.

Rate limits (`auth.rate_limit`, e.g. `60/minute`) count requests per key (per
client address when no keys are set) in memory, per ingress replica: with N
replicas a key may make up to N times the rate. Past it: 429 with `Retry-After`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request, cookie_parser
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.config import AuthConfig, CorsConfig
from serve_app.problems import problem_response
from serve_app.schemas import Problem

__all__ = ["AccessControl", "AccessMiddleware", "COOKIE", "ConfiguredCORSMiddleware", "ENV_VAR", "HTTPS_COOKIE",
           "is_open_path", "is_open_request", "presented_key", "request_owner", "set_key_cookie"]

ENV_VAR = "STRATA_API_KEYS"
COOKIE = "strata_key"
HTTPS_COOKIE = "__Host-strata_key"
_COOKIE_PREFIX = "/v1/"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/", "/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
OPEN_PREFIXES = ("/static/",)
OPEN_OPERATIONS = frozenset({("DELETE", "/v1/session")})
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# The caller's key id travels in the request's own ASGI scope (never a dict that
# requests could share, such as the lifespan state).
_OWNER_SCOPE_KEY = "strata.owner"


def is_open_path(path: str) -> bool:
    """Whether `path` is served without a key (the page, liveness, the API reference).
    A path with `.`/`..` segments is never open, however it starts."""
    if any(part in (".", "..") for part in path.split("/")):
        return False
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def is_open_request(method: str, path: str) -> bool:
    """Whether a `method` request to `path` is served without a key: the open paths,
    and signing the page out."""
    return is_open_path(path) or (method, path) in OPEN_OPERATIONS


async def request_owner(request: Request) -> str | None:
    """The key id of the request's caller; None when the API is open (no keys
    configured): then every job is everyone's. A FastAPI dependency (async, so
    FastAPI calls it on the event loop rather than through its thread pool)."""
    return request.scope.get(_OWNER_SCOPE_KEY)


@dataclass(frozen=True)
class _Key:
    key_id: str
    digest: bytes


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(entries: Iterable[str], source: str) -> list[_Key]:
    """Keys from `entries` (`key` or `name:key`, split at the first ':'; blank entries
    and `#` comments skipped); ValueError naming `source` for a malformed one, without
    the key. A key is printable ASCII without spaces: headers arrive as bytes, read as
    Latin-1, so a key with other characters would not match what clients send (UTF-8)."""
    keys = []
    for number, raw in enumerate(entries, 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        name, separator, key = entry.partition(":")
        if not separator:
            name, key = "", entry
        if not key or not all("!" <= c <= "~" for c in key):
            raise ValueError(f"{source}, entry {number}: a key must be non-empty printable ASCII without spaces")
        if separator and not _NAME.fullmatch(name):
            raise ValueError(f"{source}, entry {number}: a key name is 1-64 letters, digits, '_', '.', '-'")
        key_id = f"name:{name}" if separator else f"key:{_digest(key).hex()[:16]}"
        keys.append(_Key(key_id, _digest(key)))
    return keys


class AccessControl:
    """The keys and rate limits of one ingress replica."""

    def __init__(self, keys: list[_Key], rate_limit: str | None = None, trusted_proxies: Iterable[str] = ()):
        self._keys = keys
        self._trusted_proxies = frozenset(trusted_proxies)
        self._limits: list[RateLimitItem] = parse_many(rate_limit) if rate_limit else []
        self._limiter = MovingWindowRateLimiter(MemoryStorage()) if self._limits else None

    @classmethod
    def from_config(cls, auth: AuthConfig, environ: Mapping[str, str] = os.environ) -> AccessControl:
        """Keys from `environ[STRATA_API_KEYS]` and `auth.api_keys_file`; a file that
        cannot be read, a malformed key, or a source that is set but holds no key is a
        startup error. Neither set: no keys (the API is open)."""
        sources = []
        if ENV_VAR in environ:
            sources.append((f"${ENV_VAR}", environ[ENV_VAR].split(",")))
        if auth.api_keys_file:
            path = Path(auth.api_keys_file).expanduser()
            sources.append((str(path), path.read_text().splitlines()))
        keys = []
        for source, entries in sources:
            found = parse_keys(entries, source)
            if not found:  # meant to lock the API, it would leave it open
                raise ValueError(f"{source} is set but holds no API key (only blank entries or comments); "
                                 f"add a key, or unset it to run the API without keys")
            keys += found
        return cls(keys, auth.rate_limit, auth.trusted_proxies)

    def client_address(self, scope: Scope) -> str:
        """The address a request came from: the peer's, or, when the peer is a trusted
        proxy, the last X-Forwarded-For entry (the one that proxy set)."""
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if peer in self._trusted_proxies:
            forwarded = _header(scope, b"x-forwarded-for")
            if forwarded:
                return forwarded.decode("latin-1").rsplit(",", 1)[-1].strip() or peer
        return peer

    @property
    def keys_required(self) -> bool:
        return bool(self._keys)

    def identify(self, presented: str | None) -> str | None:
        """The key id of `presented`, or None when it is no configured key."""
        if presented is None:
            return None
        digest, found = _digest(presented), None
        for key in self._keys:  # every key compared: the time says nothing about which matched
            if hmac.compare_digest(digest, key.digest):
                found = key.key_id
        return found

    def retry_after(self, who: str) -> int | None:
        """Count a request of `who`: None when it is within the rate limit, else the
        seconds until it would be."""
        if self._limiter is None:
            return None
        refused = [item for item in self._limits if not self._limiter.hit(item, who)]
        if not refused:
            return None
        resets = [self._limiter.get_window_stats(item, who).reset_time for item in refused]
        return max(1, math.ceil(max(resets) - time.time()))

    def describe_limit(self) -> str:
        """The configured rate, in words ("60 per 1 minute")."""
        return " and ".join(str(item) for item in self._limits)


def _over_https(scope: Scope) -> bool:
    """Whether the browser reached us over HTTPS (directly or through a TLS-ending proxy)."""
    return scope.get("scheme") == "https" or _header(scope, b"x-forwarded-proto") == b"https"


def _cookie_name(scope: Scope) -> str:
    """The page's key cookie for this request: `__Host-` over HTTPS (no other host can
    set it), the plain name over HTTP (the prefix needs Secure)."""
    return HTTPS_COOKIE if _over_https(scope) else COOKIE


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The last value of header `name` (lower case)."""
    found = None
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            found = value
    return found


def _cookie_key(scope: Scope) -> str | None:
    """The key in the page's cookie; None without one, or with the name twice (which
    one the browser sent first says nothing about which is the page's own)."""
    name = _cookie_name(scope)
    header = "; ".join(value.decode("latin-1") for key, value in scope.get("headers", ())
                       if key.lower() == b"cookie")
    if sum(1 for pair in header.split(";") if pair.partition("=")[0].strip() == name) != 1:
        return None
    value = cookie_parser(header).get(name)
    return unquote(value) if value else None


def presented_key(scope: Scope) -> str | None:
    """The key a request carries: `X-Api-Key`, else `Authorization: Bearer`, else the
    page's cookie (only under `/v1/`; on a request that changes something, only with
    `X-Requested-With`)."""
    api_key = _header(scope, b"x-api-key")
    if api_key is not None:
        return api_key.decode("latin-1").strip()
    authorization = (_header(scope, b"authorization") or b"").decode("latin-1")
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if not scope.get("path", "").startswith(_COOKIE_PREFIX):
        return None
    if scope.get("method") in _SAFE_METHODS or _header(scope, b"x-requested-with"):
        return _cookie_key(scope)
    return None


def set_key_cookie(response: Response, scope: Scope, key: str | None) -> None:
    """Make `response` set the page's key cookie of request `scope` to `key` (None:
    remove it). It lasts until the browser closes, and only pages of this origin's
    site send it."""
    name, secure = _cookie_name(scope), _over_https(scope)
    if key is None:
        response.delete_cookie(name, path="/", secure=secure, httponly=True, samesite="strict")
    else:  # percent-encoded: a key may hold characters a cookie value may not
        response.set_cookie(name, quote(key, safe=""), path="/", secure=secure, httponly=True, samesite="strict")


# How an API words a refusal (401: no valid key, 429: rate limit used up):
# (request, status, title, detail, headers) -> the response.
Refusal = Callable[[Request, int, str, str, dict[str, str]], Response]


class AccessMiddleware:
    """Checks the key and the rate of every request outside the open paths (ASGI).

    Refusals are problem+json, except under the path prefixes of `refusals`: the
    compatible APIs (serve_app/routes/*_compat.py) answer in their own error shapes.
    """

    def __init__(self, app: ASGIApp, access: Callable[[], AccessControl],
                 refusals: Mapping[str, Refusal] | None = None):
        self.app = app
        self._access = access  # looked up per request: the replica's config arrives after import
        self._refusals = dict(refusals or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open_request(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        access = self._access()
        address = access.client_address(scope)
        if access.keys_required:
            presented = presented_key(scope)
            who = access.identify(presented)
            if who is None:
                # Wrong keys count against the rate of the address they come from: at
                # the configured rate, guessing a key is not a matter of sending more.
                if presented is not None and await self._rate_limited(access, f"wrong-key:{address}",
                                                                      scope, receive, send):
                    return
                await self._unauthorized(scope, receive, send, missing=presented is None)
                return
            scope[_OWNER_SCOPE_KEY] = who
        else:
            who = f"address:{address}"
        if await self._rate_limited(access, who, scope, receive, send):
            return
        await self.app(scope, receive, send)

    async def _rate_limited(self, access: AccessControl, who: str, scope: Scope, receive: Receive,
                            send: Send) -> bool:
        """Count a request of `who`; past the rate, answer it 429 and say so."""
        retry_after = access.retry_after(who)
        if retry_after is None:
            return False
        response = self._refusal(
            scope, 429, "Too many requests",
            f"the rate limit of {access.describe_limit()} is used up; retry in {retry_after} s",
            slug="rate-limited", headers={"Retry-After": str(retry_after)})
        await response(scope, receive, send)
        return True

    async def _unauthorized(self, scope: Scope, receive: Receive, send: Send, *, missing: bool) -> None:
        detail = ("this service needs an API key: send it as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'"
                  if missing else "the API key is not valid here")
        response = self._refusal(scope, 401, "Unauthorized", detail, slug="unauthorized",
                                 headers={"WWW-Authenticate": 'Bearer realm="strata"'})
        await response(scope, receive, send)

    def _refusal(self, scope: Scope, status: int, title: str, detail: str, *, slug: str,
                 headers: dict[str, str]) -> Response:
        request = Request(scope)
        for prefix, refusal in self._refusals.items():
            if scope["path"].startswith(prefix):
                return refusal(request, status, title, detail, headers)
        return problem_response(request, status, title, detail, slug=slug, headers=headers)


class ConfiguredCORSMiddleware:
    """Starlette's CORSMiddleware with the replica's `cors` config, built on the first
    request (the config arrives after the app is imported); no origins: no CORS."""

    def __init__(self, app: ASGIApp, cors: Callable[[], CorsConfig]):
        self.app = app
        self._cors = cors
        self._handler: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._handler is None:
            config = self._cors()
            self._handler = self.app if not config.allow_origins else CORSMiddleware(
                self.app, allow_origins=config.allow_origins, allow_methods=config.allow_methods,
                allow_headers=config.allow_headers, expose_headers=config.expose_headers,
                allow_credentials=config.allow_credentials, max_age=config.max_age_s)
        await self._handler(scope, receive, send)


SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
    "Bearer": {"type": "http", "scheme": "bearer"},
}


def declare_in_openapi(app, access: Callable[[], "AccessControl | None"]) -> None:
    """Make `app.openapi()` say, where this deployment requires keys (`access()`),
    which operations take one (all but the open paths) and that they may answer
    401 and 429. Without keys (or with no deployment: `access()` is None) the
    document declares no security: it is open."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        control = access()
        if control is None or not control.keys_required:
            app.openapi_schema = schema
            return schema
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        problem = {"application/problem+json": {"schema": Problem.model_json_schema()}}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if is_open_request(method.upper(), path):
                    continue
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
                responses = operation.setdefault("responses", {})
                responses.setdefault("401", {"description": "No valid API key (where keys are configured)",
                                             "content": problem})
                responses.setdefault("429", {"description": "Rate limit used up: retry after Retry-After seconds",
                                             "content": problem})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
