// JavaScript peer SDK for the Tyrum backplane (wire protocol `tyrum-v1`, docs/protocol.md).
// It mirrors the Python SDK (backplane/client.py): per-stream resume from the last offset it
// yielded, dedupe by event id, Resync items, full-jitter backoff. No runtime dependencies: it
// uses the platform's WebSocket (browsers, Node with a global WebSocket) or the one passed in.
// It never logs, and never puts a token into an error message.
// One file on purpose: the edges serve it as a static file, where hashed names (manifest storage)
// would break relative imports between modules.

export const PROTOCOL = "tyrum-v1";
export const AUTH_SUBPROTOCOL_PREFIX = "tyrum-auth.";
// The server's list (protocol.URL_CREDENTIAL_PARAMS): such a URL is refused whatever it carries.
export const CREDENTIAL_PARAMS = ["token", "access_token", "auth", "authorization", "api_key", "jwt"];

export const Close = Object.freeze({
  NORMAL: 1000,
  ABNORMAL: 1006,
  MESSAGE_TOO_BIG: 1009,
  RECONNECT: 4001,
  POLICY: 4008,
  FRAME_TOO_LARGE: 4009,
  SLOW_CONSUMER: 4013,
  RATE_LIMITED: 4029,
  MALFORMED_FRAME: 4400,
  TOKEN_EXPIRED: 4401,
  RESYNC: 4409,
});
// The server asked us to slow down: a session ending with these does not reset the backoff.
const THROTTLE_CLOSES = new Set([Close.SLOW_CONSUMER, Close.RATE_LIMITED]);

export class ClientError extends Error {
  constructor(message, code = null) {
    super(message);
    this.name = new.target.name;
    this.code = code;
  }
}
/** `maxAttempts` consecutive connection attempts failed. */
export class ConnectionFailed extends ClientError {}
/** The edge refused the upgrade (HTTP 403 or another final 4xx; browsers cannot tell which). */
export class Refused extends ClientError {}
/** Close 4008: token revoked, tenant deactivated, or the operator's session ended. */
export class TokenRevoked extends ClientError {}
/** Close 4401 with no `getToken` to refresh it (or a fresh token that expired again at once). */
export class TokenExpired extends ClientError {}
/** Close 4400/4009/1009, or the edge does not speak `tyrum-v1`. */
export class ProtocolViolation extends ClientError {}
/** `ping()` while no connection is open. */
export class NotConnected extends ClientError {}

const FATAL_CLOSES = new Map([
  [Close.POLICY, TokenRevoked],
  [Close.TOKEN_EXPIRED, TokenExpired],
  [Close.MALFORMED_FRAME, ProtocolViolation],
  [Close.FRAME_TOO_LARGE, ProtocolViolation],
  [Close.MESSAGE_TOO_BIG, ProtocolViolation],
]);

/** Tell the caller to refetch durable state for `stream` (`null`: every stream). */
export class Resync {
  constructor(stream, reason) {
    this.stream = stream;
    this.reason = reason;
    Object.freeze(this);
  }
}

/** The most recent `capacity` event ids, least recently seen evicted first. */
export class DedupeCache {
  constructor(capacity) {
    if (!(capacity >= 1)) throw new RangeError("dedupe capacity must be at least 1");
    this.capacity = capacity;
    this._ids = new Map();
  }
  /** Record `eventId`; return true if it was already remembered. */
  seen(eventId) {
    if (this._ids.has(eventId)) {
      this._ids.delete(eventId);
      this._ids.set(eventId, true);
      return true;
    }
    this._ids.set(eventId, true);
    if (this._ids.size > this.capacity) this._ids.delete(this._ids.keys().next().value);
    return false;
  }
}

/** Full-jitter exponential backoff: wait uniform(0, current), then double up to a cap. */
export class Backoff {
  constructor(initial, maximum, random = Math.random) {
    this.initial = initial;
    this.maximum = maximum;
    this.current = initial;
    this._random = random;
  }
  nextDelay() {
    const delay = this._random() * this.current;
    this.current = Math.min(this.current * 2, this.maximum);
    return delay;
  }
  reset() {
    this.current = this.initial;
  }
}

/** `tyrum-auth.<token as unpadded base64url>` (RFC 4648 §5). */
export function authSubprotocol(token) {
  const bytes = new TextEncoder().encode(token);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  const b64 = btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return AUTH_SUBPROTOCOL_PREFIX + b64;
}

/** Parse `{name: {epoch: string, offset: integer >= 0}}` into a Map of [epoch, offset]. */
export function parsePositions(raw) {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) {
    throw new TypeError("stream positions must be an object");
  }
  const positions = new Map();
  for (const [name, value] of Object.entries(raw)) {
    const epoch = value && typeof value === "object" ? value.epoch : undefined;
    const offset = value && typeof value === "object" ? value.offset : undefined;
    if (typeof epoch !== "string" || !Number.isInteger(offset) || offset < 0) {
      throw new RangeError(`invalid position for stream ${JSON.stringify(name)}`);
    }
    positions.set(name, [epoch, offset]);
  }
  return positions;
}

