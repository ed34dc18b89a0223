"""API keys, per-key rate limits, job ownership and CORS, over real HTTP on a real
local Ray: configs/test.yaml with keys from a file, a rate limit and one allowed
origin, deployed once for this module. (Keys from STRATA_API_KEYS are read by the
same code, tested in tests/test_access.py.)"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import pytest

from serve_app.config import JobsConfig
from serve_app.jobs import JobStore
from tests.conftest import deploy_config, tiny_config
from tests.test_remove_background_api import assert_problem, red_disc_png

# Deploys configs of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment

KEYS = {name: f"sk-{name}-{secrets.token_urlsafe(24)}"
        for name in ("alice", "bob", "dave", "erin", "frank", "grace", "heidi")}
RATE = 30  # per minute, per key
ORIGIN = "https://app.example"
IMAGE, _ = red_disc_png(160, 120)
JOB_ROUTES = ["", "/events", "/layers/1.png", "/result.zip", "/result.psd", "/manifest.json"]


@pytest.fixture(scope="module")
def secured(serve_instance, tiny_models_dir, data_dir, tmp_path_factory) -> str:
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    # alice is named; the others are bare keys (their id is a digest).
    keys_file.write_text("# Strata API keys\n" + f"alice:{KEYS['alice']}\n"
                         + "".join(f"{KEYS[name]}\n" for name in ("bob", "dave", "erin", "frank", "grace", "heidi")))
    config = tiny_config(tiny_models_dir, data_dir)
    args = config["applications"][0]["args"]
    args["auth"] = {"api_keys_file": str(keys_file), "rate_limit": f"{RATE}/minute"}
    args["cors"] = {"allow_origins": [ORIGIN]}
    deploy_config(config)
    return serve_instance


@pytest.fixture
def anonymous(secured):
    with httpx.Client(base_url=secured, timeout=60) as http:
        yield http


def client_of(base: str, name: str, header: str = "x-api-key") -> httpx.Client:
    value = KEYS[name] if header == "x-api-key" else f"Bearer {KEYS[name]}"
    return httpx.Client(base_url=base, timeout=60, headers={header: value})


@pytest.fixture
def alice(secured):
    with client_of(secured, "alice") as http:
        yield http


@pytest.fixture
def bob(secured):
    with client_of(secured, "bob", header="authorization") as http:
        yield http


@pytest.fixture(scope="module")
def alices_job(secured) -> dict:
    """One finished job of alice's, shared by the module (each request counts against her rate)."""
    with client_of(secured, "alice") as alice:
        response = alice.post("/v1/layers", params={"model": "classic", "layers": 2}, headers={"Prefer": "wait=60"},
                              files={"image": ("disc.png", IMAGE, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


# --- keys ----------------------------------------------------------------------------------


def test_request_without_a_key_gets_401_problem_with_www_authenticate(anonymous):
    response = anonymous.post("/v1/remove-background", params={"model": "classic"},
                              files={"image": ("disc.png", IMAGE, "image/png")})
    assert_problem(response, 401, "API key")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_unknown_key_gets_401_and_is_not_echoed(anonymous):
    wrong = "sk-wrong-" + secrets.token_urlsafe(16)
    response = anonymous.get("/v1/jobs", headers={"X-Api-Key": wrong})
    assert_problem(response, 401, "not valid")
    assert wrong not in response.text


def test_x_api_key_is_accepted(alice):
    response = alice.post("/v1/remove-background", params={"model": "classic"},
                          files={"image": ("disc.png", IMAGE, "image/png")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def test_bearer_key_is_accepted(bob):
    assert bob.get("/v1/health").status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/", "/static/app.js", "/docs", "/openapi.json"])
def test_open_paths_need_no_key(anonymous, path):
    assert anonymous.get(path).status_code == 200


def test_unknown_path_needs_a_key_before_it_is_a_404(anonymous):
    assert_problem(anonymous.get("/v1/nothing-here"), 401)


def test_openapi_declares_the_key_schemes_on_api_routes_only(anonymous):
    schema = anonymous.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"ApiKey", "Bearer"}
    assert schema["components"]["securitySchemes"]["ApiKey"]["name"] == "X-Api-Key"
    assert {"ApiKey": []} in schema["paths"]["/v1/jobs"]["get"]["security"]
    assert "401" in schema["paths"]["/v1/remove-background"]["post"]["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_openapi_declares_signing_out_open(anonymous):
    session = anonymous.get("/openapi.json").json()["paths"]["/v1/session"]
    assert "security" not in session["delete"] and "security" in session["get"]


# --- a key sees only its own jobs -------------------------------------------------------------------


def test_key_lists_only_its_own_jobs(alice, bob, alices_job):
    assert alices_job["id"] in {job["id"] for job in alice.get("/v1/jobs?limit=100").json()["jobs"]}
    assert alices_job["id"] not in {job["id"] for job in bob.get("/v1/jobs?limit=100").json()["jobs"]}


@pytest.mark.parametrize("suffix", JOB_ROUTES)
def test_another_keys_job_is_not_found_on_every_job_route(alice, bob, alices_job, suffix):
    path = f"/v1/jobs/{alices_job['id']}{suffix}"
    assert_problem(bob.get(path), 404, "no job")  # the same answer as for an id that does not exist
    assert alice.get(path).status_code == 200


def test_another_key_cannot_delete_a_job(alice, bob, alices_job):
    assert_problem(bob.delete(f"/v1/jobs/{alices_job['id']}"), 404, "no job")
    assert alice.get(f"/v1/jobs/{alices_job['id']}").json()["status"] == "succeeded"


def test_job_made_while_the_api_was_open_belongs_to_no_key(alice, data_dir):
    with JobStore(JobsConfig(data_dir=str(data_dir)).url) as store:  # the app's store
        ownerless = store.create("layers", {"model": "classic"})
    assert_problem(alice.get(f"/v1/jobs/{ownerless.id}"), 404, "no job")
    assert ownerless.id not in {job["id"] for job in alice.get("/v1/jobs?limit=100").json()["jobs"]}


# --- the web page's sign-in (a cookie) ----------------------------------------------------------------


def test_session_says_keys_are_required_and_whose_key_was_used(alice, anonymous):
    assert alice.get("/v1/session").json() == {"keys_required": True, "key_id": "name:alice"}
    assert_problem(anonymous.get("/v1/session"), 401, "API key")


def test_sign_in_keeps_the_key_in_an_http_only_same_site_cookie(anonymous):
    response = anonymous.post("/v1/session", headers={"X-Api-Key": KEYS["grace"]})
    assert response.status_code == 200
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith("strata_key=") and "httponly" in cookie and "samesite=strict" in cookie
    assert "secure" not in cookie and "max-age" not in cookie  # plain HTTP here; gone when the browser closes
    assert KEYS["grace"] not in response.text


def test_sign_in_behind_an_https_proxy_sets_the_host_prefixed_secure_cookie(anonymous):
    # __Host-: browsers accept it only Secure, with Path=/ and no Domain, so no other host can set it.
    response = anonymous.post("/v1/session", headers={"X-Api-Key": KEYS["grace"], "X-Forwarded-Proto": "https"})
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("__Host-strata_key=")
    assert "secure" in cookie.lower() and "path=/;" in cookie.lower() and "domain" not in cookie.lower()


def test_the_signed_in_cookie_alone_opens_the_api(secured):
    with httpx.Client(base_url=secured, timeout=60) as browser:
        assert browser.post("/v1/session", headers={"X-Api-Key": KEYS["grace"]}).status_code == 200
        assert browser.get("/v1/session").json()["key_id"].startswith("key:")
        job = browser.post("/v1/layers", params={"model": "classic", "layers": 2},
                           headers={"Prefer": "wait=60", "X-Requested-With": "strata-web"},
                           files={"image": ("disc.png", IMAGE, "image/png")})
        assert job.status_code == 200, job.text
        layer = browser.get(job.json()["result"]["layers"][0]["url"])
        assert layer.status_code == 200 and layer.content.startswith(b"\x89PNG")


def test_the_signed_in_cookie_does_not_post_without_x_requested_with(secured):
    with httpx.Client(base_url=secured, timeout=60) as browser:
        browser.post("/v1/session", headers={"X-Api-Key": KEYS["grace"]})
        refused = browser.post("/v1/remove-background", params={"model": "classic"},
                               files={"image": ("disc.png", IMAGE, "image/png")})
        assert_problem(refused, 401, "API key")


def test_sign_in_with_a_wrong_key_sets_no_cookie(anonymous):
    response = anonymous.post("/v1/session", headers={"X-Api-Key": "sk-wrong-" + secrets.token_urlsafe(16)})
    assert_problem(response, 401, "not valid")
    assert "set-cookie" not in response.headers


def test_sign_out_removes_the_cookie(secured):
    with httpx.Client(base_url=secured, timeout=60) as browser:
        browser.post("/v1/session", headers={"X-Api-Key": KEYS["grace"]})
        assert browser.delete("/v1/session", headers={"X-Requested-With": "strata-web"}).status_code == 204
        assert not browser.cookies
        assert_problem(browser.get("/v1/jobs"), 401, "API key")


def test_sign_out_behind_an_https_proxy_clears_the_host_prefixed_cookie(anonymous):
    response = anonymous.delete("/v1/session", headers={"X-Forwarded-Proto": "https"})
    assert response.status_code == 204
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith("__host-strata_key=") and "max-age=0" in cookie and "secure" in cookie


def assert_clears_the_cookie(response: httpx.Response) -> None:
    assert response.status_code == 204
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith("strata_key=") and "max-age=0" in cookie


def test_sign_out_clears_the_cookie_of_a_key_no_longer_accepted(anonymous):
    revoked = {"Cookie": "strata_key=sk-revoked", "X-Requested-With": "strata-web"}
    assert_clears_the_cookie(anonymous.delete("/v1/session", headers=revoked))


def test_sign_out_clears_the_cookie_of_a_key_past_its_rate(anonymous, secured):
    spend_rate(secured, "heidi")
    limited = {"Cookie": f"strata_key={KEYS['heidi']}", "X-Requested-With": "strata-web"}
    assert_clears_the_cookie(anonymous.delete("/v1/session", headers=limited))


def test_the_signed_in_cookie_does_not_open_the_compatible_apis(secured):
    # Their clients send header keys; with the cookie, a link could make the service fetch a URL.
    with httpx.Client(base_url=secured, timeout=60) as browser:
        browser.post("/v1/session", headers={"X-Api-Key": KEYS["grace"]})
        refused = browser.get("/api/remove", params={"url": "https://example.com/photo.png"})
        assert refused.status_code == 401 and "API key" in refused.json()["detail"]
        assert browser.get("/api/health").status_code == 401


# --- rate limits --------------------------------------------------------------------------------------


def spend_rate(base: str, name: str) -> httpx.Response:
    """Requests as `name` until one is refused; that response (bounded: RATE + 1 requests)."""
    with client_of(base, name) as http:
        for _ in range(RATE + 1):
            response = http.get("/v1/jobs", params={"limit": 1})
            if response.status_code != 200:
                return response
    pytest.fail(f"{RATE + 1} requests in a row were all accepted")


def test_key_past_its_rate_gets_429_with_retry_after(secured):
    response = spend_rate(secured, "dave")
    assert_problem(response, 429, f"{RATE} per 1 minute")
    assert 1 <= int(response.headers["retry-after"]) <= 60


def test_rate_limit_is_per_key(secured):
    spend_rate(secured, "erin")
    with client_of(secured, "frank") as frank:
        assert frank.get("/v1/jobs", params={"limit": 1}).status_code == 200


# --- CORS --------------------------------------------------------------------------------------------


def test_preflight_from_an_allowed_origin_is_answered_without_a_key(anonymous):
    response = anonymous.options("/v1/remove-background", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in response.headers["access-control-allow-headers"].lower()


def test_answer_to_an_allowed_origin_carries_cors_headers(alice):
    response = alice.get("/v1/jobs", headers={"Origin": ORIGIN})
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "retry-after" in response.headers["access-control-expose-headers"].lower()


def test_401_to_an_allowed_origin_carries_cors_headers(anonymous):
    response = anonymous.get("/v1/jobs", headers={"Origin": ORIGIN})
    assert response.status_code == 401 and response.headers["access-control-allow-origin"] == ORIGIN


def test_other_origins_get_no_cors_headers(alice):
    response = alice.get("/v1/jobs", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


# --- keys stay out of the logs ------------------------------------------------------------------------


def test_keys_never_reach_any_log(secured):
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    marker = f"log-marker-{secrets.token_hex(8)}"
    wrong = "sk-unknown-" + secrets.token_urlsafe(16)
    for headers in ({"X-Api-Key": KEYS["alice"]}, {"Authorization": f"Bearer {KEYS['bob']}"},
                    {"X-Api-Key": wrong}, {"Authorization": f"Bearer {wrong}"}):
        httpx.get(f"{secured}/v1/jobs", headers={**headers, "X-Request-ID": marker}, timeout=60)

    def all_logs() -> bytes:
        return b"".join(path.read_bytes() for path in logs.rglob("*") if path.is_file())

    deadline = time.monotonic() + 30
    while marker.encode() not in all_logs():  # Serve's access log has recorded these requests
        assert time.monotonic() < deadline, "the requests never reached the logs"
        time.sleep(0.5)
    text = all_logs()
    for key in (*KEYS.values(), wrong):
        assert key.encode() not in text
