"""Property-based conformance: schemathesis drives the real server with requests generated from
the committed `openapi.yaml`.

What it covers: every operation in the contract (health, the audit routes, the multipart
submit, checkpoints), each with schema-valid requests (positive mode) and with requests that
break the schema (negative mode: wrong types, missing fields, out-of-range values). For every
response it checks that the server did not fail (no 5xx), that the status code is one the
operation declares, that the content type is the declared one (problem+json for errors), and
that the body and headers match the declared schemas. At least `MIN_REQUESTS` requests in all.

What it does not cover: valid checkpoints (random bytes never load; tests/test_service_e2e.py
runs real audits) and huge bodies (the multipart submit is exercised with the small binary
parts hypothesis generates; size limits are tested in tests/test_hostile_inputs.py).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Examples per operation and mode. Hypothesis stops early when an operation has fewer distinct
# requests (the health checks have one; path-only operations have nothing to negate), so the
# contract's 10 operations give about 700 requests, 20-30 s on 2 cores.
EXAMPLES = {GenerationMode.POSITIVE: 80, GenerationMode.NEGATIVE: 30}
MIN_REQUESTS = 500


def test_generated_requests_conform_to_the_contract(stack: Stack) -> None:
    schema = schemathesis.openapi.from_path(ROOT / "openapi.yaml")
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    session = requests.Session()
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        for mode, examples in EXAMPLES.items():

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=True,  # the same requests on every run: a failure reproduces
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case: schemathesis.Case) -> None:
                response = case.call(base_url=stack.url, session=session, timeout=30)
                sent[case.operation.label] += 1
                statuses[response.status_code] += 1
                case.validate_response(response, checks=CHECKS)

            # Unsatisfiable: nothing in this operation can be negated (only string path parameters).
            with contextlib.suppress(Unsatisfiable):
                exercise()
    total = sum(sent.values())
    print(
        f"schemathesis: {total} requests in {time.monotonic() - started:.1f} s; statuses {dict(statuses)}"
    )
    assert total >= MIN_REQUESTS, sent
    assert set(sent) == {op.label for op in operations}, "an operation was never exercised"
    assert not [code for code in statuses if code >= 500]
