// Types of the Tyrum peer SDK (src/index.js).

export declare const PROTOCOL: "tyrum-v1";
export declare const AUTH_SUBPROTOCOL_PREFIX: "tyrum-auth.";
export declare const CREDENTIAL_PARAMS: readonly string[];
export declare const Close: Readonly<{
  NORMAL: 1000;
  ABNORMAL: 1006;
  MESSAGE_TOO_BIG: 1009;
  RECONNECT: 4001;
  POLICY: 4008;
  FRAME_TOO_LARGE: 4009;
  SLOW_CONSUMER: 4013;
  RATE_LIMITED: 4029;
  MALFORMED_FRAME: 4400;
  TOKEN_EXPIRED: 4401;
  RESYNC: 4409;
}>;

export type StreamName = "tenant" | "role" | "device" | (string & {});
export type State = Record<StreamName, { epoch: string; offset: number }>;
export type Status = "connecting" | "live" | "reconnecting" | "closed";

/** One event of one stream; `replayed` is true when it came from a resume's replay. */
export interface TyrumEvent {
  readonly stream: StreamName;
  readonly epoch: string;
  readonly offset: number;
  readonly eventId: string;
  readonly type: string;
  readonly occurredAt: string;
  readonly payload: unknown;
  readonly replayed: boolean;
}

/** Refetch durable state for `stream` (`null`: every stream). */
export declare class Resync {
  constructor(stream: StreamName | null, reason: string);
  readonly stream: StreamName | null;
  /** `resync_required` (close 4409), `epoch_changed`, `retention_exceeded`, `offset_ahead`, `unknown_stream`. */
  readonly reason: string;
}

export interface StateStore {
  load(): State | null;
  save(state: State): void;
  clear?(): void;
}

export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; refusedStatus?: number }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export interface TyrumClientOptions {
  /** A token of the tenant; sent as the `tyrum-auth.<base64url>` subprotocol. Omit both to use the page's session cookie. */
  token?: string;
  /** Called for a token before connecting, and again after a 4401 or a failed upgrade. */
  getToken?: () => string | null | Promise<string | null>;
  /** Another WebSocket implementation (default: the global `WebSocket`). */
  WebSocket?: new (url: string, protocols: string[]) => WebSocketLike;
  dedupeCapacity?: number;
  /** Seconds; full jitter, doubling up to `backoffMax`. */
  backoffInitial?: number;
  backoffMax?: number;
  /** Consecutive failed attempts before `ConnectionFailed`; default: retry forever. */
  maxAttempts?: number | null;
  openTimeout?: number;
  /** Seconds between `{"type": "ping"}` frames; 0 disables them. */
  pingInterval?: number;
  onStatus?: (status: Status) => void;
  /** Where positions are kept across page reloads, e.g. `storageState(localStorage)`. */
  stateStore?: StateStore;
  /** A source of uniform [0, 1) numbers for the jitter (tests). */
  random?: () => number;
  /** Replaces the backoff's wait (tests): called with the delay in seconds. */
  sleep?: (seconds: number) => Promise<void>;
}

export declare class TyrumClient {
  constructor(url: string, options?: TyrumClientOptions);
  status: Status;
  connectionId: string | null;
  edgeId: string | null;
  duplicates: number;
  reconnects: number;
  replayed: number;
  lastResumed: Record<string, { recovered: boolean; replayed?: number; reason?: string }> | null;
  events(): AsyncGenerator<TyrumEvent | Resync, void, undefined>;
  state(): State;
  loadState(state: State): void;
  ping(): void;
  close(): void;
  dropConnection(): void;
}

export declare class ClientError extends Error {
  /** The close code that ended the connection, when one did. */
  readonly code: number | null;
}
export declare class ConnectionFailed extends ClientError {}
export declare class Refused extends ClientError {}
export declare class TokenRevoked extends ClientError {}
export declare class TokenExpired extends ClientError {}
export declare class ProtocolViolation extends ClientError {}
export declare class NotConnected extends ClientError {}

export declare class DedupeCache {
  constructor(capacity: number);
  seen(eventId: string): boolean;
}
export declare class Backoff {
  constructor(initial: number, maximum: number, random?: () => number);
  nextDelay(): number;
  reset(): void;
}
export declare function authSubprotocol(token: string): string;
export declare function parsePositions(raw: unknown): Map<string, [string, number]>;
export declare function storageState(storage: Storage, key?: string): StateStore;
