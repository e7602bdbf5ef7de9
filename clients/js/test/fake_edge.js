// A scripted fake edge: a WebSocket implementation whose connections a test drives frame by
// frame (docs/protocol.md), so every sequence is deterministic and no socket is opened.

const TICK = () => new Promise((resolve) => setTimeout(resolve, 0));

export class FakeConnection {
  constructor(socket) {
    this.socket = socket;
    this.url = socket.url;
    this.protocols = socket.protocols;
    this.sent = [];
    this._sentWaiters = [];
    this.closedByPeer = null;
  }

  /** Accept the upgrade with `protocol` (the edge answers exactly `tyrum-v1`). */
  async accept(protocol = "tyrum-v1") {
    this.socket.protocol = protocol;
    this.socket.readyState = 1;
    this.socket.onopen?.({});
    await TICK();
  }

  /** Refuse the upgrade (no WebSocket opened); `status` as a Node implementation reports it. */
  async refuse(status) {
    this.socket.readyState = 3;
    this.socket.onclose?.({ code: 1006, refusedStatus: status });
    await TICK();
  }

  async send(frame) {
    this.socket.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
    await TICK();
  }

  async hello(streams, extra = {}) {
    await this.send({ type: "hello", protocol: "tyrum-v1", connection_id: "c1", edge_id: "e1", streams, ...extra });
  }

  async event(stream, epoch, offset, eventId, type = "run.updated", payload = { n: offset }) {
    const event = { event_id: eventId, type, occurred_at: "2026-11-26T20:00:00Z", payload };
    await this.send({ type: "event", stream, epoch, offset, event });
  }

  /** The edge closes the connection with `code`. */
  async close(code) {
    if (this.socket.readyState === 3) return;
    this.socket.readyState = 3;
    this.socket.onclose?.({ code });
    await TICK();
  }

  /** The next frame the peer sent, parsed (bounded wait). */
  nextSent(timeoutMs = 2000) {
    if (this.sent.length > 0) return Promise.resolve(this.sent.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("the peer sent nothing")), timeoutMs);
      this._sentWaiters.push((frame) => {
        clearTimeout(timer);
        resolve(frame);
      });
    });
  }

  _received(data) {
    const frame = JSON.parse(data);
    const waiter = this._sentWaiters.shift();
    if (waiter) waiter(frame);
    else this.sent.push(frame);
  }
}

export class FakeEdge {
  constructor() {
    this.connections = [];
    this._pending = [];
    this._waiters = [];
    const edge = this;
    this.WebSocket = class FakeSocket {
      constructor(url, protocols) {
        this.url = url;
        this.protocols = protocols;
        this.protocol = "";
        this.readyState = 0;
        this.onopen = this.onmessage = this.onclose = this.onerror = null;
        const conn = new FakeConnection(this);
        this.conn = conn;
        edge.connections.push(conn);
        const waiter = edge._waiters.shift();
        if (waiter) waiter(conn);
        else edge._pending.push(conn);
      }
      send(data) {
        if (this.readyState !== 1) throw new Error("not open");
        this.conn._received(data);
      }
      close(code = 1000) {
        if (this.readyState === 3) return;
        this.conn.closedByPeer = code;
        this.readyState = 3;
        setTimeout(() => this.onclose?.({ code }), 0);
      }
    };
  }

  /** The next connection attempt the peer makes (bounded wait). */
  nextConnection(timeoutMs = 2000) {
    if (this._pending.length > 0) return Promise.resolve(this._pending.shift());
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("the peer did not connect")), timeoutMs);
      this._waiters.push((conn) => {
        clearTimeout(timer);
        resolve(conn);
      });
    });
  }
}

/** Iterate `client.events()` in the background, collecting items (or the error). */
export class Run {
  constructor(client) {
    this.items = [];
    this.error = null;
    this._waiters = [];
    this.done = (async () => {
      try {
        for await (const item of client.events()) {
          this.items.push(item);
          this._check();
        }
      } catch (error) {
        this.error = error;
      }
      this.finished = true;
      this._check();
    })();
  }

  _check() {
    this._waiters = this._waiters.filter(([n, resolve]) => {
      if (this.items.length >= n || this.finished) {
        resolve();
        return false;
      }
      return true;
    });
  }

  /** Wait until `n` items were yielded or the iteration ended (bounded). */
  async until(n, timeoutMs = 2000) {
    if (this.items.length < n && !this.finished) {
      await new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`only ${this.items.length} of ${n} items`)), timeoutMs);
        this._waiters.push([
          n,
          () => {
            clearTimeout(timer);
            resolve();
          },
        ]);
      });
    }
    return this.items.slice(0, n);
  }

  async finish(timeoutMs = 2000) {
    let timer;
    await Promise.race([
      this.done,
      new Promise((_, reject) => (timer = setTimeout(() => reject(new Error("iteration did not end")), timeoutMs))),
    ]);
    clearTimeout(timer);
    return this.error;
  }
}

export const HEADS = {
  tenant: { epoch: "t1", offset: 0 },
  role: { epoch: "r1", offset: 0 },
  device: { epoch: "d1", offset: 0 },
};
