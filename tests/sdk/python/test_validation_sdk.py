"""Validation through the official `openai` Python SDK (see `docs/validation.md`).

Each request breaks one of its model's rules: the SDK must raise `openai.BadRequestError`
with the parameter and code imagegate names, and the fake upstream must never see the
request. Driven by `tests/api/sdk.rs` like `test_images_sdk.py`, with the same environment:

    IMAGEGATE_BASE_URL      the gateway, including `/v1`
    IMAGEGATE_KEY           a valid tenant key
    IMAGEGATE_FAKE_URL      root of the fake upstream (`/_fake/calls`)
    IMAGEGATE_REHOST        `true` or `false`: the gateway's `images.rehost`, on which what GPT image
                            models do with `response_format` depends (see docs/validation.md)
    IMAGEGATE_MAX_MULTIPART the gateway's `server.max_multipart_body`, in bytes (for the 413 case)

Every request carries a unique nonce (in `prompt`, or `user` for variations); the fake's
recorded calls are searched for it, so the suite never resets the fake.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import urllib.request
import uuid
import zlib
from typing import Any, Callable

import pytest

import openai
from openai import OpenAI

BASE_URL = os.environ.get("IMAGEGATE_BASE_URL")
if not BASE_URL:
    if os.environ.get("CI"):
        raise RuntimeError("IMAGEGATE_BASE_URL is not set: this suite is run by tests/sdk.rs")
    pytest.skip(
        "IMAGEGATE_BASE_URL is not set: run through `cargo test --test api sdk`",
        allow_module_level=True,
    )

KEY = os.environ["IMAGEGATE_KEY"]
FAKE_URL = os.environ["IMAGEGATE_FAKE_URL"].rstrip("/")
# Said explicitly by the harness, never assumed: these change what is refused and how.
REHOST = {"true": True, "false": False}[os.environ["IMAGEGATE_REHOST"]]
MAX_MULTIPART = int(os.environ["IMAGEGATE_MAX_MULTIPART"])

ERROR_KEYS = {"message", "type", "param", "code"}

# A real 16x16 baseline JPEG (CPython's Lib/test/imghdrdata/python.jpg, 543 bytes).
JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQEAAQABAAD/2wBDAAMCAgICAgMCAgIDAwMDBAYEBAQEBAgGBgUGCQgKCgkICQkKDA8MCgsOCwkJDRENDg8Q"
    "EBEQCgwSExIQEw8QEBD/2wBDAQMDAwQDBAgEBAgQCwkLEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ"
    "EBAQEBAQEBD/wAARCAAQABADASIAAhEBAxEB/8QAFgABAQEAAAAAAAAAAAAAAAAABwQF/8QAJBAAAQQBBAICAwAAAAAAAAAAAQID"
    "BAYFBwgSExEiABQJMTL/xAAVAQEBAAAAAAAAAAAAAAAAAAAABv/EACMRAAECBQMFAAAAAAAAAAAAAAECEQMEBQYhABIxFRZhgeH/"
    "2gAMAwEAAhEDEQA/ABSm0mobc8HmExLUlRzzEWPkJWW+ulrsaUVAseUgslSlH9LKuPryIKuWPZdskzXmm3fX5m2nF4GlVxx/HOpx"
    "4ks51+MiU/Iaad7UcUo4tILoS4kqcWkezS0hO/HvuRp0rO6hWnWO1UisZVuFi4GFeyEpmGepa5S5SWVPuciFKRFLgSrwetnyPIB+"
    "Vb4N9mKhQMzo5po9XLdDs9d6ZVix2VEhiL9kuNPxw2gEKcDQ/rs8AuA8VAe0vdl7VOYn+27flGAUgmITjbhSmCg3BYlyeWDkMolv"
    "w4KOp1KM6iCNvngZHwetf//Z"
)
assert JPEG.startswith(b"\xff\xd8\xff") and len(JPEG) == 543

# Never go through a proxy to reach loopback addresses.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png(width: int, height: int, rgba: tuple[int, int, int, int] = (255, 0, 0, 0), alpha: bool = True) -> bytes:
    """A valid one-colour PNG, RGBA (or RGB with `alpha=False`), built with zlib and struct."""
    pixel = bytes(rgba) if alpha else bytes(rgba[:3])
    row = b"\x00" + pixel * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6 if alpha else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(row * height, 9))
        + _chunk(b"IEND", b"")
    )


def header_bomb() -> bytes:
    """About 1 KB of PNG whose header claims 100000x100000 RGBA pixels (40 GB decoded)."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", os.urandom(1000)) + _chunk(b"IEND", b"")


