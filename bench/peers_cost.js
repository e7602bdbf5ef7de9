// The load client's CPU per delivery alone: a scripted server on 127.0.0.1 writes one
// event frame (the size of a fan-out's) per batch to each of --peers sockets of one
// peers.js process, --batches times at --rate batches/s; the client's CPU (its /proc stat)
// from the first batch until its count is complete, divided by the deliveries. Each
// BENCH_PEERS_WS variant (`raw`, `ws`) in turn, --rounds times, alternated. Linux only.
//
//   node bench/peers_cost.js [--peers 500] [--batches 300] [--rate 100] [--rounds 2]
//   (the `ws` variant needs BENCH_NODE_MODULES, as peers.js does; without it: raw only)
// Prints a table with the machine it ran on and writes bench/results/peers_cost.json.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const net = require("net");
const os = require("os");
const path = require("path");
const readline = require("readline");
const { spawn } = require("child_process");

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
};
const PEERS = arg("peers", 500);
const BATCHES = arg("batches", 300);
const RATE = arg("rate", 100);
const ROUNDS = arg("rounds", 2);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const TICK = Number(require("child_process").execSync("getconf CLK_TCK").toString());

function cpuSecs(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, "latin1");
  const rest = f.slice(f.lastIndexOf(")") + 2).split(" ");
  return (Number(rest[11]) + Number(rest[12])) / TICK; // utime, stime
}

function frame(payload) {
  const len = payload.length;
  const h = len < 126 ? 2 : 4;
  const out = Buffer.alloc(h + len);
  out[0] = 0x81;
  if (h === 2) out[1] = len;
  else {
    out[1] = 126;
    out.writeUInt16BE(len, 2);
  }
  payload.copy(out, h);
  return out;
}
const event = (offset) =>
  frame(
    Buffer.from(
      `{"type":"event","stream":"tenant","epoch":"9f1c2a7e","offset":${offset},"event":{"event_id":` +
        `"${crypto.randomUUID()}","type":"bench.fanout","occurred_at":"2026-12-05T04:00:00.000000Z",` +
        `"payload":{"seq":${offset},"sent_at":1780000000.123456,"pad":"${"x".repeat(120)}"}}}`
    )
  );

async function run(impl) {
  const socks = [];
  const server = net.createServer((sock) => {
    sock.setNoDelay(true);
    let head = Buffer.alloc(0);
    const onData = (d) => {
      head = Buffer.concat([head, d]);
      const end = head.indexOf("\r\n\r\n");
      if (end < 0) return;
      sock.removeListener("data", onData);
      sock.on("data", () => {}); // the peer's ping: read and dropped
      const key = /sec-websocket-key: *(\S+)/i.exec(head.toString("latin1", 0, end))[1];
      const accept = crypto.createHash("sha1").update(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest("base64");
      sock.write(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
          `Sec-WebSocket-Accept: ${accept}\r\nSec-WebSocket-Protocol: tyrum-v1\r\n\r\n`
      );
      sock.write(frame(Buffer.from('{"type":"hello","streams":{"tenant":{"epoch":"9f1c2a7e","offset":0}}}')));
      socks.push(sock);
    };
    sock.on("data", onData);
    sock.on("error", () => {});
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const child = spawn(process.execPath, [path.join(__dirname, "peers.js")], {
    stdio: ["pipe", "pipe", "inherit"],
    env: { ...process.env, BENCH_PEERS_WS: impl },
  });
  const queue = [];
  readline.createInterface({ input: child.stdout }).on("line", (l) => queue.push(JSON.parse(l)));
  const ask = async (obj) => {
    child.stdin.write(JSON.stringify(obj) + "\n");
    while (!queue.length) await sleep(5);
    return queue.shift();
  };
  const url = `ws://127.0.0.1:${server.address().port}/ws`;
  const c = await ask({ cmd: "connect", peers: Array.from({ length: PEERS }, (_, i) => [url, `t${i}`]), concurrency: 50 });
  if (c.connected !== PEERS) throw new Error(`connected ${JSON.stringify(c)}`);
  await sleep(300);
  const cpu0 = cpuSecs(child.pid);
  const t0 = performance.now();
  for (let b = 1; b <= BATCHES; b++) {
    const f = event(b);
    for (const s of socks) s.write(f);
    const due = t0 + (b * 1000) / RATE;
    const wait = due - performance.now();
    if (wait > 0) await sleep(wait);
  }
  let received = 0;
  for (let i = 0; i < 2000 && received < PEERS * BATCHES; i++) {
    received = (await ask({ cmd: "count" })).received;
    if (received < PEERS * BATCHES) await sleep(10);
  }
  const cpu = cpuSecs(child.pid) - cpu0;
  await ask({ cmd: "exit" });
  server.close();
  for (const s of socks) s.destroy();
  return { impl, deliveries: received, expected: PEERS * BATCHES, cpu_s: cpu, us_per_delivery: (cpu * 1e6) / received };
}

// The machine, as bench/common.py's machine() states it for the Python benchmarks.
function machine() {
  const cpus = os.cpus();
  return {
    cpu: cpus.length ? cpus[0].model : "",
    cores: cpus.length,
    mem_gib: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    kernel: os.release(),
    loadavg: os.loadavg(),
    versions: { node: process.versions.node },
  };
}

async function main() {
  const impls = process.env.BENCH_NODE_MODULES ? ["ws", "raw"] : ["raw"];
  const rows = [];
  for (let r = 0; r < ROUNDS; r++) for (const impl of impls) rows.push(await run(impl));
  const m = machine();
  const results = path.join(__dirname, "results");
  fs.mkdirSync(results, { recursive: true });
  const out = path.join(results, "peers_cost.json");
  const when = new Date().toISOString().replace(/\.\d+Z$/, "Z");
  const settings = { peers: PEERS, batches: BATCHES, rate: RATE, rounds: ROUNDS };
  fs.writeFileSync(out, JSON.stringify({ benchmark: "peers_cost", when, machine: m, settings, rows }, null, 2));
  process.stdout.write(
    `machine: ${m.cpu} × ${m.cores} cores, ${m.mem_gib} GiB; Node ${m.versions.node}; ` +
      `load average ${m.loadavg[0].toFixed(2)}\n`
  );
  process.stdout.write(`peers.js CPU per delivery: ${PEERS} peers, ${BATCHES} batches at ${RATE}/s, one event each\n`);
  process.stdout.write("impl  deliveries  expected  cpu_s  us_per_delivery\n");
  for (const x of rows)
    process.stdout.write(
      `${x.impl.padEnd(4)}  ${String(x.deliveries).padStart(10)}  ${String(x.expected).padStart(8)}  ${x.cpu_s.toFixed(2).padStart(5)}  ${x.us_per_delivery.toFixed(2).padStart(15)}\n`
    );
  process.stdout.write(`results: ${path.relative(process.cwd(), out) || out}\n`);
}

main().catch((err) => {
  process.stderr.write(`${err.stack}\n`);
  process.exit(1);
});
