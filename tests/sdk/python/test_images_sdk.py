"""The official `openai` Python SDK, pointed at imagegate by `base_url` only.

Driven by `tests/sdk.rs`, which starts a fake OpenAI upstream and the gateway and
then runs `tests/sdk/python/.venv/bin/python -m pytest -q tests/sdk/python` with:

    IMAGEGATE_BASE_URL      the gateway, including `/v1`
    IMAGEGATE_KEY           a valid tenant key
    IMAGEGATE_OTHER_KEY     a second tenant's valid key
    IMAGEGATE_FAKE_URL      root of the fake upstream (`/_fake/calls`, `/_fake/reset`)
    IMAGEGATE_UPSTREAM_KEY  the key the fake expects (default `sk-upstream-test`)

Without IMAGEGATE_BASE_URL the module is skipped (so it can be collected by
hand), except under CI, where that is an error.

Every request carries a unique nonce (in `prompt`, or `user` for variations), and
the fake's recorded calls are looked up by that nonce, so the suite never needs
`/_fake/reset` and does not disturb another suite sharing the same fake.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
import time
import urllib.error
import urllib.request
import uuid
import zlib
from typing import Any

import pytest

import openai
from openai import OpenAI

BASE_URL = os.environ.get("IMAGEGATE_BASE_URL")
if not BASE_URL:
    if os.environ.get("CI"):
        raise RuntimeError("IMAGEGATE_BASE_URL is not set: this suite is run by tests/sdk.rs")
    pytest.skip(
        "IMAGEGATE_BASE_URL is not set: run through `cargo test --test sdk`",
        allow_module_level=True,
    )

KEY = os.environ["IMAGEGATE_KEY"]
OTHER_KEY = os.environ["IMAGEGATE_OTHER_KEY"]
FAKE_URL = os.environ["IMAGEGATE_FAKE_URL"].rstrip("/")
UPSTREAM_KEY = os.environ.get("IMAGEGATE_UPSTREAM_KEY", "sk-upstream-test")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ERROR_KEYS = {"message", "type", "param", "code"}

# Never go through a proxy to reach loopback addresses.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- helpers


def png(width: int, height: int, rgba: tuple[int, ...] = (255, 0, 0, 255), *, noise: bool = False) -> bytes:
    """A valid RGBA PNG of one colour (or random pixels), built with zlib and struct."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    if noise:
        pixels = os.urandom(width * height * 4)
        raw = b"".join(b"\x00" + pixels[y * width * 4 : (y + 1) * width * 4] for y in range(height))
        idat = zlib.compress(raw, 0)
    else:
        row = b"\x00" + bytes(rgba) * width
        idat = zlib.compress(row * height, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def nonce() -> str:
    return f"nonce-{uuid.uuid4().hex}"


def client(api_key: str = KEY, **kwargs: Any) -> OpenAI:
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 60.0)
    return OpenAI(base_url=BASE_URL, api_key=api_key, **kwargs)


def fake_calls() -> list[dict[str, Any]]:
    with _no_proxy.open(f"{FAKE_URL}/_fake/calls", timeout=10) as resp:
        return json.loads(resp.read())


def calls_with(marker: str) -> list[dict[str, Any]]:
    """Recorded upstream calls whose body (JSON or a text part) contains `marker`."""
    return [c for c in fake_calls() if marker in json.dumps(c)]


def the_call_with(marker: str, path_suffix: str) -> dict[str, Any]:
    found = calls_with(marker)
    assert len(found) == 1, f"expected exactly one upstream call carrying {marker}, got {len(found)}: {found}"
    call = found[0]
    assert call["path"].endswith(path_suffix), call["path"]
    return call


def headers_of(call: dict[str, Any]) -> list[tuple[str, str]]:
    return [(name.lower(), value) for name, value in call["headers"]]


def assert_upstream_auth(call: dict[str, Any]) -> None:
    headers = headers_of(call)
    auth = [value for name, value in headers if name == "authorization"]
    assert auth == [f"Bearer {UPSTREAM_KEY}"], auth
    for name, value in headers:
        assert KEY not in value, f"tenant key leaked upstream in header {name}"
        assert OTHER_KEY not in value, f"tenant key leaked upstream in header {name}"


def file_parts(call: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in call["parts"] if p.get("file_name") is not None]


def image_parts(call: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in file_parts(call) if re.fullmatch(r"image(\[\d*\])?", p["name"])]


