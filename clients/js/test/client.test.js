// The client against a scripted fake edge: every frame sequence of docs/protocol.md.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  authSubprotocol,
  Backoff,
  ClientError,
  ConnectionFailed,
  DedupeCache,
  ProtocolViolation,
  Refused,
  Resync,
  storageState,
  TokenExpired,
  TokenRevoked,
  TyrumClient,
} from "../src/index.js";
import { FakeEdge, HEADS, Run } from "./fake_edge.js";

const TOKEN = "s3cret-token+/?";

function setup(options = {}) {
  const edge = new FakeEdge();
  const delays = [];
  const statuses = [];
  const client = new TyrumClient("ws://edge.test/ws", {
    token: TOKEN,
    WebSocket: edge.WebSocket,
    pingInterval: 0,
    random: () => 1,
    sleep: async (seconds) => {
      delays.push(seconds);
    },
    onStatus: (status) => statuses.push(status),
    ...options,
  });
  return { edge, client, delays, statuses };
}

async function live(edge, heads = HEADS) {
  const conn = await edge.nextConnection();
  await conn.accept();
  await conn.hello(heads);
  return conn;
}

test("authSubprotocol__unpadded_base64url", () => {
  // The same bytes as the Python SDK's auth_subprotocol (base64.urlsafe_b64encode, "=" stripped).
  assert.equal(authSubprotocol("s3cret-token+/?"), "tyrum-auth.czNjcmV0LXRva2VuKy8_");
  assert.equal(authSubprotocol("é"), "tyrum-auth.w6k");
});

test("constructor__url_with_credential_refused", () => {
  const edge = new FakeEdge();
  for (const name of ["token", "Access_Token", "jwt"]) {
    assert.throws(() => new TyrumClient(`ws://edge.test/ws?${name}=x`, { WebSocket: edge.WebSocket }), TypeError);
  }
  assert.throws(() => new TyrumClient("http://edge.test/ws", { WebSocket: edge.WebSocket }), TypeError);
  new TyrumClient("ws://edge.test/ws?tenant=acme", { WebSocket: edge.WebSocket });
});

test("events__live_in_order_with_fields_and_statuses", async () => {
  const { edge, client, statuses } = setup();
  const run = new Run(client);
  const conn = await edge.nextConnection();
  assert.deepEqual(conn.protocols, ["tyrum-v1", authSubprotocol(TOKEN)]);
  await conn.accept();
  await conn.hello({ ...HEADS, device: { epoch: "d1", offset: 7 } });
  await conn.event("device", "d1", 8, "e8", "run.updated", { run_id: "r1" });
  await conn.event("tenant", "t1", 1, "t-1");
  const items = await run.until(2);
  assert.deepEqual({ ...items[0] }, {
    stream: "device",
    epoch: "d1",
    offset: 8,
    eventId: "e8",
    type: "run.updated",
    occurredAt: "2026-11-26T20:00:00Z",
    payload: { run_id: "r1" },
    replayed: false,
  });
  assert.equal(items[1].eventId, "t-1");
  assert.equal(conn.sent.length, 0, "a fresh peer sends no resume");
  assert.deepEqual(client.state().device, { epoch: "d1", offset: 8 });
  client.close();
  assert.equal(await run.finish(), null);
  assert.deepEqual(statuses, ["connecting", "live", "closed"]);
  assert.equal(conn.closedByPeer, 1000);
});

