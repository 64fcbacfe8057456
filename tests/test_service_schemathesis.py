"""Property-based API testing: schemathesis generates requests from the live OpenAPI schema.

Every operation gets valid (positive) and invalid (negative) generated requests; none may make
the server answer 5xx, and every answer must match the schema. (The schemathesis pytest plugin does not run under this pytest, so the
operations are driven through hypothesis directly.)
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from test_service_support import Server

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow
MAX_EXAMPLES = 20
# Beyond "no 5xx": every status code, content type and JSON body is the documented one.
CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    # No workers: generated jobs stay queued, so the run tests the API, not quantization.
    server = Server(tmp_path_factory.mktemp("schemathesis") / "data", workers=0,
                    max_upload_bytes=1_000_000)
    try:
        yield server.start()
    finally:
        server.stop()


def problems(operation, mode: GenerationMode, base_url: str) -> list[str]:
    errors: list[str] = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def call(case) -> None:
        response = case.call(base_url=base_url, timeout=30)
        label = f"{case.method} {case.formatted_path} ({mode}) -> {response.status_code}"
        if response.status_code >= 500:
            errors.append(f"{label}: {response.text[:200]}")
        try:
            case.validate_response(response, checks=CONFORMANCE)
        except FailureGroup as group:
            errors.extend(f"{label}: {failure.title}" for failure in group.exceptions)

    try:
        call()
    except Unsatisfiable:  # nothing about the operation can be invalid (no parameters)
        assert mode == GenerationMode.NEGATIVE, operation.label
    return errors


def test_generated_requests_get_documented_answers_and_no_server_errors(live_server):
    schema = schemathesis.openapi.from_url(f"{live_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    errors = [error for operation in operations
              for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
              for error in problems(operation, mode, live_server.url)]
    assert not errors, "\n".join(errors)
    assert "Traceback" not in live_server.log()
