"""A model declared in config only, driven through the official `openai` Python SDK (issue 14).

`tests/api/sdk.rs` (`the_python_sdk_drives_a_model_declared_in_config_only`) starts a gateway whose config
declares `gpt-image-3` from scratch under `[models."gpt-image-3"]` (rules, per-token price, deprecation and
shutdown dates, a replacement), a snapshot `gpt-image-3-alpha` past its shutdown, and the alias
`gpt-image-3-preview` → `gpt-image-3`; nothing about these models is in imagegate's code or built-in
catalog. It then checks the ledger (priced rows, the alias's requested model). Environment as for
`test_validation_sdk.py`, plus IMAGEGATE_MODELS_SUITE=1, without which this file is skipped (the other
suites run against a gateway without these models).

Also here: file parts the SDK sends as `application/octet-stream` (raw `bytes`) reach the upstream typed
from their bytes, while a part whose declared type contradicts its bytes stays refused.
"""

from __future__ import annotations

import json
import os
import struct
import urllib.request
import uuid
import zlib
from typing import Any

import pytest

import openai
from openai import OpenAI

if os.environ.get("IMAGEGATE_MODELS_SUITE") != "1":
    pytest.skip("run by tests/api/sdk.rs with a gateway declaring gpt-image-3", allow_module_level=True)

BASE_URL = os.environ["IMAGEGATE_BASE_URL"]
KEY = os.environ["IMAGEGATE_KEY"]
FAKE_URL = os.environ["IMAGEGATE_FAKE_URL"].rstrip("/")

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png(width: int, height: int) -> bytes:
    """A valid transparent RGBA PNG."""
    row = b"\x00" + bytes((255, 0, 0, 0)) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(row * height, 9))
        + _chunk(b"IEND", b"")
    )


def nonce() -> str:
    return f"nonce-{uuid.uuid4().hex}"


def client() -> OpenAI:
    return OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0, timeout=60.0)


def calls_with(marker: str) -> list[dict[str, Any]]:
    """Recorded upstream calls whose body (JSON or a text part) contains `marker`."""
    with _no_proxy.open(f"{FAKE_URL}/_fake/calls", timeout=10) as resp:
        calls = json.loads(resp.read())
    return [c for c in calls if marker in json.dumps(c)]


def file_types(call: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(p["name"], p["content_type"]) for p in call["parts"] if p["file_name"] is not None]


# --------------------------------------------------------------------------------------------- the new model


def test_the_new_model_is_validated_by_its_config_rules_and_warns_of_its_shutdown() -> None:
    n = nonce()
    raw = client().images.with_raw_response.generate(
        model="gpt-image-3", prompt=f"a lighthouse {n}", quality="ultra", size="2048x2048", n=2
    )
    result = raw.parse()
    assert len(result.data) == 2 and result.data[0].b64_json
    # RFC 9745 / RFC 8594: deprecated since 2026-11-01, gone on 2099-06-30, move to gpt-image-2.
    assert raw.headers["deprecation"] == "@1793491200"
    assert raw.headers["sunset"] == "Tue, 30 Jun 2099 00:00:00 GMT"
    assert 'rel="successor-version"' in raw.headers["link"] and "gpt-image-2" in raw.headers["link"]
    (call,) = calls_with(n)
    assert call["json"]["model"] == "gpt-image-3"


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"quality": "max"}, "quality", "invalid_value"),
        ({"size": "1536x1024"}, "size", "invalid_value"),
        ({"n": 5}, "n", "integer_above_max_value"),
        ({"background": "transparent"}, "background", "unsupported_parameter"),
        ({"style": "vivid"}, "style", "unsupported_parameter"),
    ],
)
def test_what_the_new_model_does_not_take_is_refused_before_the_upstream(
    fields: dict[str, Any], param: str, code: str
) -> None:
    n = nonce()
    with pytest.raises(openai.BadRequestError) as info:
        client().images.generate(model="gpt-image-3", prompt=f"x {n}", **fields)
    err = info.value
    assert (err.status_code, err.param, err.code) == (400, param, code), err.body
    assert calls_with(n) == []


def test_an_alias_moves_its_callers_to_the_new_model() -> None:
    n = nonce()
    result = client().images.generate(model="gpt-image-3-preview", prompt=f"a kite {n}")
    assert result.data[0].b64_json
    (call,) = calls_with(n)
    assert call["json"]["model"] == "gpt-image-3", "the upstream sees the model the alias names"


def test_a_model_past_its_shutdown_is_not_found_like_at_openai() -> None:
    n = nonce()
    with pytest.raises(openai.NotFoundError) as info:
        client().images.generate(model="gpt-image-3-alpha", prompt=f"x {n}")
    assert (info.value.status_code, info.value.code) == (404, "model_not_found")
    assert "gpt-image-3-alpha" in str(info.value.body)
    assert calls_with(n) == []


def test_the_new_model_edits_raw_bytes() -> None:
    n = nonce()
    result = client().images.edit(model="gpt-image-3", image=[png(64, 64)], prompt=f"add a hat {n}")
    assert result.data[0].b64_json
    (call,) = calls_with(n)
    assert file_types(call) == [("image[]", "image/png")]


# --------------------------------------------------------------------------------------------- file types


def test_raw_bytes_edit_reaches_the_upstream_as_image_png() -> None:
    # httpx sends raw bytes as `upload`, application/octet-stream: OpenAI itself refuses that.
    n = nonce()
    result = client().images.edit(model="gpt-image-1", image=[png(64, 64), png(64, 64)], prompt=f"a hat {n}")
    assert result.data
    (call,) = calls_with(n)
    assert file_types(call) == [("image[]", "image/png"), ("image[]", "image/png")]


def test_raw_bytes_variation_reaches_the_upstream_as_image_png() -> None:
    n = nonce()
    result = client().images.create_variation(model="dall-e-2", image=png(64, 64), user=n)
    assert result.data
    (call,) = calls_with(n)
    assert file_types(call) == [("image", "image/png")]


def test_a_png_declared_as_jpeg_is_still_refused() -> None:
    n = nonce()
    with pytest.raises(openai.BadRequestError) as info:
        client().images.edit(model="gpt-image-1", image=("a.jpg", png(64, 64), "image/jpeg"), prompt=f"x {n}")
    assert (info.value.param, info.value.code) == ("image", "invalid_image_format")
    assert calls_with(n) == []


# --------------------------------------------------------------------------------------------- chained edits


def test_a_chained_edit_sends_the_upstream_the_image_behind_the_link_never_the_link() -> None:
    link = client().images.generate(model="gpt-image-1", prompt=f"a kite {nonce()}", response_format="url").data[0].url
    assert link and link.startswith(BASE_URL.rsplit("/v1", 1)[0]), link
    n = nonce()
    # The SDK's `images.edit` sends files; the JSON edit body (images[].image_url) goes through its client.
    edited = client().post(
        "/images/edits",
        body={"model": "gpt-image-1", "prompt": f"add a tail {n}", "images": [{"image_url": link}]},
        cast_to=openai.types.ImagesResponse,
    )
    assert edited.data and edited.data[0].b64_json
    (call,) = calls_with(n)
    sent = call["json"]["images"][0]["image_url"]
    assert sent.startswith("data:image/png;base64,"), sent[:40]
    assert link.split("?")[0] not in json.dumps(call), "the upstream never sees the gateway's link"