test("events__reconnect_after_4001_resumes_and_marks_replay", async () => {
  const { edge, client, delays } = setup();
  const run = new Run(client);
  let conn = await live(edge);
  await conn.event("device", "d1", 1, "a1");
  await conn.event("device", "d1", 2, "a2");
  await run.until(2);
  await conn.close(4001);
  conn = await edge.nextConnection();
  await conn.accept();
  await conn.hello({ ...HEADS, device: { epoch: "d1", offset: 4 } });
  const resume = await conn.nextSent();
  assert.deepEqual(resume, {
    type: "resume",
    streams: {
      tenant: { epoch: "t1", offset: 0 },
      role: { epoch: "r1", offset: 0 },
      device: { epoch: "d1", offset: 2 },
    },
  });
  await conn.event("device", "d1", 2, "a2"); // a repeat: dropped
  await conn.event("device", "d1", 3, "a3");
  await conn.event("device", "d1", 4, "a4");
  await conn.send({ type: "resumed", streams: { device: { recovered: true, replayed: 2 } } });
  await conn.event("device", "d1", 5, "a5");
  const items = await run.until(5);
  assert.deepEqual(items.map((e) => [e.offset, e.replayed]), [[1, false], [2, false], [3, true], [4, true], [5, false]]);
  assert.equal(client.duplicates, 1);
  assert.equal(client.replayed, 2);
  assert.equal(client.reconnects, 1);
  assert.deepEqual(delays, [0.5], "one backoff wait, reset by the live session");
  client.close();
  await run.finish();
});

test("events__duplicate_event_id_across_streams_and_reconnects_dropped", async () => {
  const { edge, client } = setup();
  const run = new Run(client);
  let conn = await live(edge);
  await conn.event("tenant", "t1", 1, "same");
  await conn.event("tenant", "t1", 1, "same");
  await conn.close(1006);
  conn = await live(edge);
  await conn.event("tenant", "t1", 2, "same");
  await conn.event("tenant", "t1", 3, "other");
  const items = await run.until(2);
  assert.deepEqual(items.map((e) => e.eventId), ["same", "other"]);
  assert.equal(client.duplicates, 2);
  client.close();
  await run.finish();
});

test("events__below_hello_head_on_fresh_stream_dropped", async () => {
  // A fresh peer loads durable state after hello: offsets at or below the head are covered.
  const { edge, client } = setup();
  const run = new Run(client);
  const conn = await live(edge, { ...HEADS, tenant: { epoch: "t1", offset: 5 } });
  await conn.event("tenant", "t1", 5, "old");
  await conn.event("tenant", "t1", 6, "new");
  const items = await run.until(1);
  assert.deepEqual(items.map((e) => e.eventId), ["new"]);
  client.close();
  await run.finish();
});

test("events__late_replay_after_live_is_yielded", async () => {
  const { edge, client } = setup();
  const run = new Run(client);
  let conn = await live(edge);
  await conn.event("device", "d1", 1, "b1");
  await run.until(1);
  await conn.close(4001);
  conn = await edge.nextConnection();
  await conn.accept();
  await conn.hello({ ...HEADS, device: { epoch: "d1", offset: 3 } });
  await conn.event("device", "d1", 4, "b4"); // live first: the resume was late
  await conn.event("device", "d1", 2, "b2");
  await conn.event("device", "d1", 3, "b3");
  await conn.send({ type: "resumed", streams: { device: { recovered: true, replayed: 2 } } });
  const items = await run.until(4);
  assert.deepEqual(items.map((e) => e.eventId), ["b1", "b4", "b2", "b3"]);
  assert.deepEqual(client.state().device, { epoch: "d1", offset: 4 });
  client.close();
  await run.finish();
});

for (const reason of ["epoch_changed", "retention_exceeded", "offset_ahead", "unknown_stream"]) {
  test(`events__resumed_${reason}_becomes_resync`, async () => {
    const { edge, client } = setup();
    client.loadState({ device: { epoch: "old", offset: 9 } });
    const run = new Run(client);
    const conn = await edge.nextConnection();
    await conn.accept();
    await conn.hello({ ...HEADS, device: { epoch: "d2", offset: 3 } });
    assert.equal((await conn.nextSent()).type, "resume");
    await conn.send({ type: "resumed", streams: { device: { recovered: false, reason } } });
    await conn.event("device", "d2", 4, "live4");
    const items = await run.until(2);
    assert.ok(items[0] instanceof Resync);
    assert.deepEqual({ ...items[0] }, { stream: "device", reason });
    assert.equal(items[1].eventId, "live4");
    assert.deepEqual(client.state().device, { epoch: "d2", offset: 4 });
    client.close();
    await run.finish();
  });
}