def nonce() -> str:
    return f"nonce-{uuid.uuid4().hex}"


def client() -> OpenAI:
    return OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0, timeout=60.0)


def calls_with(marker: str) -> list[dict[str, Any]]:
    """Recorded upstream calls whose body (JSON or a text part) contains `marker`."""
    with _no_proxy.open(f"{FAKE_URL}/_fake/calls", timeout=10) as resp:
        calls = json.loads(resp.read())
    return [c for c in calls if marker in json.dumps(c)]


def assert_refused(send: Callable[[], Any], marker: str, param: str, code: str) -> None:
    """`send()` raises BadRequestError naming `param` and `code`, and nothing carrying `marker` reached the fake."""
    with pytest.raises(openai.BadRequestError) as info:
        send()
    err = info.value
    assert err.status_code == 400
    body = err.body  # the SDK unwraps {"error": {...}} into the inner object
    assert isinstance(body, dict), body
    assert ERROR_KEYS <= body.keys(), body
    assert isinstance(body["message"], str) and body["message"], body
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", param, code), body
    assert (err.type, err.param, err.code) == ("invalid_request_error", param, code)
    assert calls_with(marker) == [], "a refused request reached the upstream"


# --------------------------------------------------------------------------------------------- generations


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        pytest.param({"model": "dall-e-2", "size": "1024x1536"}, "size", "invalid_value", id="dall-e-2-size"),
        pytest.param({"model": "dall-e-3", "size": "512x512"}, "size", "invalid_value", id="dall-e-3-size"),
        pytest.param({"model": "gpt-image-1", "size": "512x512"}, "size", "invalid_value", id="gpt-image-1-size"),
        pytest.param({"model": "gpt-image-2", "size": "1000x1000"}, "size", "invalid_value", id="gpt-image-2-size"),
        pytest.param({"model": "dall-e-3", "n": 2}, "n", "integer_above_max_value", id="dall-e-3-n-2"),
        pytest.param({"model": "gpt-image-1", "style": "vivid"}, "style", "unsupported_parameter", id="style-on-gpt"),
        pytest.param(
            {"model": "gpt-image-1", "output_format": "png", "output_compression": 50},
            "output_compression",
            "invalid_value",
            id="compression-with-png",
        ),
        pytest.param({"model": "gpt-image-1", "quality": "ultra"}, "quality", "invalid_value", id="unknown-quality"),
        # With re-hosting on, GPT image models take response_format (imagegate answers links itself) but not
        # 'url' with a stream; with it off they refuse response_format outright, as OpenAI does.
        pytest.param(
            {"model": "gpt-image-1", "response_format": "url", "stream": True},
            "response_format",
            "invalid_value" if REHOST else "unknown_parameter",
            id=f"url-with-stream-on-gpt-rehost-{'on' if REHOST else 'off'}",
        ),
        pytest.param(
            {"model": "gpt-image-2", "size": "18446744073709551600x18446744073709551600"},
            "size",
            "invalid_value",
            id="gpt-image-2-size-of-huge-numbers",
        ),
        pytest.param({"model": "gpt-image-2", "size": "+1024x01024"}, "size", "invalid_value", id="size-sign-zero"),
        # The SDK's types would catch these; extra_body sends them anyway, as a caller with stale types might.
        pytest.param({"model": "gpt-image-1", "extra_body": {"n": "2"}}, "n", "invalid_type", id="n-as-string"),
        pytest.param({"model": "gpt-image-1", "extra_body": {"stream": "yes"}}, "stream", "invalid_type", id="stream-yes"),
        pytest.param({"model": "dall-e-3", "extra_body": {"size": 1024}}, "size", "invalid_type", id="size-as-int"),
        pytest.param(
            {"model": "gpt-image-1", "extra_body": {"output_format": "webp", "output_compression": 50.5}},
            "output_compression",
            "invalid_type",
            id="compression-as-decimal",
        ),
        pytest.param(
            {"model": "gpt-image-1", "extra_body": {"input_fidelity": "bogus"}},
            "input_fidelity",
            "invalid_value",
            id="input-fidelity-bogus",
        ),
        # No model, but a GPT image parameter: a GPT image model's rules (style is DALL·E 3's).
        pytest.param({"output_format": "webp", "style": "vivid"}, "style", "unsupported_parameter", id="implied-gpt"),
    ],
)
def test_a_generation_breaking_a_model_rule_raises_bad_request_and_reaches_no_upstream(
    fields: dict[str, Any], param: str, code: str
) -> None:
    n = nonce()
    assert_refused(lambda: client().images.generate(prompt=f"a red fox {n}", **fields), n, param, code)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"model": "gpt-image-1", "output_format": "png", "output_compression": 100}, id="png-with-its-100"),
        pytest.param({"output_format": "webp", "quality": "high"}, id="no-model-but-gpt-parameters"),
    ],
)
def test_what_openai_accepts_is_forwarded(fields: dict[str, Any]) -> None:
    n = nonce()
    r = client().images.generate(prompt=f"a red fox {n}", **fields)
    assert r.data
    (call,) = calls_with(n)
    for key, value in fields.items():
        assert call["json"][key] == value, call["json"]
    # Forwarded as sent: imagegate adds no model where the caller named none.
    assert ("model" in call["json"]) == ("model" in fields), call["json"]


