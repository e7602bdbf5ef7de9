// Self-check of bench/peers.js against a scripted tyrum-v1 server on 127.0.0.1: the counts
// stay exact whatever the framing (a hello in fragments, frames split across TCP reads,
// 16- and 64-bit lengths, a fragmented event with a ping between its fragments, 50 frames in
// one read, a repeat, a 4001 close, the failover's resume and its replays), pings are
// answered with their payload, client frames are masked, close codes are echoed.
//
//   node bench/peers_selfcheck.js     (BENCH_PEERS_WS=ws checks the `ws` variant; exit 0 = ok)
"use strict";

const crypto = require("crypto");
const net = require("net");
const path = require("path");
const readline = require("readline");
const { spawn } = require("child_process");

const PEERS = 2;
const EPOCH = "E1";
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const problems = [];
const check = (ok, what) => {
  if (!ok) problems.push(what);
};

function frame(op, payload, fin = true) {
  const len = payload.length;
  const h = len < 126 ? 2 : len < 65536 ? 4 : 10;
  const out = Buffer.alloc(h + len);
  out[0] = (fin ? 0x80 : 0) | op;
  if (h === 2) out[1] = len;
  else if (h === 4) {
    out[1] = 126;
    out.writeUInt16BE(len, 2);
  } else {
    out[1] = 127;
    out.writeUInt32BE(0, 2);
    out.writeUInt32BE(len, 6);
  }
  payload.copy(out, h);
  return out;
}
const text = (s) => frame(1, Buffer.from(s));
const closeFrame = (code) => {
  const p = Buffer.alloc(2);
  p.writeUInt16BE(code, 0);
  return frame(8, p);
};
const eventId = (offset) => `ev-${String(offset).padStart(4, "0")}`;
const event = (offset, pad = 0) =>
  text(
    `{"type":"event","stream":"tenant","epoch":"${EPOCH}","offset":${offset},` +
      `"event":{"event_id":"${eventId(offset)}","type":"t","payload":{"pad":"${"x".repeat(pad)}"}}}`
  );
const hello = () =>
  Buffer.from(`{"type":"hello","protocol":"tyrum-v1","streams":{"tenant":{"epoch":"${EPOCH}","offset":0}}}`);

// One connection's state on the server side: client frames read (and unmasked) as they come.
class Conn {
  constructor(sock, onUpgrade) {
    this.sock = sock;
    this.buf = Buffer.alloc(0);
    this.upgraded = false;
    this.waiters = [];
    this.frames = [];
    this.unmasked = 0;
    sock.on("data", (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      if (!this.upgraded) {
        const end = this.buf.indexOf("\r\n\r\n");
        if (end < 0) return;
        const head = this.buf.toString("latin1", 0, end);
        this.buf = this.buf.subarray(end + 4);
        this.upgraded = true;
        onUpgrade(this, head);
      }
      this.parse();
    });
    sock.on("error", () => {});
  }

  parse() {
    while (this.buf.length >= 2) {
      const b1 = this.buf[1];
      let len = b1 & 0x7f;
      let h = 2;
      if (len === 126) {
        if (this.buf.length < 4) return;
        len = this.buf.readUInt16BE(2);
        h = 4;
      }
      if (!(b1 & 0x80)) this.unmasked += 1;
      const mh = b1 & 0x80 ? 4 : 0;
      if (this.buf.length < h + mh + len) return;
      const payload = Buffer.from(this.buf.subarray(h + mh, h + mh + len));
      if (mh) for (let i = 0; i < len; i++) payload[i] ^= this.buf[h + (i & 3)];
      this.frames.push({ op: this.buf[0] & 0x0f, payload });
      this.buf = this.buf.subarray(h + mh + len);
    }
    this.wake();
  }

  wake() {
    const waiters = this.waiters;
    this.waiters = [];
    for (const w of waiters) w();
  }

  async next(op) {
    // The next client frame of opcode `op` (others kept), bounded in time.
    const deadline = Date.now() + 5000;
    for (;;) {
      const i = this.frames.findIndex((f) => f.op === op);
      if (i >= 0) return this.frames.splice(i, 1)[0].payload;
      if (Date.now() > deadline) throw new Error(`no frame of opcode ${op}`);
      await Promise.race([new Promise((r) => this.waiters.push(r)), sleep(100)]);
    }
  }

  async pieces(buf, cuts) {
    // `buf` written in pieces cut at `cuts`, with a pause between: separate TCP reads.
    let at = 0;
    for (const c of [...cuts, buf.length]) {
      this.sock.write(buf.subarray(at, c));
      at = c;
      await sleep(15);
    }
  }
}

async function firstConnection(c) {
  // The hello in two fragments, then the scripted events.
  const h = hello();
  c.sock.write(Buffer.concat([frame(1, h.subarray(0, 20), false), frame(0, h.subarray(20))]));
  check((await c.next(1)).toString() === '{"type":"ping"}', "the peer's first frame is its ping");
  c.sock.write(Buffer.concat([event(1), event(2)]));
  await c.pieces(event(3), [1, 3, 30]); // split inside the header and inside the payload
  await c.pieces(Buffer.concat([event(4), event(5)]), [event(4).length + 1]);
  c.sock.write(event(6, 300)); // 16-bit length
  await c.pieces(event(7, 70000), [5, 9000, 40000]); // 64-bit length, split
  c.sock.write(frame(9, Buffer.from("p1")));
  check((await c.next(10)).toString() === "p1", "the pong carries the ping's payload");
  const e8 = event(8).subarray(2); // payload of a short frame (header is 2 bytes)
  c.sock.write(frame(1, e8.subarray(0, 10), false));
  c.sock.write(frame(9, Buffer.from("p2"))); // a control frame between fragments
  await c.pieces(Buffer.concat([frame(0, e8.subarray(10, 40), false), frame(0, e8.subarray(40))]), [3]);
  check((await c.next(10)).toString() === "p2", "the pong between fragments");
  c.sock.write(event(3)); // a repeat
  const batch = [];
  for (let o = 9; o <= 58; o++) batch.push(event(o));
  c.sock.write(Buffer.concat(batch));
  await sleep(100);
  c.sock.write(closeFrame(4001));
  const echoed = await c.next(8);
  check(echoed.length >= 2 && echoed.readUInt16BE(0) === 4001, "the close code is echoed");
  c.sock.end();
}

