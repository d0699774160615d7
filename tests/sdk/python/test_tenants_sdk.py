"""Tenants and keys managed through imagegate's admin API, used with the official `openai` Python SDK.

Driven by `tests/api/sdk.rs` like `test_images_sdk.py`, with two more variables:

    IMAGEGATE_ROOT_URL      the gateway root, without `/v1` (e.g. http://127.0.0.1:PORT)
    IMAGEGATE_ADMIN_TOKEN   the gateway's `admin.token`

Without them the module is skipped. Every test creates its own tenant (a random name), so the suite
does not disturb the others sharing the same gateway and fake upstream.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

import openai
from openai import OpenAI

ROOT_URL = (os.environ.get("IMAGEGATE_ROOT_URL") or "").rstrip("/")
ADMIN_TOKEN = os.environ.get("IMAGEGATE_ADMIN_TOKEN")
if not ROOT_URL or not ADMIN_TOKEN:
    pytest.skip(
        "IMAGEGATE_ROOT_URL and IMAGEGATE_ADMIN_TOKEN are not set: run through `cargo test --test api sdk`",
        allow_module_level=True,
    )

BASE_URL = os.environ.get("IMAGEGATE_BASE_URL") or f"{ROOT_URL}/v1"
FAKE_URL = (os.environ.get("IMAGEGATE_FAKE_URL") or "").rstrip("/")

# Never go through a proxy to reach loopback addresses.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def admin(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """Call `/admin/v1{path}` with the admin token; returns (status, decoded JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{ROOT_URL}/admin/v1{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with _no_proxy.open(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def nonce() -> str:
    return f"nonce-{uuid.uuid4().hex}"


def client(api_key: str) -> OpenAI:
    return OpenAI(base_url=BASE_URL, api_key=api_key, max_retries=0, timeout=60.0)


@pytest.fixture
def tenant() -> str:
    """A fresh tenant created through the admin API; its name."""
    name = f"sdk-{uuid.uuid4().hex[:12]}"
    status, body = admin("POST", "/tenants", {"name": name, "organization": f"org-{name}"})
    assert status == 201, body
    assert body["name"] == name and body["status"] == "active" and body["source"] == "api", body
    return name


def issue_key(tenant: str) -> dict[str, Any]:
    status, body = admin("POST", f"/tenants/{tenant}/keys", {"name": "python-sdk", "expires_in": "1h"})
    assert status == 201, body
    assert body["key"].startswith(f"ig_{body['id']}_"), body
    assert body["tenant"] == tenant and body["revoked_at"] is None, body
    return body


def upstream_calls_with(marker: str) -> list[dict[str, Any]]:
    if not FAKE_URL:
        return []
    with _no_proxy.open(f"{FAKE_URL}/_fake/calls", timeout=10) as resp:
        return [c for c in json.loads(resp.read()) if marker in json.dumps(c)]


def test_an_issued_key_works_with_the_sdk_until_it_is_revoked(tenant: str) -> None:
    created = issue_key(tenant)
    sdk = client(created["key"])

    n = nonce()
    result = sdk.images.generate(model="gpt-image-1", prompt=f"a teapot {n}")
    assert result.data and len(result.data) == 1
    if FAKE_URL:
        [call] = upstream_calls_with(n)
        headers = {name.lower(): value for name, value in call["headers"]}
        assert headers.get("openai-organization") == f"org-{tenant}", headers
        assert created["key"] not in json.dumps(call), "the tenant key must not reach the upstream"

    status, listed = admin("GET", f"/tenants/{tenant}/keys")
    assert status == 200 and [k["id"] for k in listed["data"]] == [created["id"]], listed
    assert created["key"] not in json.dumps(listed), "a key listing must not show the secret"

    status, revoked = admin("DELETE", f"/keys/{created['id']}")
    assert status == 200 and isinstance(revoked["revoked_at"], int), revoked

    with pytest.raises(openai.AuthenticationError) as caught:
        sdk.images.generate(model="gpt-image-1", prompt=f"after revocation {nonce()}")
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_a_suspended_tenant_gets_permission_denied_until_resumed(tenant: str) -> None:
    sdk = client(issue_key(tenant)["key"])
    assert sdk.images.generate(model="gpt-image-1", prompt=f"before {nonce()}").data

    status, body = admin("POST", f"/tenants/{tenant}/suspend")
    assert status == 200 and body["status"] == "suspended", body
    with pytest.raises(openai.PermissionDeniedError) as caught:
        sdk.images.generate(model="gpt-image-1", prompt=f"while suspended {nonce()}")
    assert caught.value.status_code == 403
    assert caught.value.type == "permission_error"
    assert tenant in caught.value.message

    status, body = admin("POST", f"/tenants/{tenant}/resume")
    assert status == 200 and body["status"] == "active", body
    assert sdk.images.generate(model="gpt-image-1", prompt=f"resumed {nonce()}").data


def test_a_model_outside_allowed_models_is_permission_denied(tenant: str) -> None:
    sdk = client(issue_key(tenant)["key"])
    status, body = admin("PATCH", f"/tenants/{tenant}", {"allowed_models": ["dall-e-3"]})
    assert status == 200 and body["allowed_models"] == ["dall-e-3"], body

    n = nonce()
    with pytest.raises(openai.PermissionDeniedError):
        sdk.images.generate(model="gpt-image-1", prompt=f"not allowed {n}")
    assert upstream_calls_with(n) == [], "a refused model must not reach the upstream"
    assert sdk.images.generate(model="dall-e-3", prompt=f"allowed {nonce()}").data


def test_admin_errors_have_openai_shape() -> None:
    status, body = admin("GET", "/tenants/no-such-tenant")
    assert status == 404, body
    assert {"message", "type", "param", "code"} <= body["error"].keys(), body
    status, body = admin("POST", "/tenants", {"name": "bad name!"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body
