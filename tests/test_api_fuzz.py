"""API fuzzing with schemathesis: every operation of the OpenAPI document, over real HTTP on a real local Ray.

Schemathesis generates requests from the document (valid and deliberately
invalid parameters, bodies, headers, methods) and checks every answer: no 5xx,
status codes, content types, headers and bodies as declared, invalid data
refused. One check is left out: `positive_data_acceptance` expects every
schema-valid request to succeed, but a schema cannot say "an image at least 16
px wide" or "a cursor this service issued", so a generated 1x1 PNG or a made-up
cursor rightly gets 422.

`make test` runs a few examples per operation (deterministic). A full fuzz:

    STRATA_FUZZ_EXAMPLES=500 flock /tmp/strata-ray.lock .venv/bin/python -m pytest tests/test_api_fuzz.py -q -rP

(the environment variable sets the examples per operation and makes the run
random rather than the fixed `make test` sequence; `-rP` prints the tally).
"""

from __future__ import annotations

import os
from collections import Counter

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from serve_app.ingress import app

FULL_FUZZ = "STRATA_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("STRATA_FUZZ_EXAMPLES", "10"))

# The document the ingress serves at /openapi.json (checked equal below), loaded
# without a server so each operation is its own test. It covers the compatible
# routes too (rembg's /api/remove, remove.bg's /v1.0/, image-layer-saas's /api/),
# whose errors it declares in those projects' shapes.
schema = schemathesis.openapi.from_dict(app.openapi())

# Answers seen, by operation and status: the figures of a run.
ANSWERS: Counter[tuple[str, int]] = Counter()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not FULL_FUZZ, database=None,
          suppress_health_check=list(HealthCheck))
def test_operation_answers_as_declared(case, strata):
    response = case.call_and_validate(base_url=strata, excluded_checks=[positive_data_acceptance])
    ANSWERS[(case.operation.label, response.status_code)] += 1


def test_a_405_lists_every_method_the_path_serves(client):
    response = client.put("/v1/jobs/0123456789abcdef")
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/problem+json"
    assert {method.strip() for method in response.headers["allow"].split(",")} >= {"GET", "DELETE"}


def test_the_served_openapi_document_is_the_one_fuzzed(client):
    assert client.get("/openapi.json").json() == app.openapi()


def test_every_operation_was_fuzzed_and_none_answered_5xx():
    operations = {result.ok().label for result in schema.get_all_operations()}
    fuzzed = {operation for operation, _ in ANSWERS}
    assert fuzzed == operations, f"not fuzzed: {sorted(operations - fuzzed)}"
    assert not [key for key in ANSWERS if key[1] >= 500]
    by_status: Counter[int] = Counter()
    for (_, status), count in ANSWERS.items():
        by_status[status] += count
    print(f"{sum(ANSWERS.values())} requests over {len(operations)} operations; "
          f"by status: {dict(sorted(by_status.items()))}")
    for (operation, status), count in sorted(ANSWERS.items()):
        print(f"  {operation:45s} {status}: {count}")
