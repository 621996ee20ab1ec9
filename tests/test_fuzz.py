"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis), against a real server.

schemathesis reads /schema/openapi.json and sends what it generates from it: schema-valid
batches (every event type, arbitrary unknown fields, unicode, extreme numbers) and
schema-violating ones (wrong types, missing fields, no key, odd methods), through its
examples, coverage and fuzzing phases. On the events routes every check runs (no 5xx, the
status, content type, headers and body each as documented, schema-valid batches accepted)
but `negative_data_rejection`: the events API answers 200 to a batch with some invalid
events, by design (the spec: never refuse a whole request for some of its events), which
that check would count as a failure. The other routes of ours (health, readiness, metrics,
stats) are fuzzed for server errors only; the proxied SDK routes are left out (with no
upstream configured they answer 503 on purpose). After each run the server must still be
up, serving, with no traceback in its log.

The default run is bounded (DEFAULT_EXAMPLES per operation, a fixed seed, well under a
minute); the `slow` one runs SLOW_EXAMPLES with a fresh seed. Each prints its case count.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import Server, event

ST = Path(sys.executable).with_name("st")
DEFAULT_EXAMPLES = 150
SLOW_EXAMPLES = 1500
SEED = 20260521
EVENTS_ROUTES = "^/v1/events(/batch)?$"
OTHER_ROUTES = "^/(healthz|readyz|metrics|v1/stats)$"
ALL_BUT_NEGATIVE = ["--checks", "all", "--exclude-checks", "negative_data_rejection"]


def fuzz(server: Server, routes: str, checks: list[str], examples: int, seed: int | None) -> int:
    """Run schemathesis on `routes` (in the data directory's parent, where it leaves its
    cache); returns the number of cases it generated."""
    command = [
        str(ST),
        "run",
        f"{server.url}/schema/openapi.json",
        "--header",
        f"Authorization: Bearer {server.key}",
        "--include-path-regex",
        routes,
        *checks,
        "--max-examples",
        str(examples),
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--no-color",
        *(["--seed", str(seed)] if seed is not None else []),
    ]
    started = time.monotonic()
    done = subprocess.run(
        command, cwd=server.data_dir.parent, capture_output=True, text=True, timeout=1800
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-8000:]
    found = re.search(r"(\d+) generated", output)
    assert found, output[-3000:]
    cases = int(found.group(1))
    print(f"\nschemathesis on {routes}: {cases} cases in {time.monotonic() - started:.1f} s")
    return cases


def assert_unharmed(server: Server) -> None:
    assert server.process is not None and server.process.poll() is None
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert server.post({"events": [event()]}).status_code == 200
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


def test_the_schema_describes_the_events_api(server: Server) -> None:
    schema = httpx.get(f"{server.url}/schema/openapi.json", timeout=5).json()
    for path in ("/v1/events", "/v1/events/batch"):
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        events = body["properties"]["events"]
        assert body["required"] == ["events"] and events["minItems"] == 1
        kinds = [variant["properties"]["type"]["const"] for variant in events["items"]["oneOf"]]
        assert kinds == ["exposure", "decision", "track"]
        answers = operation["responses"]
        assert {"200", "400", "401", "403", "413", "415", "429", "503"} <= set(answers)
        assert "Retry-After" in answers["429"]["headers"]
        assert "Retry-After" in answers["503"]["headers"]
        assert operation["security"] == [{"apiKey": []}]
    scheme = schema["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def test_fuzzing_the_api_from_its_schema_finds_no_server_error(server: Server) -> None:
    events = fuzz(server, EVENTS_ROUTES, ALL_BUT_NEGATIVE, DEFAULT_EXAMPLES, SEED)
    others = fuzz(server, OTHER_ROUTES, ["--checks", "not_a_server_error"], 50, SEED)
    print(f"fuzz cases tried: {events + others}")
    assert events >= 500
    assert_unharmed(server)


@pytest.mark.slow
def test_fuzzing_at_length_with_a_fresh_seed_finds_no_server_error(server: Server) -> None:
    events = fuzz(server, EVENTS_ROUTES, ALL_BUT_NEGATIVE, SLOW_EXAMPLES, None)
    others = fuzz(server, OTHER_ROUTES, ["--checks", "not_a_server_error"], 300, None)
    print(f"fuzz cases tried: {events + others}")
    assert_unharmed(server)
