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

const path = require("path");
const readline = require("readline");
const WebSocket = require(path.join(process.env.BENCH_NODE_MODULES || "", "ws"));

const EVENT_PREFIX = '{"type":"event","stream":"';
const RESUMED_PREFIX = '{"type":"resumed"';
const OPEN_TIMEOUT_MS = 60000;
const MAX_FRAME_BYTES = 4 * 1024 * 1024;
const CLOSE_TIMEOUT_MS = 10000;
const CONNECT_ATTEMPTS = 4;

// Epoch seconds, like Python's time.time(): arrivals are compared with the senders' clocks.
const now = () => (performance.timeOrigin + performance.now()) / 1000;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
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
      const ws = new WebSocket(peer.url, ["tyrum-v1"], {
        headers: { Authorization: `Bearer ${peer.token}` },
        perMessageDeflate: false,
        maxPayload: MAX_FRAME_BYTES,
        skipUTF8Validation: true, // a load client: the edges' frames are not what is tested here
        handshakeTimeout: OPEN_TIMEOUT_MS,
      });
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
      ws.on("message", (data) => {
        if (!hello) {
          hello = true;
          clearTimeout(timer);
          const h = JSON.parse(data.toString());
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
      });
    });
  }

  frame(peer, buf) {
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
      if (p.ws && p.ws.readyState === WebSocket.OPEN) open += 1;
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
      .map((p) => ({ dropped_at: p.droppedAt, resumed_at: p.resumedAt, resumed: p.resumed }));
    return { latencies_ms: lat, arrivals, last_arrival: last, stray, dupes, reordered, failovers, odd };
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
