// The official `openai` Node SDK, pointed at imagegate by `baseURL` only.
//
// Driven by tests/sdk.rs, which starts a fake OpenAI upstream and the gateway and
// then runs `node --test tests/sdk/node/` with:
//
//   IMAGEGATE_BASE_URL      the gateway, including `/v1`
//   IMAGEGATE_KEY           a valid tenant key
//   IMAGEGATE_OTHER_KEY     a second tenant's valid key
//   IMAGEGATE_FAKE_URL      root of the fake upstream (`/_fake/calls`, `/_fake/reset`)
//   IMAGEGATE_UPSTREAM_KEY  the key the fake expects (default `sk-upstream-test`)
//
// Without IMAGEGATE_BASE_URL every test is skipped (so the file can be run by
// hand), except under CI, where that is an error.
//
// Every request carries a unique nonce (in `prompt`, or `user` for variations),
// and the fake's recorded calls are looked up by that nonce, so the suite never
// needs `/_fake/reset` and does not disturb another suite sharing the same fake.

import assert from 'node:assert/strict';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { test } from 'node:test';
import { deflateSync } from 'node:zlib';

import OpenAI, { toFile } from 'openai';

const env = process.env;
const BASE_URL = env.IMAGEGATE_BASE_URL;
if (!BASE_URL && env.CI) {
  throw new Error('IMAGEGATE_BASE_URL is not set: this suite is run by tests/sdk.rs');
}
const skip = BASE_URL ? false : 'IMAGEGATE_BASE_URL is not set: run through `cargo test --test sdk`';
const KEY = env.IMAGEGATE_KEY ?? '';
const OTHER_KEY = env.IMAGEGATE_OTHER_KEY ?? '';
const FAKE_URL = (env.IMAGEGATE_FAKE_URL ?? '').replace(/\/+$/, '');
const UPSTREAM_KEY = env.IMAGEGATE_UPSTREAM_KEY ?? 'sk-upstream-test';

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
const ERROR_KEYS = ['message', 'type', 'param', 'code'];

// ---------------------------------------------------------------------------- helpers

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(buf) {
  let c = 0xffffffff;
  for (const byte of buf) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(tag, data) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(tag, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([len, body, crc]);
}

/** A valid RGBA PNG of one colour, or of random pixels with `noise`. */
function png(width, height, rgba = [255, 0, 0, 255], { noise = false } = {}) {
  const rowLen = 1 + width * 4;
  const raw = noise ? randomBytes(rowLen * height) : Buffer.alloc(rowLen * height);
  for (let y = 0; y < height; y++) {
    raw[y * rowLen] = 0; // filter type: none
    if (!noise) {
      for (let x = 0; x < width; x++) raw.set(rgba, y * rowLen + 1 + x * 4);
    }
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 6, 0, 0, 0], 8); // 8-bit RGBA
  const idat = deflateSync(raw, { level: noise ? 0 : 9 });
  return Buffer.concat([PNG_SIGNATURE, chunk('IHDR', ihdr), chunk('IDAT', idat), chunk('IEND', Buffer.alloc(0))]);
}

const sha256 = (buf) => createHash('sha256').update(buf).digest('hex');
const nonce = () => `nonce-${randomUUID().replaceAll('-', '')}`;
const pngFile = (buf, name) => toFile(buf, name, { type: 'image/png' });

function client(apiKey = KEY, opts = {}) {
  return new OpenAI({ baseURL: BASE_URL, apiKey, maxRetries: 0, timeout: 60_000, ...opts });
}

async function fakeCalls() {
  const res = await fetch(`${FAKE_URL}/_fake/calls`);
  assert.equal(res.status, 200, 'GET /_fake/calls');
  return res.json();
}

/** Recorded upstream calls whose body (JSON or a text part) contains `marker`. */
async function callsWith(marker) {
  return (await fakeCalls()).filter((c) => JSON.stringify(c).includes(marker));
}

async function theCallWith(marker, pathSuffix) {
  const found = await callsWith(marker);
  assert.equal(found.length, 1, `expected exactly one upstream call carrying ${marker}: ${JSON.stringify(found)}`);
  assert.ok(found[0].path.endsWith(pathSuffix), found[0].path);
  return found[0];
}

function assertUpstreamAuth(call) {
  const headers = call.headers.map(([name, value]) => [name.toLowerCase(), value]);
  const auth = headers.filter(([name]) => name === 'authorization').map(([, value]) => value);
  assert.deepEqual(auth, [`Bearer ${UPSTREAM_KEY}`]);
  for (const [name, value] of headers) {
    assert.ok(!value.includes(KEY), `tenant key leaked upstream in header ${name}`);
    assert.ok(!value.includes(OTHER_KEY), `tenant key leaked upstream in header ${name}`);
  }
}

