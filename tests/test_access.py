"""API keys, rate limits and open paths (serve_app/access.py), without Ray.

The middleware runs here around a small Starlette app through Starlette's
TestClient (real ASGI); tests/test_access_api.py runs it in the real service.
"""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serve_app.access import (
    COOKIE,
    HTTPS_COOKIE,
    AccessControl,
    AccessMiddleware,
    is_open_path,
    is_open_request,
    parse_keys,
    request_owner,
)
from serve_app.config import AppConfig, AuthConfig

METHODS = ["GET", "POST", "DELETE"]
HTTPS = {"X-Forwarded-Proto": "https"}  # as a TLS-ending proxy says the browser came


def app_with(access: AccessControl) -> TestClient:
    async def whoami(request):
        return PlainTextResponse(str(await request_owner(request)))

    # /api/ and /v1.0/ stand for the compatible APIs.
    app = Starlette(routes=[Route(f"{prefix}/whoami", whoami, methods=METHODS) for prefix in ("/v1", "/api", "/v1.0")]
                    + [Route("/healthz", whoami)])
    app.add_middleware(AccessMiddleware, access=lambda: access)
    return TestClient(app)


def test_keys_come_from_the_environment_and_the_file_together(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nalice:alice-secret-1\n\nbob-secret-2\n")
    access = AccessControl.from_config(AuthConfig(api_keys_file=str(keys_file)),
                                       {"STRATA_API_KEYS": "carol:carol-secret-3, dave-secret-4"})
    assert access.identify("alice-secret-1") == "name:alice"
    assert access.identify("carol-secret-3") == "name:carol"
    assert access.identify("bob-secret-2").startswith("key:")
    assert access.identify("dave-secret-4").startswith("key:")
    assert access.identify("nobody") is None and access.identify(None) is None


def test_key_id_of_an_unnamed_key_is_a_digest_not_the_key():
    [key] = parse_keys(["sk-very-secret-value"], "test")
    assert key.key_id.startswith("key:") and "secret" not in key.key_id and len(key.key_id) == 20


def test_no_keys_means_the_api_is_open():
    access = AccessControl.from_config(AuthConfig(), {})
    assert not access.keys_required
    assert app_with(access).get("/v1/whoami").text == "None"


def test_keys_file_without_a_key_is_a_startup_error_naming_it(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# alice:to-be-added\n\n")
    with pytest.raises(ValueError, match=f"{keys_file} is set but holds no API key"):
        AccessControl.from_config(AuthConfig(api_keys_file=str(keys_file)), {})


@pytest.mark.parametrize("value", ["", " , "])
def test_environment_variable_without_a_key_is_a_startup_error_naming_it(value):
    with pytest.raises(ValueError, match=r"\$STRATA_API_KEYS is set but holds no API key"):
        AccessControl.from_config(AuthConfig(), {"STRATA_API_KEYS": value})


def test_an_entry_with_a_colon_is_a_name_and_a_key():
    access = AccessControl(parse_keys(["alice:sk:with-colon"], "test"))
    assert access.identify("sk:with-colon") == "name:alice"
    assert access.identify("alice:sk:with-colon") is None


def test_non_ascii_key_is_a_startup_error_that_does_not_show_the_key():
    with pytest.raises(ValueError, match="printable ASCII") as raised:
        parse_keys(["# keys", "alice:clé-secrète"], "keys.txt")
    assert "keys.txt, entry 2" in str(raised.value) and "secr" not in str(raised.value)


def test_malformed_key_entry_is_a_startup_error_that_does_not_show_the_key():
    with pytest.raises(ValueError) as raised:
        parse_keys(["alice:has a-space-secret"], "keys.txt")
    assert "keys.txt, entry 1" in str(raised.value) and "space-secret" not in str(raised.value)


def test_missing_keys_file_is_a_startup_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        AccessControl.from_config(AuthConfig(api_keys_file=str(tmp_path / "absent")), {})


def _scope(peer: str, forwarded: str | None) -> dict:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return {"type": "http", "client": (peer, 40000), "headers": headers}


def test_the_client_address_comes_from_x_forwarded_for_only_through_a_trusted_proxy():
    access = AccessControl.from_config(AuthConfig(), environ={})  # trusts loopback: make run's HAProxy
    assert access.client_address(_scope("127.0.0.1", "198.51.100.7")) == "198.51.100.7"
    assert access.client_address(_scope("127.0.0.1", "203.0.113.1, 198.51.100.7")) == "198.51.100.7"
    assert access.client_address(_scope("192.0.2.50", "198.51.100.7")) == "192.0.2.50"  # not our proxy: ignored
    assert access.client_address(_scope("127.0.0.1", None)) == "127.0.0.1"


def test_unparseable_rate_limit_is_a_config_error():
    with pytest.raises(ValueError, match="rate_limit"):
        AppConfig.model_validate({"segmentation": {"c": {"engine": "classic"}}, "default_model": "c",
                                  "auth": {"rate_limit": "lots"}})


def test_any_origin_with_credentials_is_a_config_error():
    with pytest.raises(ValueError, match="allow_origins '\\*' cannot be combined with allow_credentials"):
        AppConfig.model_validate({"segmentation": {"c": {"engine": "classic"}}, "default_model": "c",
                                  "cors": {"allow_origins": ["*"], "allow_credentials": True}})


@pytest.mark.parametrize("path", ["/", "/healthz", "/docs", "/openapi.json", "/static/app.js", "/redoc"])
def test_open_paths(path):
    assert is_open_path(path)


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/health", "/static/../v1/jobs", "/static/./x/../../data/jobs.db",
                                  "/healthz/../v1/jobs", "//v1/jobs", "/Static/app.js", "/docs/../v1/jobs",
                                  "/v1/remove-background", "/nothing-here"])
