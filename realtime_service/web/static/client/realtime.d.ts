// Types for realtime.js, the realtime-service browser client (served at /client/realtime.d.ts).

/** A broadcast frame: every one carries its place in the diagnosis's history. */
export interface BroadcastFrame {
  type: string;
  diagnosis_id: number;
  data: unknown;
  timestamp: string;
  offset: number;
  epoch: string;
}

/** A personal frame (PROTOCOL 3.8): for one user, no offset; repeats are dropped by `message_id`. */
export interface PersonalFrame {
  type: string;
  diagnosis_id: number;
  user_id: number;
  message_id?: string;
  data: unknown;
  timestamp: string;
}

export type MessageFrame = BroadcastFrame | PersonalFrame;

/** The server no longer holds every broadcast after the position the client had (`recovered: false`). */
export interface HistoryLost {
  diagnosisId: number;
  /** Where the client stood, or null on a first connection that had none. */
  previous: { offset: number; epoch: string } | null;
  /** The diagnosis's newest offset and epoch at connect time: what the refetched state should be judged by. */
  offset: number | null;
  epoch: string | null;
}

export type CloseAction = "stop" | "refresh" | "now" | "backoff";

export type StateChange =
  | { state: "connecting"; attempt: number }
  | { state: "live"; session: string; offset: number; epoch: string }
  | { state: "reconnecting"; code: number; reason: string; delay: number; attempt: number }
  | { state: "closed"; code: number; reason: string; error?: RealtimeError };

export interface Backoff {
  /** The first retry waits up to this long (ms, default 500). */
  baseMs?: number;
  /** No retry waits longer than this (ms, default 20000). */
  capMs?: number;
}

/** A frame as the module sent or received it; an auth frame's token is replaced by "•••". */
export interface FrameReport {
  direction: "in" | "out";
  frame: Record<string, unknown> | null;
  raw?: string;
}

export interface ConnectOptions {
  /** The service's base: "wss://host[:port]" (http(s):// is accepted too). The module adds /ws/<id>. */
  url: string;
  diagnosisId: number | string;
  /** A JWT, or a function returning one (or a promise of one); a function lets the module refresh it. */
  token: string | (() => string | Promise<string>);
  /** A stable id per installation or tab (default "default"): the server keeps a delivery cursor per device. */
  device?: string;
  /** Each broadcast (once, in offset order) and each personal frame (once per message_id). */
  onMessage: (frame: MessageFrame) => void;
  /** Called before the messages that follow a `recovered: false`: refetch the state from the main API. */
  onHistoryLost?: (lost: HistoryLost) => void;
  onState?: (change: StateChange) => void;
  /** The module stopped for good (invalid_token, forbidden, diagnosis_not_found, or an expired fixed token). */
  onError?: (error: RealtimeError) => void;
  /** Every frame in and out, for debugging tools (the console uses it). */
  onFrame?: (report: FrameReport) => void;
  /** Start from this position instead of the device's server-side cursor. */
  position?: { offset: number; epoch: string };
  /** Keep the position (never the token) across page loads: true for localStorage, or your own storage. */
  persist?: boolean | { storage: Pick<Storage, "getItem" | "setItem">; key?: string };
  /** Send cumulative `ack` frames (default true), at most one per ackIntervalMs (default 1000). */
  ack?: boolean;
  ackIntervalMs?: number;
  backoff?: Backoff;
  /** After this long without a frame, send a ping; no answer within 10 s reconnects (default 25000; 0 = off). */
  pingAfterMs?: number;
  /** For tests: a WebSocket constructor and a random source. */
  WebSocket?: typeof WebSocket;
  random?: () => number;
}

export interface Connection {
  /** Stop for good: close the socket and cancel any reconnect. */
  close(): void;
  /** Send an application ping (the pong reaches onFrame); false when not connected. */
  ping(): boolean;
  readonly position: { offset: number; epoch: string } | null;
  readonly state: "idle" | "connecting" | "live" | "reconnecting" | "closed";
}

export class RealtimeError extends Error {
  /** The close reason word (e.g. "forbidden") or "token_expired" for a fixed token that ran out. */
  readonly reason: string;
  readonly code: number;
  constructor(reason: string, code: number, message?: string);
}

export const DEFAULT_BACKOFF: Readonly<Required<Backoff>>;
export const TERMINAL_REASONS: readonly string[];
export const CLIENT_CLOSE: Readonly<{ resume: number; tokenUnavailable: number; unresponsive: number }>;

export function connect(options: ConnectOptions): Connection;
export function closeAction(code: number, reason: string): CloseAction;
export function backoffCeiling(attempt: number, options?: Backoff): number;
export function backoffDelay(attempt: number, options?: Backoff, random?: () => number): number;
export function reconnectDelay(action: CloseAction, attempt: number, options?: Backoff,
                               random?: () => number): number | null;
export function tokenExpiry(token: string): number | null;
export function refreshDelay(expMs: number, nowMs: number): number;