def text_fields(call: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["text"] for p in call["parts"] if p.get("file_name") is None}


def assert_png_b64(b64: str | None) -> bytes:
    assert b64, "expected b64_json"
    data = base64.b64decode(b64)
    assert data.startswith(PNG_SIGNATURE), data[:16]
    return data


def assert_openai_error(err: openai.APIStatusError, status: int) -> None:
    assert err.status_code == status
    body = err.body  # the SDK unwraps {"error": {...}} into the inner object
    assert isinstance(body, dict), body
    assert ERROR_KEYS <= body.keys(), body
    assert isinstance(body["message"], str) and body["message"], body
    assert isinstance(body["type"], str) and body["type"], body
    assert err.request_id, "x-request-id missing from the error response"


# --------------------------------------------------------------------------- generations


def test_generate_with_dall_e_2_returns_created_and_a_url() -> None:
    n = nonce()
    before = int(time.time()) - 5
    r = client().images.generate(model="dall-e-2", prompt=f"a red square {n}", size="256x256")
    assert isinstance(r.created, int) and r.created >= before
    assert r.data and len(r.data) == 1
    assert r.data[0].url and r.data[0].url.startswith(("http://", "https://")), r.data[0].url
    assert r.data[0].b64_json is None


def test_generate_with_gpt_image_1_returns_a_png_in_b64_json_and_usage() -> None:
    n = nonce()
    r = client().images.generate(model="gpt-image-1", prompt=f"a blue circle {n}", size="1024x1024")
    assert isinstance(r.created, int) and r.created > 0
    assert r.data and len(r.data) == 1
    assert_png_b64(r.data[0].b64_json)
    assert r.data[0].url is None
    assert r.usage is not None and r.usage.total_tokens > 0


def test_generate_with_dall_e_3_returns_a_revised_prompt() -> None:
    n = nonce()
    r = client().images.generate(
        model="dall-e-3", prompt=f"a lighthouse {n}", style="natural", response_format="b64_json"
    )
    assert r.data and r.data[0].revised_prompt
    assert_png_b64(r.data[0].b64_json)
    call = the_call_with(n, "/images/generations")
    assert call["json"]["style"] == "natural"
    assert call["json"]["response_format"] == "b64_json"


# --------------------------------------------------------------------------- re-hosting


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    """GET a link the way an application would: no key, no SDK."""
    with _no_proxy.open(url, timeout=30) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


def test_gpt_image_with_response_format_url_returns_a_small_answer_and_a_durable_link() -> None:
    n = nonce()
    prompt = f"a detailed harbour at dusk {n} #side=1024"
    as_b64 = client().images.with_raw_response.generate(model="gpt-image-1", prompt=prompt, size="1024x1024")
    as_url = client().images.with_raw_response.generate(
        model="gpt-image-1", prompt=prompt, size="1024x1024", response_format="url"
    )
    b64_answer, url_answer = as_b64.parse(), as_url.parse()

    assert url_answer.data[0].b64_json is None
    link = url_answer.data[0].url
    assert link and link.startswith(BASE_URL.rsplit("/v1", 1)[0] + "/images/files/"), link
    status, headers, body = fetch(link)
    assert status == 200 and headers["content-type"] == "image/png"
    assert sha256(body) == sha256(base64.b64decode(b64_answer.data[0].b64_json)), "the upstream's image, byte for byte"
    assert url_answer.usage is not None and url_answer.usage.total_tokens == b64_answer.usage.total_tokens
    small, big = len(as_url.content), len(as_b64.content)
    assert small * 100 <= big, f"the link answer ({small} B) must be at least 100x smaller than base64 ({big} B)"
    for call in calls_with(n):
        assert "response_format" not in call["json"], "GPT image models never see response_format"


def test_dall_e_links_are_imagegate_links_that_serve_png() -> None:
    r = client().images.generate(model="dall-e-2", prompt=f"a pier {nonce()}", size="256x256", n=2)
    assert len(r.data) == 2
    for image in r.data:
        assert image.url and "/images/files/" in image.url and not image.url.startswith(FAKE_URL), image.url
        status, headers, body = fetch(image.url)
        assert status == 200 and body.startswith(PNG_SIGNATURE)
        assert headers["etag"] == f'"{sha256(body)}"'