const fileParts = (call) => call.parts.filter((p) => p.file_name != null);
const imageParts = (call) => fileParts(call).filter((p) => /^image(\[\d*\])?$/.test(p.name));
const textFields = (call) =>
  Object.fromEntries(call.parts.filter((p) => p.file_name == null).map((p) => [p.name, p.text]));

function assertPngB64(b64) {
  assert.ok(b64, 'expected b64_json');
  const data = Buffer.from(b64, 'base64');
  assert.ok(data.subarray(0, 8).equals(PNG_SIGNATURE), `not a PNG: ${data.subarray(0, 16).toString('hex')}`);
}

/** Asserts that `promise` rejects with `Class` (status `status`) carrying an OpenAI error body. */
async function rejectsWith(promise, Class, status) {
  let caught;
  await assert.rejects(promise, (err) => {
    caught = err;
    return true;
  });
  const got = `${caught?.constructor?.name}: ${caught?.message}`;
  assert.ok(caught instanceof Class, `expected ${Class.name}, got ${got}`);
  assert.equal(caught.status, status, `expected status ${status}, got ${got}`);
  const body = caught.error; // the `error` object of the response body
  assert.equal(typeof body, 'object', `error body: ${JSON.stringify(body)}`);
  assert.ok(body !== null);
  for (const key of ERROR_KEYS) assert.ok(key in body, `error body lacks ${key}: ${JSON.stringify(body)}`);
  assert.equal(typeof body.message, 'string');
  assert.ok(body.message.length > 0);
  assert.equal(typeof body.type, 'string');
  assert.ok(body.type.length > 0);
  assert.ok(caught.requestID, 'x-request-id missing from the error response');
  return caught;
}

// ---------------------------------------------------------------------------- generations

test('generate with dall-e-2 returns created and a url', { skip }, async () => {
  const before = Math.floor(Date.now() / 1000) - 5;
  const r = await client().images.generate({ model: 'dall-e-2', prompt: `a red square ${nonce()}`, size: '256x256' });
  assert.ok(Number.isInteger(r.created) && r.created >= before, `created: ${r.created}`);
  assert.equal(r.data.length, 1);
  assert.match(r.data[0].url, /^https?:\/\//);
  assert.equal(r.data[0].b64_json, undefined);
});

test('generate with gpt-image-1 returns a png in b64_json and usage', { skip }, async () => {
  const r = await client().images.generate({ model: 'gpt-image-1', prompt: `a blue circle ${nonce()}` });
  assert.ok(Number.isInteger(r.created) && r.created > 0);
  assert.equal(r.data.length, 1);
  assertPngB64(r.data[0].b64_json);
  assert.equal(r.data[0].url, undefined);
  assert.ok(r.usage.total_tokens > 0, JSON.stringify(r.usage));
});

test('generate with dall-e-3 returns a revised prompt', { skip }, async () => {
  const n = nonce();
  const r = await client().images.generate({
    model: 'dall-e-3',
    prompt: `a lighthouse ${n}`,
    style: 'natural',
    response_format: 'b64_json',
  });
  assert.ok(r.data[0].revised_prompt);
  assertPngB64(r.data[0].b64_json);
  const { json } = await theCallWith(n, '/images/generations');
  assert.equal(json.style, 'natural');
  assert.equal(json.response_format, 'b64_json');
});

// ---------------------------------------------------------------------------- re-hosting

test('gpt-image-1 with response_format url returns an imagegate link to the same png', { skip }, async () => {
  const n = nonce();
  const prompt = `a quiet harbour ${n}`;
  const b64 = await client().images.generate({ model: 'gpt-image-1', prompt });
  const linked = await client().images.generate({ model: 'gpt-image-1', prompt, response_format: 'url' });
  assert.equal(linked.data[0].b64_json, undefined);
  const link = linked.data[0].url;
  assert.ok(link.includes('/images/files/') && !link.startsWith(FAKE_URL), link);
  const res = await fetch(link);
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('content-type'), 'image/png');
  const bytes = Buffer.from(await res.arrayBuffer());
  assert.deepEqual(bytes, Buffer.from(b64.data[0].b64_json, 'base64'), 'the upstream image, byte for byte');
  for (const call of await callsWith(n)) {
    assert.equal(call.json.response_format, undefined, 'GPT image models never see response_format');
  }
});

test('successful responses carry a request id', { skip }, async () => {
  const { data, request_id } = await client()
    .images.generate({ model: 'gpt-image-1', prompt: `a cube ${nonce()}` })
    .withResponse();
  assert.ok(data.data.length > 0);
  assert.ok(request_id, 'x-request-id missing from the success response');
});

test('the upstream sees the upstream key and never the tenant key', { skip }, async () => {
  const n = nonce();
  await client().images.generate({ model: 'gpt-image-1', prompt: `a green star ${n}` });
  assertUpstreamAuth(await theCallWith(n, '/images/generations'));
});

