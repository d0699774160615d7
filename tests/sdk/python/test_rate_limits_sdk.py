"""Per-tenant rate limits seen from the official `openai` Python SDK.

Driven by `tests/api/sdk.rs` (see `test_tenants_sdk.py` for the environment). Each test creates its own
tenant with limits through the admin API, so it shares the gateway with the other suites safely.
"""

from __future__ import annotations

import time
import uuid

import pytest

import openai
from openai import OpenAI

from test_tenants_sdk import BASE_URL, admin, issue_key, nonce


def tenant_with(limits: dict) -> tuple[str, str]:
    name = f"rl-{uuid.uuid4().hex[:12]}"
    status, body = admin("POST", "/tenants", {"name": name, "limits": limits})
    assert status == 201, body
    return name, issue_key(name)["key"]


def requests_seen(tenant: str, expected: int) -> int:
    """Requests the gateway recorded for `tenant` (its usage ledger is written within ~50 ms)."""
    deadline = time.monotonic() + 3
    while True:
        status, body = admin("GET", f"/usage?tenant={tenant}")
        assert status == 200, body
        seen = sum(row["requests"] for row in body["data"])
        if seen >= expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_a_refused_request_raises_rate_limit_error_with_openai_headers() -> None:
    _, key = tenant_with({"requests_per_minute": 60, "requests_burst": 1})
    client = OpenAI(base_url=BASE_URL, api_key=key, max_retries=0, timeout=60.0)

    first = client.images.with_raw_response.generate(model="gpt-image-1", prompt=nonce())
    assert first.headers["x-ratelimit-limit-requests"] == "60"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"

    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model="gpt-image-1", prompt=nonce())
    err = caught.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert err.response.headers["retry-after"] == "1"
    assert 0 < int(err.response.headers["retry-after-ms"]) <= 1000
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.request_id and err.request_id.startswith("req_")


def test_with_its_default_retries_the_sdk_succeeds_once_the_window_frees() -> None:
    name, key = tenant_with({"requests_per_minute": 60, "requests_burst": 1})
    client = OpenAI(base_url=BASE_URL, api_key=key, timeout=60.0)  # default max_retries=2

    client.images.generate(model="gpt-image-1", prompt=nonce())
    started = time.monotonic()
    result = client.images.generate(model="gpt-image-1", prompt=nonce())
    waited = time.monotonic() - started

    assert result.data and result.data[0].b64_json
    assert waited >= 0.5, f"the SDK should have waited for retry-after, took {waited:.2f}s"
    # ok, refused, then the retry that succeeded
    assert requests_seen(name, 3) == 3


def test_the_sdk_does_not_retry_a_spent_budget() -> None:
    name, key = tenant_with({"images_per_day": 1})
    client = OpenAI(base_url=BASE_URL, api_key=key, timeout=60.0)  # default max_retries=2

    client.images.generate(model="gpt-image-1", prompt=nonce())
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model="gpt-image-1", prompt=nonce())

    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    time.sleep(0.3)
    assert requests_seen(name, 2) == 2, "the SDK retried a spent budget"


def test_sdk_retries_of_an_upstream_429_do_not_burn_the_budget() -> None:
    name, key = tenant_with({"images_per_day": 1, "requests_per_minute": 60})
    client = OpenAI(base_url=BASE_URL, api_key=key, timeout=60.0)  # default max_retries=2

    # The upstream's own 429 (its retry-after is 1 s): the SDK retries twice, all three reach the upstream.
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(model="gpt-image-1", prompt=f"{nonce()} #status=429")
    err = caught.value
    assert err.code == "rate_limit_exceeded"
    assert "in organization" in err.message, "the upstream's own message"
    assert requests_seen(name, 3) == 3, "the budget of 1 image refused none of the retries"

    # Nothing was spent: the request bucket is whole again and the day's image is still there.
    raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt=nonce())
    assert raw.headers["x-ratelimit-remaining-requests"] == "59"
    assert raw.parse().data[0].b64_json
    with pytest.raises(openai.RateLimitError) as spent:
        client.images.generate(model="gpt-image-1", prompt=nonce())
    assert spent.value.code == "insufficient_quota"