async function secondConnection(c) {
  // The failover: hello, the peer's resume, resumed, replays of 57 and 58, then 59.
  c.sock.write(frame(1, hello()));
  const resume = JSON.parse((await c.next(1)).toString());
  check(
    resume.type === "resume" && resume.streams.tenant.epoch === EPOCH && resume.streams.tenant.offset === 58,
    `the resume names the last offset (${JSON.stringify(resume)})`
  );
  c.sock.write(frame(1, Buffer.from('{"type":"resumed","streams":{"tenant":{"epoch":"E1","from":59}}}')));
  c.sock.write(Buffer.concat([event(57), event(58), event(59)]));
  const close = await c.next(8); // the disconnect: the peer's close, answered
  check(close.length === 0 || close.readUInt16BE(0) === 1000, "the disconnect closes normally"); // `ws`: no code
  c.sock.end(closeFrame(1000));
}

async function main() {
  const done = [];
  const server = net.createServer((sock) => {
    new Conn(sock, (c, head) => {
      const lines = head.split("\r\n");
      const h = {};
      for (const l of lines.slice(1)) {
        const i = l.indexOf(":");
        h[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
      }
      check(/^Bearer tok-\d$/.test(h.authorization || ""), "the token as a bearer header");
      check((h["sec-websocket-protocol"] || "").split(/, */).includes("tyrum-v1"), "tyrum-v1 offered");
      const accept = crypto
        .createHash("sha1")
        .update(h["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
        .digest("base64");
      sock.write(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
          `Sec-WebSocket-Accept: ${accept}\r\nSec-WebSocket-Protocol: tyrum-v1\r\n\r\n`
      );
      const run = lines[0].startsWith("GET /ws2") ? secondConnection(c) : firstConnection(c);
      done.push(
        run
          .catch((err) => check(false, `server: ${err.message}`))
          .then(() => check(c.unmasked === 0, "every client frame is masked"))
      );
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const port = server.address().port;

  const child = spawn(process.execPath, [path.join(__dirname, "peers.js")], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  const answers = readline.createInterface({ input: child.stdout });
  const queue = [];
  answers.on("line", (l) => queue.push(JSON.parse(l)));
  const ask = async (obj) => {
    child.stdin.write(JSON.stringify(obj) + "\n");
    const deadline = Date.now() + 20000;
    while (!queue.length) {
      if (Date.now() > deadline) throw new Error(`no answer to ${obj.cmd}`);
      await sleep(10);
    }
    return queue.shift();
  };

  const url = `ws://127.0.0.1:${port}/ws`;
  const pairs = Array.from({ length: PEERS }, (_, i) => [url, `tok-${i}`]);
  await ask({ cmd: "failover", urls: [`ws://127.0.0.1:${port}/ws2`], delay: [0, 0.01] });
  const connected = await ask({ cmd: "connect", peers: pairs, concurrency: PEERS });
  check(connected.connected === PEERS, `connected ${JSON.stringify(connected)}`);
  let count;
  for (let i = 0; i < 100; i++) {
    count = await ask({ cmd: "count" });
    if (count.received >= 59 * PEERS && count.reconnects === PEERS) break;
    await sleep(50);
  }
  await sleep(200); // anything extra would show up now
  count = await ask({ cmd: "count" });
  check(count.received === 59 * PEERS, `received ${count.received}, expected ${59 * PEERS}`);
  check(count.reconnects === PEERS && count.dropped === PEERS && count.resumed === PEERS, `count ${JSON.stringify(count)}`);
  check(count.open === PEERS, `open ${count.open}`);
  const sent = {};
  const t0 = Date.now() / 1000 - 1;
  for (let o = 1; o <= 59; o++) sent[eventId(o)] = t0;
  const got = await ask({ cmd: "collect", sent, by_id: true });
  check(got.latencies_ms.length === 59 * PEERS, `latencies ${got.latencies_ms.length}`);
  check(Object.keys(got.arrivals).length === 59, "every event arrived");
  check(got.stray === 0 && got.reordered === 0, `stray ${got.stray}, reordered ${got.reordered}`);
  check(got.dupes === 3 * PEERS, `dupes ${got.dupes}, expected ${3 * PEERS}`);
  await ask({ cmd: "disconnect" });
  await Promise.all(done);
  await ask({ cmd: "exit" });
  server.close();
  if (problems.length) {
    process.stdout.write(`peers.js self-check FAILED:\n- ${problems.join("\n- ")}\n`);
    process.exit(1);
  }
  process.stdout.write(`peers.js self-check ok (${process.env.BENCH_PEERS_WS || "raw"})\n`);
  process.exit(0);
}

main().catch((err) => {
  process.stdout.write(`peers.js self-check FAILED: ${err.stack}\n`);
  process.exit(1);
});