def test_a_prompt_over_the_dall_e_2_limit_raises_bad_request() -> None:
    n = nonce()
    prompt = n + "é" * (1001 - len(n))  # 1001 characters
    assert_refused(
        lambda: client().images.generate(model="dall-e-2", prompt=prompt),
        n,
        "prompt",
        "string_above_max_length",
    )


def test_a_prompt_at_the_dall_e_2_limit_is_forwarded() -> None:
    n = nonce()
    prompt = n + "é" * (1000 - len(n))  # 1000 characters, more than 1000 bytes
    r = client().images.generate(model="dall-e-2", prompt=prompt)
    assert r.data
    assert len(calls_with(n)) == 1


def test_four_partial_images_on_a_stream_raise_bad_request() -> None:
    n = nonce()
    assert_refused(
        lambda: client().images.generate(
            model="gpt-image-1", prompt=f"a streamed fox {n}", stream=True, partial_images=4
        ),
        n,
        "partial_images",
        "integer_above_max_value",
    )


# --------------------------------------------------------------------------------------------- edits


def test_a_jpeg_edit_for_dall_e_2_raises_bad_request() -> None:
    n = nonce()
    assert_refused(
        lambda: client().images.edit(
            model="dall-e-2", image=("photo.jpg", JPEG, "image/jpeg"), prompt=f"add a hat {n}"
        ),
        n,
        "image",
        "unsupported_file_mimetype",
    )


def test_an_edit_with_17_images_raises_bad_request() -> None:
    n = nonce()
    images = [(f"in{i}.png", png(16 + i, 16), "image/png") for i in range(17)]
    assert_refused(
        lambda: client().images.edit(model="gpt-image-1", image=images, prompt=f"combine {n}"),
        n,
        "image",
        "too_many_images",
    )