test("events__stored_offset_ahead_of_head_reset_to_head", async () => {
  const { edge, client } = setup();
  client.loadState({ tenant: { epoch: "t1", offset: 50 } });
  const run = new Run(client);
  const conn = await live(edge, { ...HEADS, tenant: { epoch: "t1", offset: 10 } });
  await conn.nextSent();
  await conn.send({ type: "resumed", streams: { tenant: { recovered: false, reason: "offset_ahead" } } });
  await conn.event("tenant", "t1", 11, "t11");
  const items = await run.until(2);
  assert.equal(items[1].eventId, "t11", "live events past the head are not dropped");
  client.close();
  await run.finish();
});

test("events__4409_yields_resync_all_and_reconnects_without_resume", async () => {
  const { edge, client } = setup();
  const run = new Run(client);
  let conn = await live(edge);
  await conn.event("role", "r1", 1, "r-1");
  await conn.close(4409);
  const items = await run.until(2);
  assert.ok(items[1] instanceof Resync);
  assert.deepEqual({ ...items[1] }, { stream: null, reason: "resync_required" });
  conn = await live(edge, { ...HEADS, role: { epoch: "r2", offset: 4 } });
  await conn.event("role", "r2", 5, "r-5");
  await run.until(3);
  assert.equal(conn.sent.length, 0, "positions were dropped: nothing to resume");
  client.close();
  await run.finish();
});

const FATAL = [
  [4008, TokenRevoked],
  [4401, TokenExpired],
  [4400, ProtocolViolation],
  [4009, ProtocolViolation],
  [1009, ProtocolViolation],
];
for (const [code, ErrorClass] of FATAL) {
  test(`events__close_${code}_ends_with_${ErrorClass.name}`, async () => {
    const { edge, client, statuses } = setup();
    const run = new Run(client);
    const conn = await live(edge);
    await conn.close(code);
    const error = await run.finish();
    assert.ok(error instanceof ErrorClass, String(error));
    assert.ok(error instanceof ClientError);
    assert.equal(error.code, code);
    assert.ok(!error.message.includes(TOKEN) && !error.message.includes(authSubprotocol(TOKEN)));
    assert.equal(edge.connections.length, 1, "no reconnection");
    assert.equal(statuses.at(-1), "closed");
  });
}

test("events__4401_with_getToken_reconnects_with_fresh_token", async () => {
  const tokens = ["first", "second"];
  const { edge, client } = setup({ token: undefined, getToken: async () => tokens.shift() });
  const run = new Run(client);
  let conn = await live(edge);
  assert.deepEqual(conn.protocols, ["tyrum-v1", authSubprotocol("first")]);
  await conn.event("tenant", "t1", 1, "x1");
  await conn.close(4401);
  conn = await live(edge);
  assert.deepEqual(conn.protocols, ["tyrum-v1", authSubprotocol("second")]);
  assert.equal((await conn.nextSent()).type, "resume");
  await conn.event("tenant", "t1", 2, "x2");
  const items = await run.until(2);
  assert.deepEqual(items.map((e) => e.eventId), ["x1", "x2"]);
  assert.equal(run.error, null);
  client.close();
  await run.finish();
});

test("events__no_token_connects_with_the_session_cookie_alone", async () => {
  const { edge, client } = setup({ token: undefined });
  const run = new Run(client);
  const conn = await edge.nextConnection();
  assert.deepEqual(conn.protocols, ["tyrum-v1"]);
  client.close();
  await run.finish();
});

for (const code of [4013, 4029]) {
  test(`events__throttle_close_${code}_keeps_backing_off`, async () => {
    const { edge, client, delays } = setup();
    const run = new Run(client);
    for (let i = 0; i < 3; i++) {
      const conn = await live(edge);
      await conn.close(code);
    }
    await edge.nextConnection();
    assert.deepEqual(delays, [0.5, 1, 2], "the backoff doubles across throttled sessions");
    client.close();
    await run.finish();
  });
}

