"""The official `openai` Python SDK, with its default retries, through a pool where one deployment fails.

Driven by `tests/api/pools.rs` (`the_python_sdk_*`), which starts a gateway whose default pool has a failing
deployment and a working one, and passes:

    IMAGEGATE_POOL_BASE_URL   the gateway's `/v1` URL
    IMAGEGATE_POOL_KEY        a tenant key
    IMAGEGATE_POOL_FAILING    the failing fake's root URL (its calls are counted through `/_fake/calls`)
    IMAGEGATE_POOL_GOOD       the working fake's root URL

Without them (as in the shared SDK run of `tests/api/sdk.rs`) the module is skipped.
"""

from __future__ import annotations

import collections
import json
import os
import urllib.request
import uuid

import pytest

from openai import OpenAI

BASE_URL = os.environ.get("IMAGEGATE_POOL_BASE_URL")
KEY = os.environ.get("IMAGEGATE_POOL_KEY")
FAILING = (os.environ.get("IMAGEGATE_POOL_FAILING") or "").rstrip("/")
GOOD = (os.environ.get("IMAGEGATE_POOL_GOOD") or "").rstrip("/")
if not (BASE_URL and KEY and FAILING and GOOD):
    pytest.skip("IMAGEGATE_POOL_* are not set: run through `cargo test --test api pools`", allow_module_level=True)

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def prompts_received(fake: str) -> list[str]:
    """The prompt of every image call the fake received."""
    with _no_proxy.open(f"{fake}/_fake/calls", timeout=10) as resp:
        calls = json.loads(resp.read())
    return [(call.get("json") or {}).get("prompt", "") for call in calls]


def test_every_call_succeeds_and_no_prompt_is_generated_twice() -> None:
    client = OpenAI(base_url=BASE_URL, api_key=KEY, timeout=30.0)  # default max_retries=2
    prompts = [f"a lighthouse {uuid.uuid4().hex}" for _ in range(8)]

    for prompt in prompts:
        raw = client.images.with_raw_response.generate(model="gpt-image-1", prompt=prompt)
        result = raw.parse()
        assert result.data and result.data[0].b64_json
        assert raw.headers["x-imagegate-deployment"] == "good"

    generated = collections.Counter(prompts_received(GOOD))
    assert all(generated[p] == 1 for p in prompts), generated
    failed = prompts_received(FAILING)
    # The failing deployment was tried (first, and again by half-open probes), never twice for one prompt,
    # and each of its failures moved the request on inside the gateway rather than back to the SDK.
    assert 1 <= len(failed) <= len(prompts), failed
    assert max(collections.Counter(failed).values()) == 1, failed


def test_an_sdk_timeout_shorter_than_the_generation_gets_the_images_from_its_own_retries() -> None:
    # The SDK gives up after 0.5 s and retries (x-stainless-retry-count: 1, 2); the gateway's call, which takes
    # longer, is not cancelled, and a retry attaches to it.
    client = OpenAI(base_url=BASE_URL, api_key=KEY, timeout=0.5)  # default max_retries=2
    prompt = f"a slow tide {uuid.uuid4().hex} #sleep=700"

    result = client.images.generate(model="gpt-image-1", prompt=prompt)

    assert result.data and result.data[0].b64_json
    assert collections.Counter(prompts_received(GOOD))[prompt] == 1