def test_paths_that_need_a_key(path):
    assert not is_open_path(path)


def test_signing_out_is_open_but_reading_or_making_a_session_is_not():
    assert is_open_request("DELETE", "/v1/session")
    assert not is_open_request("GET", "/v1/session") and not is_open_request("POST", "/v1/session")


def test_caller_is_recorded_by_key_id():
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    assert client.get("/v1/whoami", headers={"X-Api-Key": "k-alice"}).text == "name:alice"


def test_bearer_scheme_is_case_insensitive():
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    assert client.get("/v1/whoami", headers={"Authorization": "bearer k-alice"}).status_code == 200


def test_x_api_key_wins_over_authorization():
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    response = client.get("/v1/whoami", headers={"X-Api-Key": "wrong", "Authorization": "Bearer k-alice"})
    assert response.status_code == 401


def test_basic_authorization_is_not_a_key():
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    assert client.get("/v1/whoami", headers={"Authorization": "Basic k-alice"}).status_code == 401


def test_the_page_cookie_counts_as_the_key_on_a_read():
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    response = client.get("/v1/whoami", headers={"Cookie": f"{COOKIE}=k-alice"})
    assert (response.status_code, response.text) == (200, "name:alice")


@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_the_page_cookie_counts_on_a_change_only_with_x_requested_with(method):
    # A form on another site can send the cookie (same-site subdomains, old browsers),
    # never a custom header.
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    cookie = {"Cookie": f"{COOKIE}=k-alice"}
    assert client.request(method, "/v1/whoami", headers=cookie).status_code == 401
    answered = client.request(method, "/v1/whoami", headers={**cookie, "X-Requested-With": "strata-web"})
    assert (answered.status_code, answered.text) == (200, "name:alice")


def test_the_page_cookie_is_percent_decoded():
    client = app_with(AccessControl(parse_keys(['k;e"y,1'], "test")))
    assert client.get("/v1/whoami", headers={"Cookie": f"{COOKIE}=k%3Be%22y%2C1"}).status_code == 200


def test_over_https_the_page_cookie_is_the_host_prefixed_one():
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    response = client.get("/v1/whoami", headers={**HTTPS, "Cookie": f"{HTTPS_COOKIE}=k-alice"})
    assert (response.status_code, response.text) == (200, "name:alice")


def test_over_https_the_plain_cookie_is_no_key():
    # Any host of the site (a sibling subdomain) can set the plain name; none but ours the prefixed one.
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    assert client.get("/v1/whoami", headers={**HTTPS, "Cookie": f"{COOKIE}=k-alice"}).status_code == 401


@pytest.mark.parametrize(("name", "scheme"), [(COOKIE, {}), (HTTPS_COOKIE, HTTPS)])
def test_a_page_cookie_sent_twice_is_no_key(name, scheme):
    # One of them was tossed in by another host; which one is the page's own cannot be told.
    client = app_with(AccessControl(parse_keys(["alice:k-alice", "mallory:k-mallory"], "test")))
    response = client.get("/v1/whoami", headers={**scheme, "Cookie": f"{name}=k-alice; theme=dark; {name}=k-mallory"})
    assert response.status_code == 401 and "needs an API key" in response.text


@pytest.mark.parametrize("path", ["/api/whoami", "/v1.0/whoami"])
@pytest.mark.parametrize("method", METHODS)
def test_the_page_cookie_does_not_count_on_the_compatible_apis(path, method):
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    cookie = {"Cookie": f"{COOKIE}=k-alice", "X-Requested-With": "strata-web"}
    assert client.request(method, path, headers=cookie).status_code == 401
    assert client.request(method, path, headers={"X-Api-Key": "k-alice"}).text == "name:alice"


def test_a_header_key_wins_over_the_page_cookie():
    client = app_with(AccessControl(parse_keys(["alice:k-alice"], "test")))
    response = client.get("/v1/whoami", headers={"X-Api-Key": "wrong", "Cookie": f"{COOKIE}=k-alice"})
    assert response.status_code == 401


def test_without_keys_the_rate_limit_counts_per_client_address():
    client = app_with(AccessControl([], "3/minute"))
    assert [client.get("/v1/whoami").status_code for _ in range(4)] == [200, 200, 200, 429]


def test_wrong_keys_are_rate_limited_per_address_and_a_right_key_still_passes():
    client = app_with(AccessControl(parse_keys(["right"], "test"), "3/minute"))
    guesses = [client.get("/v1/whoami", headers={"X-Api-Key": f"guess-{i}"}) for i in range(4)]
    assert [response.status_code for response in guesses] == [401, 401, 401, 429]
    assert int(guesses[-1].headers["Retry-After"]) >= 1
    assert client.get("/v1/whoami", headers={"X-Api-Key": "right"}).status_code == 200


def test_requests_without_a_key_are_not_counted_as_guesses():
    client = app_with(AccessControl(parse_keys(["right"], "test"), "1/minute"))
    assert [client.get("/v1/whoami").status_code for _ in range(3)] == [401, 401, 401]


def test_open_paths_are_not_rate_limited():
    client = app_with(AccessControl([], "1/minute"))
    assert [client.get("/healthz").status_code for _ in range(3)] == [200, 200, 200]


def test_every_configured_rate_applies():
    client = app_with(AccessControl(parse_keys(["k"], "test"), "100/day;2/hour"))
    codes = [client.get("/v1/whoami", headers={"X-Api-Key": "k"}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]  # the hourly rate is spent though the daily one is not