def test_a_tampered_link_is_refused() -> None:
    r = client().images.generate(model="dall-e-2", prompt=f"a gate {nonce()}", size="256x256")
    link = r.data[0].url
    assert link
    with pytest.raises(urllib.error.HTTPError) as caught:
        fetch(link[:-4] + ("AAAA" if not link.endswith("AAAA") else "BBBB"))
    assert caught.value.code == 403


def test_successful_responses_carry_a_request_id() -> None:
    r = client().images.generate(model="gpt-image-1", prompt=f"a cube {nonce()}")
    assert r._request_id, "x-request-id missing from the success response"


def test_the_upstream_sees_the_upstream_key_and_never_the_tenant_key() -> None:
    n = nonce()
    client().images.generate(model="gpt-image-1", prompt=f"a green star {n}")
    assert_upstream_auth(the_call_with(n, "/images/generations"))


def test_a_second_tenant_key_works_and_is_not_forwarded_either() -> None:
    n = nonce()
    r = client(OTHER_KEY).images.generate(model="gpt-image-1", prompt=f"a yellow moon {n}")
    assert_png_b64(r.data[0].b64_json if r.data else None)
    assert_upstream_auth(the_call_with(n, "/images/generations"))


def test_all_generation_fields_and_an_unknown_extra_body_field_arrive_unchanged() -> None:
    n = nonce()
    sent = {
        "model": "gpt-image-1",
        "prompt": f"a purple hexagon {n}",
        "n": 2,
        "size": "1024x1536",
        "quality": "low",
        "background": "opaque",
        "moderation": "low",
        "output_format": "png",
        "user": f"user-{n}",
    }
    r = client().images.generate(**sent, extra_body={"brand_new_param": "x"})  # type: ignore[arg-type]
    assert r.data
    body = the_call_with(n, "/images/generations")["json"]
    assert isinstance(body, dict), body
    for key, value in sent.items():
        assert body.get(key) == value, f"{key}: sent {value!r}, upstream got {body.get(key)!r}"
    assert body.get("brand_new_param") == "x", body


# --------------------------------------------------------------------------- edits and variations


def test_edit_with_one_image_sends_one_image_part() -> None:
    n = nonce()
    img = png(64, 64, (10, 20, 30, 255))
    r = client().images.edit(
        model="gpt-image-1", image=("one.png", img, "image/png"), prompt=f"make it pop {n}"
    )
    assert_png_b64(r.data[0].b64_json if r.data else None)
    assert r.usage is not None and r.usage.total_tokens > 0
    call = the_call_with(n, "/images/edits")
    assert_upstream_auth(call)
    parts = image_parts(call)
    assert [p["sha256"] for p in parts] == [sha256(img)], parts
    assert parts[0]["content_type"] == "image/png"
    assert parts[0]["len"] == len(img)
    fields = text_fields(call)
    assert fields.get("model") == "gpt-image-1"
    assert fields.get("prompt") == f"make it pop {n}"


def test_edit_with_several_images_sends_image_brackets_parts_in_order() -> None:
    n = nonce()
    imgs = [png(32 + 8 * i, 32, (40 * i, 255 - 40 * i, 7, 255)) for i in range(4)]
    files = [(f"in{i}.png", img, "image/png") for i, img in enumerate(imgs)]
    r = client().images.edit(model="gpt-image-1", image=files, prompt=f"combine these {n}")
    assert_png_b64(r.data[0].b64_json if r.data else None)
    call = the_call_with(n, "/images/edits")
    parts = image_parts(call)
    assert [p["sha256"] for p in parts] == [sha256(i) for i in imgs], parts
    assert all(p["name"] == "image[]" for p in parts), [p["name"] for p in parts]
    assert all(p["content_type"] == "image/png" for p in parts)