test('a second tenant key works and is not forwarded either', { skip }, async () => {
  const n = nonce();
  const r = await client(OTHER_KEY).images.generate({ model: 'gpt-image-1', prompt: `a yellow moon ${n}` });
  assertPngB64(r.data[0].b64_json);
  assertUpstreamAuth(await theCallWith(n, '/images/generations'));
});

test('all generation fields and an unknown extra field arrive unchanged', { skip }, async () => {
  const n = nonce();
  const sent = {
    model: 'gpt-image-1',
    prompt: `a purple hexagon ${n}`,
    n: 2,
    size: '1024x1536',
    quality: 'low',
    background: 'opaque',
    moderation: 'low',
    output_format: 'png',
    user: `user-${n}`,
    brand_new_param: 'x', // not in the SDK's types: JS passes it through as-is
  };
  const r = await client().images.generate(sent);
  assert.ok(r.data.length > 0);
  const { json } = await theCallWith(n, '/images/generations');
  for (const [key, value] of Object.entries(sent)) {
    assert.deepEqual(json[key], value, `${key}: sent ${JSON.stringify(value)}, upstream got ${JSON.stringify(json[key])}`);
  }
});

// ---------------------------------------------------------------------------- edits and variations

test('edit with one image sends one image part', { skip }, async () => {
  const n = nonce();
  const img = png(64, 64, [10, 20, 30, 255]);
  const r = await client().images.edit({
    model: 'gpt-image-1',
    image: await pngFile(img, 'one.png'),
    prompt: `make it pop ${n}`,
  });
  assertPngB64(r.data[0].b64_json);
  assert.ok(r.usage.total_tokens > 0);
  const call = await theCallWith(n, '/images/edits');
  assertUpstreamAuth(call);
  const parts = imageParts(call);
  assert.deepEqual(parts.map((p) => p.sha256), [sha256(img)]);
  assert.equal(parts[0].content_type, 'image/png');
  assert.equal(parts[0].len, img.length);
  const fields = textFields(call);
  assert.equal(fields.model, 'gpt-image-1');
  assert.equal(fields.prompt, `make it pop ${n}`);
});

test('edit with several images sends image brackets parts in order', { skip }, async () => {
  const n = nonce();
  const imgs = [0, 1, 2, 3].map((i) => png(32 + 8 * i, 32, [40 * i, 255 - 40 * i, 7, 255]));
  const files = await Promise.all(imgs.map((img, i) => pngFile(img, `in${i}.png`)));
  const r = await client().images.edit({ model: 'gpt-image-1', image: files, prompt: `combine these ${n}` });
  assertPngB64(r.data[0].b64_json);
  const parts = imageParts(await theCallWith(n, '/images/edits'));
  assert.deepEqual(
    parts.map((p) => p.sha256),
    imgs.map(sha256),
  );
  assert.deepEqual(
    parts.map((p) => p.name),
    imgs.map(() => 'image[]'),
  );
  assert.ok(parts.every((p) => p.content_type === 'image/png'));
});

test('edit with a mask sends the mask part', { skip }, async () => {
  const n = nonce();
  const img = png(64, 64, [200, 100, 50, 255]);
  const mask = png(64, 64, [0, 0, 0, 0]);
  const r = await client().images.edit({
    model: 'dall-e-2',
    image: await pngFile(img, 'base.png'),
    mask: await pngFile(mask, 'mask.png'),
    prompt: `fill the hole ${n}`,
    size: '256x256',
  });
  assert.ok(r.data[0].url);
  const call = await theCallWith(n, '/images/edits');
  const masks = fileParts(call).filter((p) => p.name === 'mask');
  assert.deepEqual(masks.map((p) => p.sha256), [sha256(mask)]);
  assert.deepEqual(imageParts(call).map((p) => p.sha256), [sha256(img)]);
});

