"""Strata's own metrics, scraped from Ray's Prometheus endpoint after real traffic.

The traffic goes to models only this module uses (deployed once for it, with its
own job store), so counts start at zero and equal exactly what the tests sent.
Ray exports metrics on an interval (1 s in the test session): tests wait for the
expected values with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.metrics import BATCH_SIZE_BUCKETS, GAUGE_REFRESH_S, HeldGauges
from tests.conftest import deploy_config, tiny_config
from tests.test_remove_background_api import post_image, red_disc_png

# Deploys configs of its own: runs after the modules that share the default app (conftest).
pytestmark = pytest.mark.own_deployment

QUEUE_BATCH = 8


@pytest.fixture(scope="module")
def metered_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("metered-data")


@pytest.fixture(scope="module")
def metered(serve_instance, tiny_models_dir, metered_data_dir) -> httpx.Client:
    """The test app plus models only this module sends traffic to:
    `metered` (batches of up to 4), `queued` (a batch waits until 8 requests
    are there), `fallback` (missing weights, serves classic) and the layer
    model `metered`."""
    config = tiny_config(tiny_models_dir, metered_data_dir)
    app = config["applications"][0]
    app["args"]["segmentation"].update(
        metered={"engine": "classic"},
        queued={"engine": "classic"},
        fallback={"engine": "birefnet", "weights": str(metered_data_dir / "no-such-model"), "fallback": "classic"},
    )
    app["args"]["layered"]["metered"] = {"engine": "classic"}
    app["deployments"] += [
        {"name": "metered", "max_ongoing_requests": 16,
         "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.3}},
        {"name": "queued", "max_ongoing_requests": 16,
         "user_config": {"max_batch_size": QUEUE_BATCH, "batch_wait_timeout_s": 3}},
    ]
    deploy_config(config)
    with httpx.Client(base_url=serve_instance, timeout=120) as client:
        yield client


def scrape(metrics_url: str) -> list:
    """Every sample on the endpoint (name, labels, value)."""
    text = httpx.get(metrics_url, timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def values(samples: list, name: str, **labels: str) -> list[float]:
    """Values of the samples called `name` whose labels include `labels`."""
    return [s.value for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def total(samples: list, name: str, **labels: str) -> float:
    return sum(values(samples, name, **labels))


def wait_for(metrics_url: str, condition: Callable[[list], bool], timeout_s: float = 30) -> list:
    """Scrape until `condition(samples)` holds; the samples that satisfied it."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(metrics_url)
        if condition(samples):
            return samples
        assert time.monotonic() < deadline, "metrics did not reach the expected values in time:\n" + "\n".join(
            f"{s.name}{s.labels} {s.value}" for s in samples if s.name.startswith("ray_strata_"))
        time.sleep(0.25)


def post_many(client: httpx.Client, count: int, model: str) -> list[httpx.Response]:
    data, _ = red_disc_png(96, 64)
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: post_image(client, data, model=model), range(count)))


@pytest.fixture(scope="module")
def batched_traffic(metered) -> list[httpx.Response]:
    """Ten concurrent requests to `metered`, answered (in batches of at most 4)."""
    responses = post_many(metered, 10, "metered")
    assert [r.status_code for r in responses] == [200] * 10
    return responses


