// The load client in Node: the same stdin/stdout commands and answers as peers.py
// (connect, count, collect, failover, disconnect, exit), one JSON line each, for peers
// speaking tyrum-v1 over the `ws` package. A benchmark uses it when Node and `ws` are
// there (BENCH_CLIENT=node, the default then; BENCH_CLIENT=python forces peers.py): a
// Python client tops out near 35 000 frames/s per core here, below what the edges send in
// the fan-out, and the Socket.IO peer is driven by Node clients too.
//
//   node bench/peers.js        (started by bench code, never by hand; needs NODE_PATH or
//                               BENCH_NODE_MODULES pointing at a node_modules with `ws`)
"use strict";

const crypto = require("crypto");
const { EventEmitter } = require("events");
const net = require("net");
const path = require("path");
const readline = require("readline");

// BENCH_PEERS_WS=raw (the default): RawWebSocket below, over net.Socket; =ws: the `ws` package.
const IMPL = process.env.BENCH_PEERS_WS === "ws" ? "ws" : "raw";
const WebSocket = IMPL === "ws" ? require(path.join(process.env.BENCH_NODE_MODULES || "", "ws")) : null;
const OPEN = 1; // readyState, as in `ws`

const EVENT_PREFIX = '{"type":"event","stream":"';
const RESUMED_PREFIX = '{"type":"resumed"';
const OPEN_TIMEOUT_MS = 60000;
const MAX_FRAME_BYTES = 4 * 1024 * 1024;
const CLOSE_TIMEOUT_MS = 10000;
const CONNECT_ATTEMPTS = 4;

// Epoch seconds, like Python's time.time(): arrivals are compared with the senders' clocks.
const now = () => (performance.timeOrigin + performance.now()) / 1000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// Diagnosis (BENCH_PEERS_PROBE=1, set by bench/scale.py --probe): this process's own stalls,
// reported by `collect` with their epoch end times, to tell a late read here from a late write
// at the edge — its garbage collections ≥ 1 ms, and a 5 ms timer firing ≥ 2 ms late.
const PROBE = process.env.BENCH_PEERS_PROBE === "1";
const PROBE_TICK_MS = 5;
const PROBE_MAX = 20000; // entries kept between two collects
let probe = { gcs: [], stalls: [] };
function startProbe() {
  const { PerformanceObserver } = require("perf_hooks");
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      if (e.duration < 1 || probe.gcs.length >= PROBE_MAX) continue;
      const end = (performance.timeOrigin + e.startTime + e.duration) / 1000;
      probe.gcs.push([end, e.duration, e.detail ? e.detail.kind : e.kind]);
    }
  }).observe({ entryTypes: ["gc"] });
  let at = performance.now();
  const tick = () => {
    const t = performance.now();
    const late = t - at - PROBE_TICK_MS;
    if (late >= 2 && probe.stalls.length < PROBE_MAX) probe.stalls.push([now(), late]);
    at = t;
    setTimeout(tick, PROBE_TICK_MS);
  };
  setTimeout(tick, PROBE_TICK_MS);
}

const uniform = (lo, hi) => lo + Math.random() * (hi - lo);

// An event frame starts {"type":"event",… and everything up to its event id is ASCII
// (streams.event_frame: json.dumps escapes): parsed from the first HEAD_BYTES bytes as
// latin1, without decoding the payload.
const HEAD_BYTES = 256;
const isEvent = (buf) => buf[9] === 0x65 && buf[10] === 0x76 && buf[0] === 0x7b; // {"type":"ev
const latin1 = (buf, a, b) => (buf.latin1Slice ? buf.latin1Slice(a, b) : buf.toString("latin1", a, b));

function parseEvent(buf) {
  // [stream name, epoch, offset, event id]; the frame layout is fixed by streams.event_frame.
  // The event id is copied out of the buffer (a slice of the head string would keep the
  // whole head alive for as long as the arrival is kept).
  const raw = latin1(buf, 0, Math.min(buf.length, HEAD_BYTES));
  try {
    const s0 = EVENT_PREFIX.length;
    const s1 = raw.indexOf('"', s0);
    const e0 = raw.indexOf('"epoch":"', s1) + 9;
    const e1 = raw.indexOf('"', e0);
    const o0 = raw.indexOf('"offset":', e1) + 9;
    const o1 = raw.indexOf(",", o0);
    const i0 = raw.indexOf('"event_id":"', o1) + 12;
    const i1 = raw.indexOf('"', i0);
    if (s1 < 0 || e0 < 9 || o0 < 9 || i0 < 12 || i1 < 0) throw new Error("layout");
    return [raw.slice(s0, s1), raw.slice(e0, e1), parseInt(raw.slice(o0, o1), 10), latin1(buf, i0, i1)];
  } catch (_) {
    const f = JSON.parse(buf.toString());
    return [f.stream, f.epoch, f.offset, f.event.event_id];
  }
}