def test_edit_with_a_mask_sends_the_mask_part() -> None:
    n = nonce()
    img = png(64, 64, (200, 100, 50, 255))
    mask = png(64, 64, (0, 0, 0, 0))
    r = client().images.edit(
        model="dall-e-2",
        image=("base.png", img, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt=f"fill the hole {n}",
        size="256x256",
    )
    assert r.data and r.data[0].url
    call = the_call_with(n, "/images/edits")
    masks = [p for p in file_parts(call) if p["name"] == "mask"]
    assert len(masks) == 1 and masks[0]["sha256"] == sha256(mask), file_parts(call)
    assert [p["sha256"] for p in image_parts(call)] == [sha256(img)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks variations deprecated
def test_variation_with_dall_e_2_and_n_2_returns_two_urls() -> None:
    n = nonce()
    img = png(64, 64, (1, 2, 3, 255))
    r = client().images.create_variation(
        model="dall-e-2", image=("var.png", img, "image/png"), n=2, size="256x256", user=n
    )
    assert isinstance(r.created, int) and r.created > 0
    assert r.data and len(r.data) == 2
    assert all(d.url and d.url.startswith(("http://", "https://")) for d in r.data)
    call = the_call_with(n, "/images/variations")
    assert_upstream_auth(call)
    assert [p["sha256"] for p in image_parts(call)] == [sha256(img)]
    assert text_fields(call).get("n") == "2"


# --------------------------------------------------------------------------- streaming


def test_streamed_generation_yields_two_partials_then_completed_with_usage() -> None:
    n = nonce()
    stream = client().images.generate(
        model="gpt-image-1", prompt=f"a streamed sunset {n}", stream=True, partial_images=2
    )
    with stream:
        events = list(stream)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [getattr(e, "partial_image_index", None) for e in events[:2]] == [0, 1]
    for e in events:
        assert_png_b64(e.b64_json)
    done = events[-1]
    assert done.usage is not None and done.usage.total_tokens > 0
    body = the_call_with(n, "/images/generations")["json"]
    assert body.get("stream") is True and body.get("partial_images") == 2


def test_streamed_edit_yields_two_partials_then_completed_with_usage() -> None:
    n = nonce()
    img = png(48, 48, (9, 9, 200, 255))
    stream = client().images.edit(
        model="gpt-image-1",
        image=("s.png", img, "image/png"),
        prompt=f"a streamed edit {n}",
        stream=True,
        partial_images=2,
    )
    with stream:
        events = list(stream)
    assert [e.type for e in events] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    assert [getattr(e, "partial_image_index", None) for e in events[:2]] == [0, 1]
    done = events[-1]
    assert_png_b64(done.b64_json)
    assert done.usage is not None and done.usage.total_tokens > 0
    fields = text_fields(the_call_with(n, "/images/edits"))
    assert fields.get("stream") == "true" and fields.get("partial_images") == "2"


def test_streamed_events_are_delivered_as_they_happen_not_buffered() -> None:
    stream = client().images.generate(
        model="gpt-image-1", prompt=f"slow stream #gap=400 {nonce()}", stream=True, partial_images=2
    )
    arrivals = []
    with stream:
        for _ in stream:
            arrivals.append(time.monotonic())
    assert len(arrivals) == 3
    # The fake waits 400 ms between events: a buffering gateway delivers them all at once.
    assert arrivals[-1] - arrivals[0] >= 0.5, arrivals


# --------------------------------------------------------------------------- errors


def test_a_bad_key_raises_authentication_error_and_reaches_no_upstream() -> None:
    n = nonce()
    with pytest.raises(openai.AuthenticationError) as info:
        client("ig-not-a-real-key-0000").images.generate(model="gpt-image-1", prompt=f"nope {n}")
    assert_openai_error(info.value, 401)
    assert calls_with(n) == []


def test_an_upstream_400_raises_bad_request_error() -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client().images.generate(model="dall-e-3", prompt=f"#status=400 {nonce()}")
    assert_openai_error(info.value, 400)
    assert info.value.code == "content_policy_violation"


def test_an_upstream_404_raises_not_found_error() -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client().images.generate(model="gpt-image-1", prompt=f"#status=404 {nonce()}")
    assert_openai_error(info.value, 404)


def test_an_upstream_429_raises_rate_limit_error() -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client().images.generate(model="gpt-image-1", prompt=f"#status=429 {nonce()}")
    assert_openai_error(info.value, 429)


def test_an_upstream_500_raises_internal_server_error() -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client().images.generate(model="gpt-image-1", prompt=f"#status=500 {nonce()}")
    assert_openai_error(info.value, 500)


def test_an_edit_larger_than_the_multipart_limit_raises_a_413_status_error() -> None:
    n = nonce()
    big = png(880, 880, noise=True)  # incompressible, about 3.1 MB (the SDK run's limit is 2 MiB)
    assert len(big) > 3_000_000
    with pytest.raises(openai.APIStatusError) as info:
        client().images.edit(model="gpt-image-1", image=("big.png", big, "image/png"), prompt=f"too big {n}")
    assert_openai_error(info.value, 413)
    assert calls_with(n) == []