def batches_seen(responses: list[httpx.Response]) -> list[int]:
    """The sizes of the batches that answered these requests: a batch of n answers
    n requests, each saying X-Batch-Size: n."""
    sizes = [int(r.headers["x-batch-size"]) for r in responses]
    return [size for size in set(sizes) for _ in range(sizes.count(size) // size)]


def test_request_latency_histogram_counts_every_answered_request(metered, batched_traffic, metrics_url):
    labels = {"route": "/v1/remove-background", "model": "metered"}
    samples = wait_for(metrics_url, lambda s: total(s, "ray_strata_request_latency_seconds_count", **labels) >= 10)
    assert total(samples, "ray_strata_request_latency_seconds_count", **labels) == 10
    seconds = total(samples, "ray_strata_request_latency_seconds_sum", **labels)  # from bucket midpoints
    assert 0 < seconds < 10 * 120
    # Every request lies in some bucket: the +Inf bucket holds them all.
    assert total(samples, "ray_strata_request_latency_seconds_bucket", le="+Inf", **labels) == 10


# To the session's shared model (`tiny`, the default): `metered`'s counts belong to the tests above and below.
@pytest.mark.parametrize(("route", "send"), [
    ("/api/remove", lambda client, data: client.post("/api/remove", params={"model": "tiny"},
                                                     files={"file": ("photo.png", data)})),
    ("/v1.0/removebg", lambda client, data: client.post("/v1.0/removebg", files={"image_file": ("photo.png", data)})),
])
def test_request_latency_histogram_counts_the_compatible_apis_too(metered, metrics_url, route, send):
    labels = {"route": route}
    before = total(scrape(metrics_url), "ray_strata_request_latency_seconds_count", **labels)
    data, _ = red_disc_png(96, 64)
    for _ in range(3):
        response = send(metered, data)
        assert response.status_code == 200, response.text
    samples = wait_for(metrics_url,
                       lambda s: total(s, "ray_strata_request_latency_seconds_count", **labels) >= before + 3)
    assert total(samples, "ray_strata_request_latency_seconds_count", **labels) == before + 3
    assert values(samples, "ray_strata_request_latency_seconds_count", **labels, model=response.headers["x-model"])


def test_batch_size_histogram_records_each_batch_within_max_batch_size(metered, batched_traffic, metrics_url):
    batches = batches_seen(batched_traffic)
    assert sum(batches) == 10 and all(1 <= size <= 4 for size in batches)
    samples = wait_for(metrics_url, lambda s: total(s, "ray_strata_batch_size_count", model="metered") >= len(batches))
    assert total(samples, "ray_strata_batch_size_count", model="metered") == len(batches)
    # Ray keeps bucket counts exactly (sums only as bucket midpoints): compare buckets.
    for bound in BATCH_SIZE_BUCKETS:
        in_bucket = total(samples, "ray_strata_batch_size_bucket", model="metered", le=f"{float(bound)}")
        assert in_bucket == sum(1 for size in batches if size <= bound), bound


def test_model_latency_histogram_records_one_call_per_batch(metered, batched_traffic, metrics_url):
    batches = len(batches_seen(batched_traffic))
    labels = {"model": "metered", "engine": "classic", "deployment": "metered"}
    samples = wait_for(metrics_url, lambda s: total(s, "ray_strata_model_latency_seconds_count", **labels) >= batches)
    assert total(samples, "ray_strata_model_latency_seconds_count", **labels) == batches
    assert total(samples, "ray_strata_model_latency_seconds_sum", **labels) > 0


def test_queue_depth_counts_requests_waiting_for_their_batch(metered, metrics_url):
    def depth(samples):
        return values(samples, "ray_strata_queue_depth", model="queued", deployment="queued")

    # A request that finds the replica idle runs at once; those arriving while it runs
    # wait (up to batch_wait_timeout_s) for their batch, and are counted meanwhile.
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(post_many, metered, QUEUE_BATCH - 2, "queued")
        wait_for(metrics_url, lambda s: any(value >= 1 for value in depth(s)))
        responses = sent.result()
    assert all(r.status_code == 200 for r in responses)
    wait_for(metrics_url, lambda s: depth(s) == [0])


def test_engine_gauge_names_the_engine_and_device_in_use(metered, metrics_url):
    def engines(samples, model: str) -> set[tuple[str, str]]:
        return {(s.labels["engine"], s.labels["device"]) for s in samples
                if s.name == "ray_strata_engine" and s.labels["model"] == model and s.value == 1}

    # Waits out the series of replicas a redeploy just replaced (they lapse in seconds).
    wait_for(metrics_url, lambda s: engines(s, "fallback") == {("classic", "cpu")}
             and engines(s, "tiny") == {("birefnet", "cpu")})


def test_jobs_gauge_counts_a_finished_job(metered, metrics_url):
    response = metered.post("/v1/layers", params={"model": "metered", "layers": 2},
                            files={"image": ("photo.png", red_disc_png(96, 64)[0], "image/png")},
                            headers={"Prefer": "wait=60"})
    assert response.status_code == 200 and response.json()["status"] == "succeeded"
    samples = wait_for(metrics_url, lambda s: values(s, "ray_strata_jobs", status="succeeded") == [1])
    assert values(samples, "ray_strata_jobs", status="queued") == [0]
    assert values(samples, "ray_strata_jobs", status="running") == [0]
    layer_call = {"model": "metered", "engine": "classic", "deployment": "layers-metered"}
    samples = wait_for(metrics_url, lambda s: total(s, "ray_strata_model_latency_seconds_count", **layer_call) == 1)
    assert values(samples, "ray_strata_queue_depth", model="metered", deployment="layers-metered") == [0]


class RecordingGauge:
    """Stands in for a Ray gauge to see what is set when: a real one's sets are
    only visible on the endpoint, where a value set once lapses after two report
    intervals (20 s by default) and not within a test's time."""

    def __init__(self) -> None:
        self.sets: list[tuple[float, dict[str, str]]] = []

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.sets.append((value, dict(tags)))


def test_held_gauge_values_are_set_again_until_they_change():
    held, gauge = HeldGauges(), RecordingGauge()
    held.set(gauge, 3, {"model": "a"})
    held.set(gauge, 1, {"model": "b"})
    deadline = time.monotonic() + 10 * GAUGE_REFRESH_S
    while gauge.sets.count((3, {"model": "a"})) < 3:
        assert time.monotonic() < deadline, gauge.sets
        time.sleep(0.05)
    held.set(gauge, 0, {"model": "a"})
    resets = len(gauge.sets)
    while len(gauge.sets) < resets + 4:
        assert time.monotonic() < deadline, gauge.sets
        time.sleep(0.05)
    later = gauge.sets[resets:]
    assert (0, {"model": "a"}) in later and (1, {"model": "b"}) in later
    assert (3, {"model": "a"}) not in later