/** A state adapter over a Web Storage object (`localStorage`, `sessionStorage`). */
export function storageState(storage, key = "tyrum-client-state") {
  return {
    load() {
      const raw = storage.getItem(key);
      return raw ? JSON.parse(raw) : null;
    },
    save(state) {
      storage.setItem(key, JSON.stringify(state));
    },
    clear() {
      storage.removeItem(key);
    },
  };
}

function checkUrl(url) {
  const parsed = new URL(url, globalThis.location?.href);
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
    throw new TypeError("the URL must be ws: or wss:");
  }
  for (const key of parsed.searchParams.keys()) {
    if (CREDENTIAL_PARAMS.includes(key.toLowerCase())) {
      throw new TypeError("the URL must not carry a credential; pass { token } instead");
    }
  }
  return parsed.href;
}

/** A `tyrum-v1` peer: one connection at a time, per-stream resume, deduplicated events. */
export class TyrumClient {
  /**
   * @param {string} url `ws(s)://host/ws` (relative URLs resolve against the page)
   * @param {object} [options] see index.d.ts
   */
  constructor(url, options = {}) {
    this._url = checkUrl(url);
    const token = options.token ?? null;
    this._getToken = options.getToken ?? null;
    // A closure keeps the token out of the object's enumerable state (and out of dumps).
    let current = token;
    this._tokenBox = { get: () => current, set: (t) => (current = t) };
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    }
    this._dedupe = new DedupeCache(options.dedupeCapacity ?? 10000);
    this._backoffInitial = options.backoffInitial ?? 0.5;
    this._backoffMax = options.backoffMax ?? 30;
    this._maxAttempts = options.maxAttempts ?? null;
    this._openTimeout = options.openTimeout ?? 10;
    this._pingInterval = options.pingInterval ?? 20;
    this._onStatus = options.onStatus ?? null;
    this._stateStore = options.stateStore ?? null;
    this._random = options.random ?? Math.random;
    this._sleepHook = options.sleep ?? null;
    this._closed = false;
    this._running = false;
    this._ws = null;
    this._wake = null;
    this._everConnected = false;
    this.status = "closed";
    this.connectionId = null;
    this.edgeId = null;
    this.heads = new Map();
    this.lastResumed = null;
    this.streams = new Map();
    this.duplicates = 0;
    this.reconnects = 0;
    this.replayed = 0;
    this._resetSession();
    if (this._stateStore) {
      const saved = this._stateStore.load();
      if (saved) this.loadState(saved);
    }
  }

  /** The per-stream positions as JSON-ready `{name: {epoch, offset}}`. */
  state() {
    const out = {};
    for (const [name, [epoch, offset]] of this.streams) out[name] = { epoch, offset };
    return out;
  }

  /** Replace the per-stream positions with `state` (as returned by `state()`). */
  loadState(state) {
    this.streams = parsePositions(state);
  }

  _setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    if (this._onStatus) {
      try {
        this._onStatus(status);
      } catch {
        // a UI callback's failure must not end the stream of events
      }
    }
  }

  _saveState() {
    if (this._stateStore) this._stateStore.save(this.state());
  }

  _resetSession() {
    this._helloSeen = false;
    this._pendingResume = null;
    this._replayHeads = new Map(); // streams named in resume -> head offset at hello
    this._floors = new Map(); // stream -> [epoch, offset covered already]
  }

  /** Apply one server frame to the client state; return what to hand to the caller. */
  _handleFrame(frame) {
    try {
      switch (frame.type) {
        case "hello":
          this._onHello(frame);
          return [];
        case "event":
          return this._onEvent(frame);
        case "resumed":
          return this._onResumed(frame);
        default:
          return []; // pong, error (resume_not_first, …), and types a later edge may add
      }
    } catch {
      return []; // a malformed frame of a known type: ignored, as the Python SDK does
    }
  }

  _onHello(frame) {
    const heads = parsePositions(frame.streams);
    this.connectionId = String(frame.connection_id);
    this.edgeId = String(frame.edge_id);
    this.heads = heads;
    this._helloSeen = true;
    // Resume with what we hold, even if the epoch changed: the server answers epoch_changed.
    if (this.streams.size > 0) this._pendingResume = { type: "resume", streams: this.state() };
    this._replayHeads = new Map();
    for (const name of this.streams.keys()) {
      if (heads.has(name)) this._replayHeads.set(name, heads.get(name)[1]);
    }
    // Below the floor everything is covered: by what we processed (resumed streams) or by
    // the durable state a fresh peer loads after reading the heads.
    this._floors = new Map();
    for (const [name, [epoch, offset]] of heads) {
      const floor = this._replayHeads.has(name) ? Math.min(this.streams.get(name)[1], offset) : offset;
      this._floors.set(name, [epoch, floor]);
    }
    for (const [name, [epoch, offset]] of heads) {
      const current = this.streams.get(name);
      // A stored offset beyond the head (offset_ahead) would drop live events as duplicates.
      if (current === undefined || (current[0] === epoch && current[1] > offset)) {
        this.streams.set(name, [epoch, offset]);
      }
    }
  }

  _onEvent(frame) {
    const body = frame.event;
    const stream = String(frame.stream);
    const epoch = String(frame.epoch);
    const offset = frame.offset;
    if (!Number.isInteger(offset) || body === null || typeof body !== "object") throw new TypeError("event");
    if (typeof body.event_id !== "string" || typeof body.type !== "string") throw new TypeError("event");
    // Exactly the range (offset, head at hello] is replay; anything later is live.
    const replayHead = this._replayHeads.get(stream);
    const event = Object.freeze({
      stream,
      epoch,
      offset,
      eventId: body.event_id,
      type: body.type,
      occurredAt: String(body.occurred_at),
      payload: body.payload ?? null,
      replayed: replayHead !== undefined && offset <= replayHead,
    });
    const last = this.streams.get(stream);
    const sameEpoch = last !== undefined && last[0] === epoch;
    if (this._dedupe.seen(event.eventId)) {
      this.duplicates += 1;
      return [];
    }
    const floor = this._floors.get(stream);
    if (floor !== undefined && floor[0] === epoch && offset <= floor[1]) {
      this.duplicates += 1;
      return [];
    }
    if (sameEpoch && offset <= last[1]) {
      // Not seen, above the floor, yet below our position: a replay that arrived after live
      // events (the resume reached the edge after its 300 ms hold). Yield it.
      return [event];
    }
    this.streams.set(stream, [epoch, offset]);
    return [event];
  }

  _onResumed(frame) {
    const results = frame.streams;
    if (results === null || typeof results !== "object") throw new TypeError("resumed");
    this.lastResumed = { ...results };
    this._replayHeads = new Map();
    const out = [];
    for (const [name, result] of Object.entries(results)) {
      if (result && result.recovered === true) {
        this.replayed += Number(result.replayed ?? 0);
        continue;
      }
      out.push(new Resync(name, String(result?.reason ?? "unknown")));
      const head = this.heads.get(name);
      const current = this.streams.get(name);
      if (head === undefined) this.streams.delete(name);
      else if (current === undefined || current[0] !== head[0] || current[1] < head[1]) {
        this.streams.set(name, head); // keep live events that already passed the head
      }
    }
    return out;
  }

  /**
   * Yield events and Resync items, reconnecting and resuming, until `close()` or a ClientError.
   * Delivery is at-least-once from the server and deduplicated here by event id and by
   * per-stream offset, so each event is yielded once (within the dedupe bound).
   */
  async *events() {
    if (this._running) throw new Error("events() is already being iterated");
    this._running = true;
    const backoff = new Backoff(this._backoffInitial, this._backoffMax, this._random);
    let failures = 0;
    let lastError = null;
    try {
      while (!this._closed) {
        this._setStatus(this._everConnected ? "reconnecting" : "connecting");
        let session = null;
        try {
          session = await this._open();
        } catch (exc) {
          if (exc instanceof ClientError && !(exc instanceof ConnectionFailed)) throw exc;
          failures += 1;
          lastError = exc;
          // The token may have expired while we were away: ask for a fresh one next time.
          if (this._getToken) this._tokenBox.set(null);
        }
        if (session !== null) {
          for await (const item of this._session(session)) {
            yield item;
            this._saveState();
          }
          if (this._closed) return;
          const code = this._closeCode;
          // The token was valid when the edge accepted it, so a refresh cannot loop tightly.
          if (code === Close.TOKEN_EXPIRED && this._getToken) this._tokenBox.set(null);
          else {
            const Fatal = FATAL_CLOSES.get(code);
            if (Fatal) throw new Fatal(`edge closed the connection with ${code}`, code);
          }
          if (this._helloSeen && !THROTTLE_CLOSES.has(code)) backoff.reset();
          failures = this._helloSeen ? 0 : failures + 1;
          if (code === Close.RESYNC) {
            this.streams.clear();
            this._saveState();
            yield new Resync(null, "resync_required");
          }
        }
        if (this._closed) return;
        if (this._maxAttempts !== null && failures >= this._maxAttempts) {
          const error = new ConnectionFailed(`${failures} consecutive connection attempts failed`);
          error.cause = lastError;
          throw error;
        }
        this._setStatus("reconnecting");
        await this._sleep(backoff.nextDelay());
      }
    } finally {
      this._running = false;
      this._closed = true;
      this._stopSocket(Close.NORMAL);
      this._setStatus("closed");
    }
  }

  async _token() {
    let token = this._tokenBox.get();
    if (token === null && this._getToken) {
      token = await this._getToken();
      this._tokenBox.set(token ?? null);
    }
    return token;
  }

  /** Open one connection; resolve with its session queue, or reject (ClientError: final). */
  async _open() {
    const token = await this._token();
    const protocols = token ? [PROTOCOL, authSubprotocol(token)] : [PROTOCOL];
    if (this._closed) throw new ConnectionFailed("closed");
    const ws = new this._WebSocket(this._url, protocols);
    this._ws = ws;
    const queue = { items: [], notify: null, ended: false, code: Close.ABNORMAL, opened: false };
    const push = () => {
      if (queue.notify) {
        const n = queue.notify;
        queue.notify = null;
        n();
      }
    };
    ws.onmessage = (message) => {
      queue.items.push(message.data);
      push();
    };
    ws.onclose = (event) => {
      queue.ended = true;
      queue.code = event.code || Close.ABNORMAL;
      push();
    };
    ws.onerror = () => {}; // the close event that follows carries what we need
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._stopSocket(Close.NORMAL);
        reject(new ConnectionFailed("opening timed out"));
      }, this._openTimeout * 1000);
      ws.onopen = () => {
        clearTimeout(timer);
        queue.opened = true;
        if (ws.protocol !== PROTOCOL) {
          this._stopSocket(Close.NORMAL);
          reject(new ProtocolViolation("edge did not accept tyrum-v1"));
          return;
        }
        resolve({ ws, queue });
      };
      const onclose = ws.onclose;
      ws.onclose = (event) => {
        onclose(event);
        if (!queue.opened) {
          clearTimeout(timer);
          // A refused upgrade: WebSocket hides the HTTP status (403 vs 429/503), so it is
          // retried with backoff; a Node implementation may report it (refusedStatus).
          const status = event.refusedStatus;
          if (status && status < 500 && status !== 408 && status !== 429) {
            reject(new Refused(`edge refused the upgrade with HTTP ${status}`));
          } else reject(new ConnectionFailed("the upgrade failed"));
        }
      };
    });
  }

  /** Run one connection, yielding its items; leave its close code in `_closeCode`. */
  async *_session({ ws, queue }) {
    if (this._everConnected) this.reconnects += 1;
    this._everConnected = true;
    this._closeCode = Close.ABNORMAL;
    this._resetSession();
    const pinger = this._pingInterval > 0 ? setInterval(() => this._sendPing(ws), this._pingInterval * 1000) : null;
    try {
      while (!this._closed) {
        if (queue.items.length === 0) {
          if (queue.ended) break;
          await new Promise((resolve) => {
            queue.notify = resolve;
            this._wake = resolve;
          });
          continue;
        }
        const items = this._handleFrame(decode(queue.items.shift()));
        if (this._pendingResume !== null) {
          // set by hello: it must be our first frame
          ws.send(JSON.stringify(this._pendingResume));
          this._pendingResume = null;
        }
        if (this._helloSeen) this._setStatus("live");
        for (const item of items) yield item;
      }
      this._closeCode = queue.code;
    } finally {
      if (pinger !== null) clearInterval(pinger);
      if (this._ws === ws) this._stopSocket(Close.NORMAL);
    }
  }

  _sendPing(ws) {
    if (ws.readyState === 1) ws.send('{"type":"ping"}');
  }

  _stopSocket(code) {
    const ws = this._ws;
    this._ws = null;
    if (ws && ws.readyState <= 1) {
      try {
        ws.close(code);
      } catch {
        // already closing
      }
    }
  }

  _sleep(seconds) {
    if (this._sleepHook) return this._sleepHook(seconds);
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, seconds * 1000);
      this._wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  /** Send `{"type": "ping"}`; the edge answers with a pong frame. */
  ping() {
    if (this._ws === null || this._ws.readyState !== 1) throw new NotConnected("no open connection");
    this._ws.send('{"type":"ping"}');
  }

  /** Close the connection with 1000 and make `events()` return. */
  close() {
    this._closed = true;
    this._stopSocket(Close.NORMAL);
    if (this._wake) this._wake();
    if (!this._running) this._setStatus("closed");
  }

  /** Drop the connection without a normal close (for tests): `events()` resumes. */
  dropConnection() {
    const ws = this._ws;
    if (ws) ws.close(4000);
  }
}

/** A text frame as a JSON object; anything else becomes an empty, ignored frame. */
function decode(raw) {
  if (typeof raw !== "string") return {};
  try {
    const frame = JSON.parse(raw);
    return frame !== null && typeof frame === "object" && !Array.isArray(frame) ? frame : {};
  } catch {
    return {};
  }
}