// A minimal RFC 6455 client for loopback load: no extensions, client frames masked, server
// frames parsed by hand from one read buffer shared by the whole pool (net's `onread`: no
// Buffer and no stream machinery per read; a frame is handed on as a view of that buffer and
// used synchronously — only a partial frame is copied). `ws` cost 6 – 8 µs of CPU per delivery
// in the fan-out, as much as the edges' ~3.5 µs per frame plus half again (0028).
const READ_BUFFER = Buffer.allocUnsafe(256 * 1024);
const WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const HEADER_END = Buffer.from("\r\n\r\n");

class RawWebSocket extends EventEmitter {
  // Events: "error" (err), "close" (code, reason); messages go to this.onmessage(buf) (a view
  // valid only during the call), without an emit per frame.
  constructor(url, protocol, headers, maxPayload) {
    super();
    const u = new URL(url);
    this.readyState = 0; // CONNECTING, OPEN, CLOSING, CLOSED as in `ws`
    this.maxPayload = maxPayload;
    this.onmessage = null;
    this.closeCode = 1006;
    this.closeReason = "";
    this.closeSent = false;
    this.head = null; // the upgrade response's bytes until its end
    this.rest = null; // a partial frame's bytes (a copy)
    this.need = 0; // bytes `rest` must reach before it is parsed again
    this.frags = null; // a fragmented message's payloads (copies)
    this.fragOp = 0;
    this.fragBytes = 0;
    this.key = crypto.randomBytes(16).toString("base64");
    const lines = [
      `GET ${u.pathname || "/"}${u.search} HTTP/1.1`,
      `Host: ${u.host}`,
      "Upgrade: websocket",
      "Connection: Upgrade",
      `Sec-WebSocket-Key: ${this.key}`,
      "Sec-WebSocket-Version: 13",
      `Sec-WebSocket-Protocol: ${protocol}`,
    ];
    for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`);
    this.sock = net.connect({
      host: u.hostname,
      port: Number(u.port || 80),
      noDelay: true,
      onread: { buffer: READ_BUFFER, callback: (n, buf) => this.read(buf, n) },
    });
    this.sock.on("connect", () => this.sock.write(lines.join("\r\n") + "\r\n\r\n", "latin1"));
    this.sock.on("error", (err) => {
      if (this.readyState !== 3) this.emit("error", err);
    });
    this.sock.on("close", () => this.finish());
  }

  finish() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.sock.destroy();
    this.emit("close", this.closeCode, this.closeReason);
  }

  fail(message, code) {
    // A protocol error: close with `code` (RFC 6455 §7.1.7), reported as an error first.
    if (this.readyState === 3) return;
    if (this.readyState === 1) this.sendClose(code);
    this.closeCode = code === undefined ? 1006 : code;
    this.emit("error", new Error(message));
    this.finish();
  }

  read(buf, n) {
    if (this.readyState === 3) return;
    if (this.readyState === 0) {
      this.head = this.head === null ? Buffer.from(buf.subarray(0, n)) : Buffer.concat([this.head, buf.subarray(0, n)]);
      const end = this.head.indexOf(HEADER_END);
      if (end < 0) {
        if (this.head.length > 16384) this.fail("upgrade response too long");
        return;
      }
      if (!this.upgraded(this.head.latin1Slice(0, end))) return;
      const left = this.head.subarray(end + 4);
      this.head = null;
      this.readyState = 1;
      if (left.length) this.parse(left, 0, left.length);
      return;
    }
    if (this.rest !== null) {
      const joined = Buffer.concat([this.rest, buf.subarray(0, n)]);
      if (joined.length < this.need) {
        this.rest = joined; // a large frame still arriving: wait for all of it
        return;
      }
      this.rest = null;
      this.parse(joined, 0, joined.length);
      return;
    }
    this.parse(buf, 0, n);
  }

  upgraded(text) {
    // The upgrade response: 101, the accept key, the subprotocol we offered.
    const lines = text.split("\r\n");
    const status = /^HTTP\/1\.1 (\d{3})/.exec(lines[0]);
    if (!status || status[1] !== "101") {
      this.fail(`Unexpected server response: ${status ? status[1] : "?"}`);
      return false;
    }
    const h = {};
    for (let i = 1; i < lines.length; i++) {
      const c = lines[i].indexOf(":");
      if (c > 0) h[lines[i].slice(0, c).trim().toLowerCase()] = lines[i].slice(c + 1).trim();
    }
    const accept = crypto.createHash("sha1").update(this.key + WS_GUID).digest("base64");
    if (h["sec-websocket-accept"] !== accept) {
      this.fail("Invalid Sec-WebSocket-Accept header");
      return false;
    }
    if (h["sec-websocket-protocol"] !== "tyrum-v1") {
      this.fail("Server sent no subprotocol");
      return false;
    }
    return true;
  }

  parse(buf, at, end) {
    while (at < end) {
      if (end - at < 2) return this.keep(buf, at, end, 2);
      const b0 = buf[at];
      const b1 = buf[at + 1];
      let len = b1 & 0x7f;
      let h = 2;
      if (len === 126) {
        if (end - at < 4) return this.keep(buf, at, end, 4);
        len = buf.readUInt16BE(at + 2);
        h = 4;
      } else if (len === 127) {
        if (end - at < 10) return this.keep(buf, at, end, 10);
        const hi = buf.readUInt32BE(at + 2);
        if (hi > 0x1fffff) return this.fail("frame too long", 1009);
        len = hi * 0x100000000 + buf.readUInt32BE(at + 6);
        h = 10;
      }
      if (b1 & 0x80) return this.fail("masked server frame", 1002);
      if (b0 & 0x70) return this.fail("reserved bits set", 1002);
      if (len > this.maxPayload) return this.fail("frame too long", 1009);
      if (end - at < h + len) return this.keep(buf, at, end, h + len);
      const p0 = at + h;
      at = p0 + len;
      this.frame(b0 & 0x80, b0 & 0x0f, buf, p0, at);
      if (this.readyState === 3) return;
    }
  }

  keep(buf, at, end, need) {
    // A partial frame: its bytes copied (the read buffer is reused) until `need` are there.
    this.rest = Buffer.from(buf.subarray(at, end));
    this.need = need;
  }

  frame(fin, op, buf, p0, p1) {
    if (op >= 8) {
      if (!fin || p1 - p0 > 125) return this.fail("bad control frame", 1002);
      if (op === 9) this.sendFrame(0x8a, buf.subarray(p0, p1)); // ping: the pong carries its payload
      else if (op === 8) this.closed(buf, p0, p1);
      else if (op !== 10) this.fail(`unknown opcode ${op}`, 1002);
      return;
    }
    if (op === 0) {
      if (this.frags === null) return this.fail("continuation without a start", 1002);
      this.fragBytes += p1 - p0;
      if (this.fragBytes > this.maxPayload) return this.fail("message too long", 1009);
      this.frags.push(Buffer.from(buf.subarray(p0, p1)));
      if (fin) {
        const msg = Buffer.concat(this.frags);
        this.frags = null;
        if (this.readyState === 1) this.onmessage(msg);
      }
      return;
    }
    if (op !== 1 && op !== 2) return this.fail(`unknown opcode ${op}`, 1002);
    if (this.frags !== null) return this.fail("new message inside a fragmented one", 1002);
    if (!fin) {
      this.frags = [Buffer.from(buf.subarray(p0, p1))];
      this.fragBytes = p1 - p0;
      return;
    }
    // After our close, frames still arriving are dropped (as `ws` does once closing).
    if (this.readyState === 1) this.onmessage(buf.subarray(p0, p1));
  }

  closed(buf, p0, p1) {
    // The server's close: its code surfaced (1005 when it gave none), answered once, then the
    // TCP connection ended (the server closes it first: RFC 6455 §7.1.1).
    this.closeCode = p1 - p0 >= 2 ? buf.readUInt16BE(p0) : 1005;
    this.closeReason = p1 - p0 > 2 ? buf.toString("utf8", p0 + 2, p1) : "";
    if (!this.closeSent) this.sendClose(p1 - p0 >= 2 ? this.closeCode : undefined);
    this.readyState = 2;
    this.sock.end();
  }

  sendFrame(b0, payload) {
    // One masked client frame (RFC 6455 §5.3); payloads here are small (ping, resume).
    if (this.sock.destroyed) return;
    const len = payload.length;
    const h = len < 126 ? 2 : len < 65536 ? 4 : 10;
    const out = Buffer.allocUnsafe(h + 4 + len);
    out[0] = b0;
    if (h === 2) out[1] = 0x80 | len;
    else if (h === 4) {
      out[1] = 0x80 | 126;
      out.writeUInt16BE(len, 2);
    } else {
      out[1] = 0x80 | 127;
      out.writeUInt32BE(Math.floor(len / 0x100000000), 2);
      out.writeUInt32BE(len >>> 0, 6);
    }
    crypto.randomFillSync(out, h, 4);
    for (let i = 0; i < len; i++) out[h + 4 + i] = payload[i] ^ out[h + (i & 3)];
    this.sock.write(out);
  }

  sendClose(code) {
    this.closeSent = true;
    let payload = Buffer.alloc(0);
    if (code !== undefined) {
      payload = Buffer.allocUnsafe(2);
      payload.writeUInt16BE(code, 0);
    }
    this.sendFrame(0x88, payload);
  }

  send(text) {
    if (this.readyState === 1) this.sendFrame(0x81, Buffer.from(text, "utf8"));
  }

  close(code = 1000) {
    // Ours first: the server answers with its close, then ends the connection.
    if (this.readyState >= 2) return;
    if (this.readyState === 0) return this.terminate();
    this.readyState = 2;
    this.sendClose(code);
  }

  terminate() {
    this.finish();
  }
}

class Peer {
  constructor(url, token) {
    this.url = url;
    this.token = token;
    this.ws = null;
    // Arrivals in order: the pool's index of each event id and its first-arrival time (epoch
    // seconds), in typed arrays. A Map of id -> time per peer held a string and an entry per
    // delivery on the heap: in a fan-out, a third of the load clients' time went to hashing,
    // growing and collecting them, and major collections stalled whole batches.
    this.idx = new Int32Array(256);
    this.times = new Float64Array(256);
    this.n = 0;
    // The indexes already seen, built only when a frame at or below the stream's last offset
    // comes (a replay after a failover): then kept up to date.
    this.seen = null;
    this.pos = new Map(); // stream name -> [epoch, last offset processed]
    this.dupes = 0;
    this.reordered = 0;
    this.droppedAt = 0;
    this.resumedAt = 0;
    this.resumed = null;
    // What a failed-over peer did after its last hello, for a peer that never resumes: when it
    // was greeted, how many streams it asked to resume (0: none known, it pinged instead),
    // how many frames came after, and the start of the last one that was not an event.
    this.helloAt = 0;
    this.resumeStreams = -1;
    this.framesAfterHello = 0;
    this.lastControl = "";
  }

  arrived(k, t) {
    if (this.n === this.idx.length) {
      const idx = new Int32Array(this.n * 2);
      idx.set(this.idx);
      this.idx = idx;
      const times = new Float64Array(this.n * 2);
      times.set(this.times);
      this.times = times;
    }
    this.idx[this.n] = k;
    this.times[this.n] = t;
    this.n += 1;
    if (this.seen !== null) this.seen.add(k);
  }

  has(k) {
    if (this.seen === null) this.seen = new Set(this.idx.subarray(0, this.n));
    return this.seen.has(k);
  }

  reset() {
    this.idx = new Int32Array(256);
    this.times = new Float64Array(256);
    this.n = 0;
    this.seen = null;
  }
}

class Pool {
  constructor() {
    this.peers = [];
    this.failoverUrls = [];
    this.failoverDelay = [0.5, 1.5];
    this.closing = false;
    this.reconnects = 0;
    this.reconnectFailures = 0;
    this.odd = [];
    // Event ids interned once per pool (a tenant-wide event reaches every peer of it): id ->
    // index, and index -> id for the collect.
    this.eventIndex = new Map();
    this.eventIds = [];
  }

  intern(eid) {
    let k = this.eventIndex.get(eid);
    if (k === undefined) {
      k = this.eventIds.length;
      this.eventIds.push(eid);
      this.eventIndex.set(eid, k);
    }
    return k;
  }

  open(peer, resume) {
    return new Promise((resolve, reject) => {
      const headers = { Authorization: `Bearer ${peer.token}` };
      const ws =
        IMPL === "ws"
          ? new WebSocket(peer.url, ["tyrum-v1"], {
              headers,
              perMessageDeflate: false,
              maxPayload: MAX_FRAME_BYTES,
              skipUTF8Validation: true, // a load client: the edges' frames are not what is tested here
              handshakeTimeout: OPEN_TIMEOUT_MS,
            })
          : new RawWebSocket(peer.url, "tyrum-v1", headers, MAX_FRAME_BYTES);
      let hello = false;
      const timer = setTimeout(() => {
        if (!hello) {
          ws.terminate();
          reject(new Error("no hello"));
        }
      }, OPEN_TIMEOUT_MS);
      ws.on("error", (err) => {
        if (!hello) {
          clearTimeout(timer);
          reject(err);
        }
      });
      ws.on("close", () => {
        if (!hello) {
          clearTimeout(timer);
          reject(new Error("closed before hello"));
        } else {
          this.closed(peer, ws);
        }
      });
      const message = (data) => {
        if (!hello) {
          hello = true;
          clearTimeout(timer);
          const h = JSON.parse(data.toString());
          peer.helloAt = now();
          peer.framesAfterHello = 0;
          peer.resumeStreams = resume ? peer.pos.size : -1;
          if (resume && peer.pos.size) {
            const streams = {};
            for (const [name, [epoch, offset]] of peer.pos) streams[name] = { epoch, offset };
            ws.send(JSON.stringify({ type: "resume", streams }));
          } else {
            peer.pos = new Map(Object.entries(h.streams).map(([n, s]) => [n, [s.epoch, s.offset]]));
            ws.send('{"type":"ping"}');
          }
          peer.ws = ws;
          resolve();
          return;
        }
        this.frame(peer, data);
      };
      if (IMPL === "ws") ws.on("message", message);
      else ws.onmessage = message;
    });
  }

  frame(peer, buf) {
    peer.framesAfterHello += 1;
    if (isEvent(buf)) {
      const t = now();
      const [name, epoch, offset, eid] = parseEvent(buf);
      const k = this.intern(eid);
      const pos = peer.pos.get(name);
      if (pos !== undefined && pos[0] === epoch) {
        if (offset <= pos[1]) {
          if (peer.has(k)) {
            peer.dupes += 1;
            return;
          }
          // A new event below what this peer processed (a late resume's replay): kept, counted.
          peer.reordered += 1;
          if (this.odd.length < 50) this.odd.push([name, epoch, offset, pos[1], eid, now()]);
          peer.arrived(k, t);
          return;
        }
        pos[1] = offset;
      } else {
        peer.pos.set(name, [epoch, offset]);
        // A stream (or epoch) new to this peer: its events may repeat ones already kept.
        if (peer.has(k)) return;
      }
      peer.arrived(k, t);
    } else {
      const raw = buf.toString();
      peer.lastControl = raw.slice(0, 160); // the server's control frames carry no credentials
      if (raw.startsWith(RESUMED_PREFIX)) {
        peer.resumedAt = now();
        peer.resumed = JSON.parse(raw).streams;
      }
    }
  }

  async closed(peer, ws) {
    if (peer.ws !== ws) return;
    peer.ws = null;
    if (this.closing || !this.failoverUrls.length) return;
    peer.droppedAt = now();
    await sleep(1000 * uniform(...this.failoverDelay));
    for (let attempt = 0; attempt < 20; attempt++) {
      // bounded: 20 tries over the failover edges
      if (this.closing) return;
      try {
        peer.url = this.failoverUrls[attempt % this.failoverUrls.length];
        await this.open(peer, true);
        this.reconnects += 1;
        return;
      } catch (_) {
        await sleep(200 * (attempt + 1));
      }
    }
    this.reconnectFailures += 1;
  }

  async connect(pairs, concurrency, budgetSecs) {
    const started = now();
    const errors = {};
    const doneAt = [];
    let skipped = 0;
    let retries = 0;
    let next = 0;
    const one = async (url, token) => {
      const peer = new Peer(url, token);
      for (let attempt = 0; attempt < CONNECT_ATTEMPTS; attempt++) {
        if (now() - started > budgetSecs) {
          skipped += 1;
          return;
        }
        try {
          await this.open(peer, false);
          doneAt.push(now() - started);
          this.peers.push(peer);
          return;
        } catch (err) {
          if (attempt + 1 === CONNECT_ATTEMPTS) {
            const key = (err && err.message ? `Error ${err.message}` : "Error").slice(0, 80);
            errors[key] = (errors[key] || 0) + 1;
            return;
          }
          retries += 1;
        }
        await sleep(1000 * uniform(0.5, 1.5) * (attempt + 1));
      }
    };
    const worker = async () => {
      while (next < pairs.length) {
        const [url, token] = pairs[next++];
        await one(url, token);
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, concurrency) }, worker));
    const failed = Object.values(errors).reduce((a, b) => a + b, 0);
    return {
      connected: doneAt.length,
      failed,
      skipped,
      retries,
      errors,
      secs: doneAt.length ? Math.max(...doneAt) : now() - started,
    };
  }

  count() {
    let received = 0;
    let resumed = 0;
    let dropped = 0;
    let open = 0;
    for (const p of this.peers) {
      received += p.n; // each event once: repeats are counted as dupes, not kept
      if (p.resumedAt) resumed += 1;
      if (p.droppedAt) dropped += 1;
      if (p.ws && p.ws.readyState === OPEN) open += 1;
    }
    return {
      received,
      resumed,
      dropped,
      open,
      reconnects: this.reconnects,
      reconnect_failures: this.reconnectFailures,
    };
  }

  collect(sent, byId) {
    const lat = [];
    const arrivals = {};
    let last = 0;
    let stray = 0;
    let dupes = 0;
    let reordered = 0;
    for (const p of this.peers) {
      const { idx, times, n } = p;
      const ids = this.eventIds;
      for (let i = 0; i < n; i++) {
        const eid = ids[idx[i]];
        const t = times[i];
        const t0 = sent[eid];
        if (t0 === undefined) {
          stray += 1;
          continue;
        }
        lat.push(Math.round((t - t0) * 1e6) / 1000);
        if (byId) arrivals[eid] = t;
        if (t > last) last = t;
      }
      p.reset();
      dupes += p.dupes;
      reordered += p.reordered;
      p.dupes = p.reordered = 0;
    }
    this.eventIndex = new Map();
    this.eventIds = [];
    const odd = this.odd;
    this.odd = [];
    const failovers = this.peers
      .filter((p) => p.droppedAt)
      .map((p) => ({
        dropped_at: p.droppedAt,
        resumed_at: p.resumedAt,
        resumed: p.resumed,
        // only for a peer that never resumed: what it did after its last hello
        ...(p.resumedAt
          ? {}
          : {
              url: p.url,
              open: p.ws !== null,
              hello_at: p.helloAt,
              resume_streams: p.resumeStreams,
              frames_after_hello: p.framesAfterHello,
              last_control: p.lastControl,
            }),
      }));
    const out = { latencies_ms: lat, arrivals, last_arrival: last, stray, dupes, reordered, failovers, odd };
    if (PROBE) {
      out.probe = probe;
      probe = { gcs: [], stalls: [] };
    }
    return out;
  }

  async disconnect() {
    this.closing = true;
    const closes = this.peers
      .filter((p) => p.ws)
      .map(
        (p) =>
          new Promise((resolve) => {
            const ws = p.ws;
            ws.once("close", resolve);
            ws.close();
          })
      );
    // All at once, bounded: a backlogged edge may never answer the close.
    await Promise.race([Promise.all(closes), sleep(CLOSE_TIMEOUT_MS)]);
    for (const p of this.peers) if (p.ws) p.ws.terminate();
    this.peers = [];
    this.closing = false;
    this.failoverUrls = [];
    this.reconnects = this.reconnectFailures = 0;
  }
}

async function main() {
  if (PROBE) startProbe();
  const pool = new Pool();
  const answer = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const msg = JSON.parse(line);
    if (msg.cmd === "connect") {
      answer(await pool.connect(msg.peers, Number(msg.concurrency || 50), Number(msg.budget || 600)));
    } else if (msg.cmd === "count") {
      answer(pool.count());
    } else if (msg.cmd === "collect") {
      answer(pool.collect(msg.sent, Boolean(msg.by_id)));
    } else if (msg.cmd === "failover") {
      pool.failoverUrls = msg.urls.slice();
      pool.failoverDelay = msg.delay || [0.5, 1.5];
      answer({ ok: true });
    } else if (msg.cmd === "disconnect") {
      await pool.disconnect();
      answer({ ok: true });
    } else if (msg.cmd === "exit") {
      await pool.disconnect();
      answer({ ok: true });
      break;
    }
  }
  process.exit(0);
}

main().catch((err) => {
  process.stderr.write(`peers.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
