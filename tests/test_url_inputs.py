"""Fetching images from URLs (serve_app/url_inputs.py): what is refused and what is
fetched, against a real local HTTP(S) server. No Ray.

Two things cannot run here and are injected, as each test says: DNS answers (a
resolver plays the name server, e.g. a rebinding one) and servers on the public
internet (an httpx MockTransport stands for them; nothing here reaches the
internet). Everything on 127.0.0.1 is real sockets.
"""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest
import trustme

from serve_app.problems import ProblemError
from serve_app.url_inputs import UrlFetcher, refusal_reason, system_resolver
from tests.image_server import ImageServer
from tests.test_remove_background_api import red_disc_png

IMAGE, _ = red_disc_png(64, 48)
PUBLIC_IP = "93.184.215.14"  # a public address, played by MockTransport where used


@pytest.fixture(scope="module")
def server():
    with ImageServer(IMAGE) as running:
        yield running


def fetcher(**overrides) -> UrlFetcher:
    settings = dict(max_bytes=1_000_000, timeout_s=5, max_redirects=3, allow_private_networks=False)
    settings.update(overrides)
    return UrlFetcher(**settings)


def fetch(url: str, **overrides) -> bytes:
    return asyncio.run(fetcher(**overrides).fetch(url))


def problem(url: str, **overrides) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        fetch(url, **overrides)
    return raised.value


def static_resolver(answers: dict[str, list[str]], calls: list[str] | None = None):
    """A name server playing `answers` (what no real DNS here would say); other
    names (numeric spellings such as 2130706433) go to the system's resolver."""
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in answers:
            return await system_resolver(host, port)
        return answers[host]
    return resolve


def rebinding_resolver(name: str, first: str, later: str, calls: list[str]):
    """A name server that answers `first` once, then `later` for ever (DNS rebinding)."""
    answers = {name: [first]}
    base = static_resolver(answers, calls)

    async def resolve(host: str, port: int) -> list[str]:
        answer = await base(host, port)
        answers[name] = [later]
        return answer
    return resolve


def public_internet(handler) -> httpx.MockTransport:
    """Stands in for servers on the public internet, which cannot be reached here."""
    return httpx.MockTransport(handler)


# --- the address classes -----------------------------------------------------------

REFUSED = {
    "127.0.0.1": "loopback", "127.255.255.254": "loopback", "::1": "loopback",
    "10.0.0.1": "private", "172.16.0.1": "private", "192.168.1.1": "private", "fc00::1": "private",
    "fd00:ec2::254": "private",
    "169.254.169.254": "link-local", "fe80::1": "link-local", "fe80::1%eth0": "link-local",
    "0.0.0.0": "unspecified", "::": "unspecified",
    "224.0.0.1": "multicast", "239.255.255.250": "multicast", "ff02::1": "multicast", "ff0e::1": "multicast",
    "240.0.0.1": "reserved", "255.255.255.255": "reserved",
    "100.64.0.1": "not a public", "192.0.2.1": "private", "198.18.0.1": "private", "2001:db8::1": "private",
    "::ffff:127.0.0.1": "loopback", "::ffff:7f00:1": "loopback", "::ffff:10.0.0.1": "private",
    "::ffff:169.254.169.254": "link-local",
    "64:ff9b::7f00:1": "loopback",        # NAT64 of 127.0.0.1
    "64:ff9b::a00:1": "private",          # NAT64 of 10.0.0.1
    "2002:7f00:1::": "loopback",          # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::": "link-local",     # 6to4 of 169.254.169.254
    "::7f00:1": "reserved",               # IPv4-compatible (deprecated) ::127.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe": "loopback",  # Teredo, client 127.0.0.1
}


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_non_public_address_is_refused_with_its_class(address):
    reason = refusal_reason(address)
    assert reason is not None and REFUSED[address] in reason


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111",
                                     "2a00:1450:4001:80e::200e", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_address_is_allowed(address):
    assert refusal_reason(address) is None


def test_private_network_opt_in_allows_loopback_but_never_multicast_or_unspecified():
    assert refusal_reason("127.0.0.1", allow_private=True) is None
    assert refusal_reason("10.1.2.3", allow_private=True) is None
    assert "multicast" in refusal_reason("224.0.0.1", allow_private=True)
    assert "unspecified" in refusal_reason("0.0.0.0", allow_private=True)


# --- URLs that point at this machine, however spelled -------------------------------------