test("events__reconnect_backoff_resets_after_a_live_session", async () => {
  const { edge, client, delays } = setup();
  const run = new Run(client);
  for (let i = 0; i < 2; i++) {
    const conn = await edge.nextConnection();
    await conn.close(1006); // failed before open
  }
  let conn = await live(edge);
  await conn.close(4001);
  await edge.nextConnection();
  assert.deepEqual(delays, [0.5, 1, 0.5]);
  client.close();
  await run.finish();
});

test("events__full_jitter_draws_below_the_current_cap", () => {
  const draws = [0.25, 0.5, 0.99];
  const backoff = new Backoff(0.5, 1.5, () => draws.shift());
  assert.deepEqual([backoff.nextDelay(), backoff.nextDelay(), backoff.nextDelay()], [0.125, 0.5, 0.99 * 1.5]);
});

test("events__refused_403_ends_with_Refused", async () => {
  const { edge, client } = setup();
  const run = new Run(client);
  const conn = await edge.nextConnection();
  await conn.refuse(403);
  const error = await run.finish();
  assert.ok(error instanceof Refused, String(error));
  assert.ok(!error.message.includes(TOKEN));
});

for (const status of [429, 503]) {
  test(`events__refused_${status}_retries`, async () => {
    const { edge, client } = setup();
    const run = new Run(client);
    await (await edge.nextConnection()).refuse(status);
    await live(edge);
    assert.equal(run.error, null);
    client.close();
    await run.finish();
  });
}

test("events__max_attempts_ends_with_ConnectionFailed", async () => {
  const { edge, client } = setup({ maxAttempts: 2 });
  const run = new Run(client);
  await (await edge.nextConnection()).close(1006);
  await (await edge.nextConnection()).close(1006);
  const error = await run.finish();
  assert.ok(error instanceof ConnectionFailed, String(error));
});

test("events__wrong_subprotocol_is_a_protocol_violation", async () => {
  const { edge, client } = setup();
  const run = new Run(client);
  await (await edge.nextConnection()).accept("other");
  assert.ok((await run.finish()) instanceof ProtocolViolation);
});

test("events__malformed_and_unknown_frames_ignored", async () => {
  const { edge, client } = setup();
  const run = new Run(client);
  const conn = await live(edge);
  await conn.send("not json");
  await conn.send("[1, 2]");
  await conn.send({ type: "pong" });
  await conn.send({ type: "error", code: "unknown_type" });
  await conn.send({ type: "event", stream: "tenant" }); // no body
  await conn.send({ type: "future.frame" });
  await conn.event("tenant", "t1", 1, "ok");
  const items = await run.until(1);
  assert.equal(items[0].eventId, "ok");
  client.close();
  await run.finish();
});

test("events__keepalive_pings_while_connected", async () => {
  const { edge, client } = setup({ pingInterval: 0.02 });
  const run = new Run(client);
  const conn = await live(edge);
  assert.deepEqual(await conn.nextSent(), { type: "ping" });
  client.close();
  await run.finish();
});

test("state__storage_adapter_resumes_after_reload", async () => {
  const map = new Map();
  const storage = { getItem: (k) => map.get(k) ?? null, setItem: (k, v) => map.set(k, v), removeItem: (k) => map.delete(k) };
  const first = setup({ stateStore: storageState(storage) });
  const run = new Run(first.client);
  const conn = await live(first.edge);
  await conn.event("device", "d1", 1, "s1");
  await conn.event("device", "d1", 2, "s2");
  await run.until(2);
  first.client.close();
  await run.finish();
  assert.deepEqual(JSON.parse(map.get("tyrum-client-state")).device, { epoch: "d1", offset: 2 });
  // A page reload: a new client over the same storage resumes from offset 2.
  const second = setup({ stateStore: storageState(storage) });
  const run2 = new Run(second.client);
  const conn2 = await live(second.edge, { ...HEADS, device: { epoch: "d1", offset: 2 } });
  assert.deepEqual((await conn2.nextSent()).streams.device, { epoch: "d1", offset: 2 });
  second.client.close();
  await run2.finish();
});