test('variation with dall-e-2 and n 2 returns two urls', { skip }, async () => {
  const n = nonce();
  const img = png(64, 64, [1, 2, 3, 255]);
  const r = await client().images.createVariation({
    model: 'dall-e-2',
    image: await pngFile(img, 'var.png'),
    n: 2,
    size: '256x256',
    user: n,
  });
  assert.ok(Number.isInteger(r.created) && r.created > 0);
  assert.equal(r.data.length, 2);
  for (const d of r.data) assert.match(d.url, /^https?:\/\//);
  const call = await theCallWith(n, '/images/variations');
  assertUpstreamAuth(call);
  assert.deepEqual(imageParts(call).map((p) => p.sha256), [sha256(img)]);
  assert.equal(textFields(call).n, '2');
});

// ---------------------------------------------------------------------------- streaming

async function collect(stream) {
  const events = [];
  for await (const event of stream) events.push({ event, at: performance.now() });
  return events;
}

test('streamed generation yields two partials then completed with usage', { skip }, async () => {
  const n = nonce();
  const stream = await client().images.generate({
    model: 'gpt-image-1',
    prompt: `a streamed sunset ${n}`,
    stream: true,
    partial_images: 2,
  });
  const events = (await collect(stream)).map((e) => e.event);
  assert.deepEqual(
    events.map((e) => e.type),
    ['image_generation.partial_image', 'image_generation.partial_image', 'image_generation.completed'],
  );
  assert.deepEqual(
    events.slice(0, 2).map((e) => e.partial_image_index),
    [0, 1],
  );
  for (const e of events) assertPngB64(e.b64_json);
  assert.ok(events.at(-1).usage.total_tokens > 0);
  const { json } = await theCallWith(n, '/images/generations');
  assert.equal(json.stream, true);
  assert.equal(json.partial_images, 2);
});

test('streamed edit yields two partials then completed with usage', { skip }, async () => {
  const n = nonce();
  const stream = await client().images.edit({
    model: 'gpt-image-1',
    image: await pngFile(png(48, 48, [9, 9, 200, 255]), 's.png'),
    prompt: `a streamed edit ${n}`,
    stream: true,
    partial_images: 2,
  });
  const events = (await collect(stream)).map((e) => e.event);
  assert.deepEqual(
    events.map((e) => e.type),
    ['image_edit.partial_image', 'image_edit.partial_image', 'image_edit.completed'],
  );
  assert.deepEqual(
    events.slice(0, 2).map((e) => e.partial_image_index),
    [0, 1],
  );
  assertPngB64(events.at(-1).b64_json);
  assert.ok(events.at(-1).usage.total_tokens > 0);
  const fields = textFields(await theCallWith(n, '/images/edits'));
  assert.equal(fields.stream, 'true');
  assert.equal(fields.partial_images, '2');
});

test('streamed events are delivered as they happen, not buffered', { skip }, async () => {
  const stream = await client().images.generate({
    model: 'gpt-image-1',
    prompt: `slow stream #gap=400 ${nonce()}`,
    stream: true,
    partial_images: 2,
  });
  const arrivals = (await collect(stream)).map((e) => e.at);
  assert.equal(arrivals.length, 3);
  // The fake waits 400 ms between events: a buffering gateway delivers them all at once.
  assert.ok(arrivals.at(-1) - arrivals[0] >= 500, `arrivals (ms): ${arrivals}`);
});

// ---------------------------------------------------------------------------- errors

test('a bad key raises AuthenticationError and reaches no upstream', { skip }, async () => {
  const n = nonce();
  await rejectsWith(
    client('ig-not-a-real-key-0000').images.generate({ model: 'gpt-image-1', prompt: `nope ${n}` }),
    OpenAI.AuthenticationError,
    401,
  );
  assert.deepEqual(await callsWith(n), []);
});

test('an upstream 400 raises BadRequestError', { skip }, async () => {
  const err = await rejectsWith(
    client().images.generate({ model: 'dall-e-3', prompt: `#status=400 ${nonce()}` }),
    OpenAI.BadRequestError,
    400,
  );
  assert.equal(err.code, 'content_policy_violation');
});

test('an upstream 404 raises NotFoundError', { skip }, async () => {
  await rejectsWith(
    client().images.generate({ model: 'gpt-image-1', prompt: `#status=404 ${nonce()}` }),
    OpenAI.NotFoundError,
    404,
  );
});

test('an upstream 429 raises RateLimitError', { skip }, async () => {
  await rejectsWith(
    client().images.generate({ model: 'gpt-image-1', prompt: `#status=429 ${nonce()}` }),
    OpenAI.RateLimitError,
    429,
  );
});

test('an upstream 500 raises InternalServerError', { skip }, async () => {
  await rejectsWith(
    client().images.generate({ model: 'gpt-image-1', prompt: `#status=500 ${nonce()}` }),
    OpenAI.InternalServerError,
    500,
  );
});

test('an edit larger than the multipart limit raises a 413 APIError', { skip }, async () => {
  const n = nonce();
  // Incompressible, about 3.1 MB (the SDK run's limit is 2 MiB). The gateway must still answer 413 in a
  // way fetch/undici can read: closing the socket on an unread upload surfaces as APIConnectionError.
  const big = png(880, 880, undefined, { noise: true });
  assert.ok(big.length > 3_000_000);
  await rejectsWith(
    client().images.edit({ model: 'gpt-image-1', image: await pngFile(big, 'big.png'), prompt: `too big ${n}` }),
    OpenAI.APIError,
    413,
  );
  assert.deepEqual(await callsWith(n), []);
});