LOOPBACK_SPELLINGS = [
    "http://127.0.0.1:{port}/image.png",
    "http://2130706433:{port}/image.png",      # decimal
    "http://0x7f.1:{port}/image.png",          # hex, short form
    "http://0x7f000001:{port}/image.png",      # hex, one number
    "http://0x7f.0x0.0x0.0x1:{port}/image.png",  # hex, dotted
    "http://017700000001:{port}/image.png",    # octal
    "http://127.1:{port}/image.png",           # short form
    "http://localhost:{port}/image.png",
    "http://[::1]:{port}/image.png",
    "http://[::ffff:127.0.0.1]:{port}/image.png",
    "http://[::ffff:7f00:1]:{port}/image.png",
    "http://[0:0:0:0:0:ffff:7f00:1]:{port}/image.png",
    "http://0:{port}/image.png",               # 0.0.0.0: this host
    "http://0.0.0.0:{port}/image.png",
    "http://127.0.0.1:{port}#@example.com/image.png",
    "HTTP://127.0.0.1:{port}/image.png",
]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_url_to_this_machine_is_refused_and_never_connected(server, spelling):
    before = server.seen.connections
    refused = problem(spelling.format(port=server.port))
    assert refused.status == 422 and refused.slug == "url-refused", refused.detail
    assert "only public internet addresses" in refused.detail
    assert server.seen.connections == before


@pytest.mark.parametrize("url", [
    "http://example.com@127.0.0.1:{port}/image.png",
    "http://user:pw@127.0.0.1:{port}/image.png",
    "http://example.com\\@127.0.0.1:{port}/image.png",
])
def test_url_with_credentials_is_refused(server, url):
    refused = problem(url.format(port=server.port))
    assert refused.status == 422 and refused.slug == "invalid-url" and "credentials" in refused.detail


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com/",
                                 "data:image/png;base64,iVBORw0KGgo=", "//example.com/a.png", "not a url",
                                 "http://", "javascript:alert(1)", "http://[::1/", "http://0177.0.0.1/",
                                 "x" * 3000])
def test_url_that_is_not_http_or_https_is_invalid(url):
    refused = problem(url)
    assert refused.status == 422 and refused.slug == "invalid-url"


def test_host_that_does_not_resolve_cannot_be_fetched():
    failed = problem("http://nothing-here.invalid/a.png")
    assert failed.status == 422 and "does not resolve" in failed.detail


def test_name_resolving_to_any_private_address_is_refused(server):
    # A name with one public and one private answer: refused whole.
    resolver = static_resolver({"mixed.test": [PUBLIC_IP, "10.0.0.7"]})
    refused = problem("http://mixed.test/a.png", resolver=resolver)
    assert refused.status == 422 and "10.0.0.7" in refused.detail and "private" in refused.detail


# --- DNS rebinding: the vetted address is the one connected to --------------------------------


def test_rebinding_name_is_fetched_from_the_vetted_public_address_not_loopback(server):
    # The name server answers a public address first, then 127.0.0.1 (injected:
    # no real DNS here plays a rebinding server). The public server is a
    # MockTransport. The request must go to the first, vetted answer.
    calls: list[str] = []
    sent: list[httpx.Request] = []

    def public(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=IMAGE)

    body = fetch(f"http://rebind.test:{server.port}/image.png", transport=public_internet(public),
                 resolver=rebinding_resolver("rebind.test", PUBLIC_IP, "127.0.0.1", calls))
    assert body == IMAGE
    assert calls == ["rebind.test"]  # resolved once, by the vetting
    assert [request.url.host for request in sent] == [PUBLIC_IP]
    assert sent[0].headers["host"] == f"rebind.test:{server.port}"
    assert server.seen.connections == 0


def test_connection_goes_to_the_resolved_address_and_never_resolves_the_name_again(server):
    # Real sockets: "pinned.test" exists in no DNS here, so the fetch can only
    # succeed by connecting to the address the vetting resolved (127.0.0.1, allowed
    # by the private-network opt-in); the second answer, an unreachable public
    # address, would be used by anything that resolved again.
    calls: list[str] = []
    body = fetch(f"http://pinned.test:{server.port}/image.png", allow_private_networks=True,
                 resolver=rebinding_resolver("pinned.test", "127.0.0.1", PUBLIC_IP, calls))
    assert body == IMAGE and calls == ["pinned.test"]
    assert ("/image.png", f"pinned.test:{server.port}") in server.seen.requests