test("state__loadState_validates", () => {
  const { client } = setup();
  assert.throws(() => client.loadState({ tenant: { epoch: "t", offset: -1 } }), RangeError);
  assert.throws(() => client.loadState([]), TypeError);
  client.loadState({ tenant: { epoch: "t", offset: 3 } });
  assert.deepEqual(client.state(), { tenant: { epoch: "t", offset: 3 } });
});

test("events__second_iteration_refused", async () => {
  const { client } = setup();
  const run = new Run(client);
  await assert.rejects(async () => {
    for await (const _ of client.events()) break;
  });
  client.close();
  await run.finish();
});

test("dedupe__bounded_lru", () => {
  const cache = new DedupeCache(2);
  assert.equal(cache.seen("a"), false);
  assert.equal(cache.seen("b"), false);
  assert.equal(cache.seen("a"), true); // a is now the most recent
  assert.equal(cache.seen("c"), false); // evicts b
  assert.equal(cache.seen("b"), false);
  assert.throws(() => new DedupeCache(0), RangeError);
});

test("client__token_not_in_its_json_or_inspect", async () => {
  const { client } = setup();
  const { inspect } = await import("node:util");
  assert.ok(!JSON.stringify(Object.keys(client)).includes(TOKEN));
  assert.ok(!inspect(client, { depth: 5 }).includes(TOKEN));
});

test("events__live_gap_is_yielded_and_position_advances", async () => {
  // The edge fills gaps itself (or closes with 4409); a client never drops what it is given.
  const { edge, client } = setup();
  const run = new Run(client);
  const conn = await live(edge);
  await conn.event("tenant", "t1", 1, "g1");
  await conn.event("tenant", "t1", 3, "g3");
  const items = await run.until(2);
  assert.deepEqual(items.map((e) => e.offset), [1, 3]);
  assert.deepEqual(client.state().tenant, { epoch: "t1", offset: 3 });
  client.close();
  await run.finish();
});

for (const code of [1000, 1001, 1011, 4001]) {
  test(`events__close_${code}_reconnects_and_resumes`, async () => {
    const { edge, client } = setup();
    const run = new Run(client);
    let conn = await live(edge);
    await conn.event("tenant", "t1", 1, "c1");
    await run.until(1);
    await conn.close(code);
    conn = await live(edge, { ...HEADS, tenant: { epoch: "t1", offset: 1 } });
    assert.deepEqual((await conn.nextSent()).streams.tenant, { epoch: "t1", offset: 1 });
    assert.equal(run.error, null);
    client.close();
    await run.finish();
  });
}

test("events__resume_errors_from_the_edge_leave_the_connection_live", async () => {
  const { edge, client } = setup();
  client.loadState({ tenant: { epoch: "t1", offset: 0 } });
  const run = new Run(client);
  const conn = await live(edge);
  await conn.nextSent();
  await conn.send({ type: "error", code: "invalid_resume" });
  await conn.send({ type: "error", code: "resume_not_first" });
  await conn.event("tenant", "t1", 1, "after-error");
  assert.equal((await run.until(1))[0].eventId, "after-error");
  client.close();
  await run.finish();
});

test("events__getToken_asked_again_after_a_failed_upgrade", async () => {
  let calls = 0;
  const { edge, client } = setup({ token: undefined, getToken: async () => `tok-${++calls}` });
  const run = new Run(client);
  await (await edge.nextConnection()).close(1006);
  const conn = await edge.nextConnection();
  assert.deepEqual(conn.protocols, ["tyrum-v1", authSubprotocol("tok-2")]);
  client.close();
  await run.finish();
});

test("package__exports_resolve_to_the_module", async () => {
  const byName = await import("tyrum-client");
  const byPath = await import("../src/index.js");
  assert.equal(byName.TyrumClient, byPath.TyrumClient);
  for (const name of ["TyrumClient", "Resync", "TokenRevoked", "TokenExpired", "ProtocolViolation", "Refused"]) {
    assert.equal(typeof byName[name], "function", name);
  }
});