def test_a_mask_of_another_size_raises_bad_request() -> None:
    n = nonce()
    assert_refused(
        lambda: client().images.edit(
            model="gpt-image-1",
            image=("base.png", png(64, 64, (10, 20, 30, 255)), "image/png"),
            mask=("mask.png", png(32, 32), "image/png"),
            prompt=f"fill the hole {n}",
        ),
        n,
        "mask",
        "invalid_image_dimensions",
    )


def test_a_png_labelled_as_jpeg_raises_bad_request() -> None:
    n = nonce()
    assert_refused(
        lambda: client().images.edit(
            model="gpt-image-1", image=("photo.jpg", png(64, 64), "image/jpeg"), prompt=f"add a hat {n}"
        ),
        n,
        "image",
        "invalid_image_format",
    )


def test_a_header_claiming_100000x100000_raises_bad_request_at_once() -> None:
    n = nonce()
    bomb = header_bomb()
    assert len(bomb) < 1100
    assert_refused(
        lambda: client().images.edit(model="gpt-image-1", image=("bomb.png", bomb, "image/png"), prompt=f"x {n}"),
        n,
        "image",
        "invalid_image_dimensions",
    )


def test_a_dall_e_2_edit_of_an_rgb_png_without_a_mask_raises_bad_request() -> None:
    n = nonce()
    assert_refused(
        lambda: client().images.edit(
            model="dall-e-2", image=("rgb.png", png(64, 64, alpha=False), "image/png"), prompt=f"add a hat {n}"
        ),
        n,
        "image",
        "invalid_image_format",
    )


def test_a_truncated_png_raises_bad_request() -> None:
    n = nonce()
    assert_refused(
        lambda: client().images.edit(
            model="gpt-image-1", image=("cut.png", png(64, 64)[:40], "image/png"), prompt=f"add a hat {n}"
        ),
        n,
        "image",
        "invalid_image_format",
    )


def test_an_upload_over_the_multipart_limit_raises_413_naming_the_limit() -> None:
    n = nonce()
    big = os.urandom(MAX_MULTIPART + 1024)  # never inspected: refused by its length
    with pytest.raises(openai.APIStatusError) as info:
        client().images.edit(model="gpt-image-1", image=("big.png", big, "image/png"), prompt=f"too big {n}")
    err = info.value
    assert err.status_code == 413
    body = err.body
    assert isinstance(body, dict) and ERROR_KEYS <= body.keys(), body
    assert (body["type"], body["param"], body["code"]) == ("invalid_request_error", None, "request_too_large"), body
    assert str(MAX_MULTIPART) in body["message"], body
    assert calls_with(n) == []


def test_a_png_declared_as_jpeg_raises_bad_request() -> None:
    # A declared type that contradicts the bytes stays refused. (A part declared application/octet-stream,
    # or with no type, is forwarded with the type of its bytes: test_models_sdk.py.)
    n = nonce()
    assert_refused(
        lambda: client().images.edit(
            model="gpt-image-1",
            image=("upload.jpg", png(64, 64), "image/jpeg"),
            prompt=f"add a hat {n}",
        ),
        n,
        "image",
        "invalid_image_format",
    )


# --------------------------------------------------------------------------------------------- variations


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks variations deprecated
def test_a_variation_with_gpt_image_1_raises_bad_request() -> None:
    n = nonce()
    assert_refused(
        lambda: client().images.create_variation(
            model="gpt-image-1", image=("v.png", png(64, 64), "image/png"), user=n
        ),
        n,
        "model",
        "invalid_value",
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_non_square_variation_raises_bad_request() -> None:
    n = nonce()
    assert_refused(
        lambda: client().images.create_variation(image=("v.png", png(64, 32), "image/png"), user=n),
        n,
        "image",
        "invalid_image_format",
    )