def test_https_to_a_pinned_address_verifies_the_certificate_against_the_name(tmp_path):
    authority = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("images.test").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    authority.configure_trust(client_tls)
    resolver = static_resolver({"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    with ImageServer(IMAGE, tls=server_tls) as https:
        body = fetch(https.url("/image.png", host="images.test", scheme="https"), resolver=resolver,
                     allow_private_networks=True, ssl_context=client_tls)
        assert body == IMAGE
        assert ("/image.png", f"images.test:{https.port}") in https.seen.requests
        # Same address, a name the certificate does not carry: refused by TLS.
        failed = problem(https.url("/image.png", host="other.test", scheme="https"), resolver=resolver,
                         allow_private_networks=True, ssl_context=client_tls)
        assert failed.status == 422 and "certificate" in failed.detail.lower()


# --- redirects -------------------------------------------------------------------------------


@pytest.mark.parametrize("location", [
    "http://127.0.0.1:{port}/image.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:{port}/image.png",
    "http://2130706433:{port}/image.png",
    "http://internal.test/image.png",       # a name resolving to 10.0.0.5
    "file:///etc/passwd",
    "http://user@example.com/",
])
def test_redirect_to_a_refused_url_is_refused(server, location):
    # The first hop is a public server (MockTransport); its redirect is vetted like a URL.
    location = location.format(port=server.port)
    resolver = static_resolver({"public.test": [PUBLIC_IP], "internal.test": ["10.0.0.5"]})

    def public(request: httpx.Request) -> httpx.Response:
        assert request.url.host == PUBLIC_IP  # the mock is never asked for anything else
        return httpx.Response(302, headers={"Location": location})

    before = server.seen.connections
    refused = problem("http://public.test/photo.png", resolver=resolver, transport=public_internet(public))
    assert refused.status == 422 and refused.slug == "url-refused", refused.detail
    assert "redirect" in refused.detail
    assert server.seen.connections == before


def test_redirects_are_followed_up_to_the_limit(server):
    assert fetch(server.url("/redirect/2"), allow_private_networks=True, max_redirects=2) == IMAGE


def test_one_redirect_past_the_limit_is_refused(server):
    failed = problem(server.url("/redirect/3"), allow_private_networks=True, max_redirects=2)
    assert failed.status == 422 and "more than 2 redirects" in failed.detail


def test_absolute_redirect_to_an_allowed_host_is_followed(server):
    target = server.url("/image.png", host="localhost")
    assert fetch(server.url(f"/to?url={target}"), allow_private_networks=True) == IMAGE


# --- limits and failures ---------------------------------------------------------------------------


def test_body_declared_over_the_limit_is_refused(server):
    failed = problem(server.url("/declared-big/5000"), allow_private_networks=True, max_bytes=4000)
    assert failed.status == 413 and "4000 bytes" in failed.detail


def test_streamed_body_over_the_limit_is_refused_while_reading(server):
    failed = problem(server.url("/stream-big/100000000"), allow_private_networks=True, max_bytes=50_000)
    assert failed.status == 413 and failed.slug == "url-too-large"


def test_body_at_the_limit_is_accepted(server):
    assert len(fetch(server.url("/declared-big/4000"), allow_private_networks=True, max_bytes=4000)) == 4000


def test_slow_server_times_out_with_408(server):
    failed = problem(server.url("/slow"), allow_private_networks=True, timeout_s=0.5)
    assert failed.status == 408 and failed.slug == "url-timeout" and "0.5 s" in failed.detail


@pytest.mark.parametrize("status", [404, 500, 503])
def test_remote_error_status_becomes_a_422_naming_it(server, status):
    failed = problem(server.url(f"/status/{status}"), allow_private_networks=True)
    assert failed.status == 422 and str(status) in failed.detail


def test_compressed_body_is_refused(server):
    failed = problem(server.url("/gzip"), allow_private_networks=True)
    assert failed.status == 422 and "gzip" in failed.detail


def test_closed_port_cannot_be_fetched(server):
    with ImageServer(IMAGE) as closed:
        port = closed.port
    failed = problem(f"http://127.0.0.1:{port}/image.png", allow_private_networks=True)
    assert failed.status == 422 and "could not connect" in failed.detail


def test_environment_proxy_is_not_used(server, monkeypatch):
    # A proxy would connect wherever it likes on our behalf; it is ignored.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    assert fetch(server.url("/image.png"), allow_private_networks=True) == IMAGE
