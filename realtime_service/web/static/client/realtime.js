// realtime-service browser client (PROTOCOL 9): an ES module with no dependencies and no build step.
//
//   import { connect } from "https://realtime.example.com/client/realtime.js";
//   const live = connect({ url: "wss://realtime.example.com", diagnosisId: 123, token: () => getJwt(),
//                          onMessage: (frame) => apply(frame), onHistoryLost: () => refetchFromMainApi() });
//   ...
//   live.close();
//
// What it does for the application: authenticates with the first frame (no token in a URL); remembers the last
// offset and epoch it handed over and resumes with them on every reconnect; hands each broadcast over once and
// in offset order (duplicates dropped, a gap repaired by resuming); drops repeated personal messages by their
// `message_id`; reports `recovered: false` through onHistoryLost before the messages that follow it; refreshes
// the token in-band before its `exp`; reconnects with exponential backoff and full jitter where the close code
// says to, and stops with an error where it says not to.
//
// Tokens are held only in local variables while a frame is built: never in web storage, the DOM, a URL or an
// onFrame/onState report. Only the position (offset and epoch) may be persisted, and only when asked to.

/** Reconnect delays: full jitter over an exponential envelope (ms). */
export const DEFAULT_BACKOFF = Object.freeze({ baseMs: 500, capMs: 20000 });

/** Close reasons after which retrying cannot help (PROTOCOL 3.3): the module stops with an error. */
export const TERMINAL_REASONS = Object.freeze(["invalid_token", "forbidden", "diagnosis_not_found"]);

/** Codes this module uses for closes it decides itself (the 4000-4999 range is for applications). */
export const CLIENT_CLOSE = Object.freeze({ resume: 4000, tokenUnavailable: 4001, unresponsive: 4002 });

/**
 * What to do after a close (PROTOCOL 3.3 and 9), from the close code and its reason word:
 * "stop" (terminal), "refresh" (get a new token, then reconnect at once), "now" (reconnect at once, then back
 * off if that fails) or "backoff".
 */
export function closeAction(code, reason) {
  if (code === 1008) {
    if (TERMINAL_REASONS.includes(reason)) return "stop";
    if (reason === "token_expired") return "refresh";
    return "backoff"; // auth_timeout, rate_limited, too_many_connections, anything newer: retry, slowly
  }
  if (code === 1012 || code === CLIENT_CLOSE.resume) return "now"; // service_restart; our own resume
  return "backoff"; // 1000/1001 from the server, 1006 (network), 1009, 1011, 1013, 1015, anything else
}

/**
 * The envelope of the n-th consecutive failed attempt (0-based): min(cap, base * 2^n). Full jitter then draws
 * the delay uniformly below it, so a crowd of clients that lost the same node spreads out.
 */
export function backoffCeiling(attempt, options = DEFAULT_BACKOFF) {
  const base = options.baseMs ?? DEFAULT_BACKOFF.baseMs;
  const cap = options.capMs ?? DEFAULT_BACKOFF.capMs;
  return Math.min(cap, base * Math.pow(2, Math.max(0, Math.min(attempt, 30))));
}

/** Full jitter: a delay drawn uniformly from [0, backoffCeiling(attempt)). `random` is Math.random's shape. */
export function backoffDelay(attempt, options = DEFAULT_BACKOFF, random = Math.random) {
  return Math.floor(random() * backoffCeiling(attempt, options));
}

/**
 * The delay before reconnecting (ms), or null to stop. "now" and "refresh" reconnect at once on their first
 * attempt; if that fails too, they back off like any other failure.
 */
export function reconnectDelay(action, attempt, options = DEFAULT_BACKOFF, random = Math.random) {
  if (action === "stop") return null;
  if ((action === "now" || action === "refresh") && attempt === 0) return 0;
  return backoffDelay(attempt, options, random);
}

/** A JWT's `exp` in seconds, read without verifying (the server verifies); null when absent or unreadable. */
export function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1];
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
  } catch (err) {
    return null;
  }
}

/**
 * How long to wait before refreshing a token that expires at `expMs` (ms since the epoch), seen at `nowMs`:
 * a fifth of its remaining life before `exp`, at least 1 s and at most 60 s early (so an hour-long token is
 * refreshed a minute before it expires, a 5 s one a second before).
 */
export function refreshDelay(expMs, nowMs) {
  const remaining = expMs - nowMs;
  const lead = Math.min(60000, Math.max(1000, remaining / 5));
  return Math.max(0, Math.floor(remaining - lead));
}

/** The error the application sees when the module stops on its own (terminal close, unusable token). */
export class RealtimeError extends Error {
  constructor(reason, code, message) {
    super(message || "realtime connection refused: " + reason);
    this.name = "RealtimeError";
    this.reason = reason;
    this.code = code;
  }
}

const MESSAGE_IDS_KEPT = 1000;
const ACK_INTERVAL_MS = 1000;
const PING_AFTER_MS = 25000;
const PONG_WITHIN_MS = 10000;
const MIN_REFRESH_GAP_MS = 1000;
const MAX_TIMER_MS = 2147483647;

function report(fn, value) {
  // An application callback that throws must not break the protocol; its error still reaches the console.
  if (typeof fn !== "function") return undefined;
  try {
    return fn(value);
  } catch (err) {
    setTimeout(() => { throw err; });
    return undefined;
  }
}

function socketUrl(base, diagnosisId) {
  const trimmed = String(base).replace(/\/+$/, "").replace(/^http(s?):\/\//i, "ws$1://");
  if (!/^wss?:\/\//i.test(trimmed)) throw new TypeError("url must start with ws://, wss://, http:// or https://");
  if (/[?#]/.test(trimmed)) throw new TypeError("url is the service's base, without a query or fragment");
  return trimmed + "/ws/" + diagnosisId;
}

function validPosition(value) {
  return value && Number.isInteger(value.offset) && value.offset >= 0 && typeof value.epoch === "string" &&
    value.epoch !== "" ? { offset: value.offset, epoch: value.epoch } : null;
}

function isBroadcast(frame) {
  return Number.isInteger(frame.offset) && typeof frame.epoch === "string";
}

/**
 * Follow one diagnosis. Returns {close(), ping(), position, state}. See realtime.d.ts for every option.
 */
export function connect(options) {
  const opts = options || {};
  const diagnosisId = String(opts.diagnosisId ?? "");
  if (!/^[1-9][0-9]{0,18}$/.test(diagnosisId)) throw new TypeError("diagnosisId must be a positive integer");
  if (typeof opts.token !== "string" && typeof opts.token !== "function") {
    throw new TypeError("token must be a string or a function returning one (or a promise of one)");
  }
  if (typeof opts.onMessage !== "function") throw new TypeError("onMessage must be a function");
  const target = socketUrl(opts.url, diagnosisId);
  const device = opts.device || "default";
  const backoff = Object.assign({}, DEFAULT_BACKOFF, opts.backoff || {});
  const autoAck = opts.ack !== false;
  const ackInterval = opts.ackIntervalMs ?? ACK_INTERVAL_MS;
  const pingAfter = opts.pingAfterMs ?? PING_AFTER_MS;
  const WS = opts.WebSocket || globalThis.WebSocket;
  const random = opts.random || Math.random;

  // Optional persistence of the position (never a token) across page loads.
  const store = opts.persist ? (opts.persist === true ? globalThis.localStorage : opts.persist.storage) : null;
  const storeKey = (opts.persist && opts.persist.key) || "realtime:" + target + ":" + device;
  function load() {
    if (!store) return null;
    try {
      return validPosition(JSON.parse(store.getItem(storeKey) || "null"));
    } catch (err) {
      return null;
    }
  }
  function save() {
    if (!store || !position) return;
    try {
      store.setItem(storeKey, JSON.stringify(position));
    } catch (err) { /* storage full or denied: resuming within this page still works */ }
  }

  let position = validPosition(opts.position) || load(); // the last broadcast handed over, or the start point
  const messageIds = [];
  const messageIdSet = new Set();
  let socket = null;
  let attempt = 0;
  let stopped = false;
  let state = "idle";
  let reconnectTimer = null;

  function setState(next, extra) {
    state = next;
    report(opts.onState, Object.assign({ state: next }, extra || {}));
  }

  function stop(reason, code, message) {
    stopped = true;
    const error = new RealtimeError(reason, code, message);
    setState("closed", { code: code, reason: reason, error: error });
    report(opts.onError, error);
  }

  function schedule(action, code, reason) {
    if (stopped) return;
    if (action === "refresh" && typeof opts.token !== "function") {
      stop("token_expired", code, "the token expired and no function was given to get a new one");
      return;
    }
    const delay = reconnectDelay(action, attempt, backoff, random);
    if (delay === null) {
      stop(reason, code);
      return;
    }
    attempt += 1;
    setState("reconnecting", { code: code, reason: reason, delay: delay, attempt: attempt });
    reconnectTimer = setTimeout(() => { reconnectTimer = null; open(); }, delay);
  }

  function fresh(id) {
    if (typeof id !== "string") return true;
    if (messageIdSet.has(id)) return false;
    messageIdSet.add(id);
    messageIds.push(id);
    if (messageIds.length > MESSAGE_IDS_KEPT) messageIdSet.delete(messageIds.shift());
    return true;
  }

  async function token() {
    return typeof opts.token === "function" ? await opts.token() : opts.token;
  }

  async function open() {
    if (stopped) return;
    setState("connecting", { attempt: attempt });
    let first;
    try {
      first = await token();
      if (typeof first !== "string" || first === "") throw new Error("the token function gave no token");
    } catch (err) {
      if (!stopped) schedule("backoff", CLIENT_CLOSE.tokenUnavailable, "token_unavailable");
      return;
    }
    if (stopped) return;
    const since = position;
    const conn = { ws: null, floor: null, acceptReplay: false, ackTimer: null, acked: 0, personalPending: false,
      refreshTimer: null, idleTimer: null, pongTimer: null, exp: tokenExpiry(first) };
    let ws;
    try {
      ws = new WS(target);
    } catch (err) {
      schedule("backoff", 1006, "");
      return;
    }
    conn.ws = ws;
    socket = conn;

    ws.onopen = () => {
      const auth = { type: "auth", token: first, device: device };
      if (since) Object.assign(auth, { since: since.offset, epoch: since.epoch });
      send(conn, auth);
      first = null;
      planRefresh(conn);
      watchdog(conn);
    };
    ws.onmessage = (event) => {
      if (socket !== conn) return;
      watchdog(conn);
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        report(opts.onFrame, { direction: "in", frame: null, raw: String(event.data) });
        return;
      }
      report(opts.onFrame, { direction: "in", frame: frame });
      if (frame && typeof frame === "object") receive(conn, frame, since);
    };
    ws.onclose = (event) => {
      if (socket !== conn) return;
      finish(conn);
      if (stopped) return;
      schedule(closeAction(event.code, event.reason), event.code, event.reason || "");
    };
    ws.onerror = () => { /* onclose follows with the code */ };
  }

  function finish(conn) {
    clearTimeout(conn.ackTimer);
    clearTimeout(conn.refreshTimer);
    clearTimeout(conn.idleTimer);
    clearTimeout(conn.pongTimer);
    conn.ackTimer = conn.refreshTimer = conn.idleTimer = conn.pongTimer = null;
    if (socket === conn) socket = null;
  }

  // Close this socket ourselves and resume: used for a gap or an epoch change seen live, and an unresponsive
  // connection. The server cannot send these, so they never occur with a healthy service.
  function restart(conn, code, reason) {
    finish(conn);
    const ws = conn.ws;
    ws.onclose = ws.onmessage = ws.onopen = null;
    try {
      ws.close(code, reason);
    } catch (err) { /* already closing */ }
    schedule(closeAction(code, reason), code, reason);
  }

  function send(conn, frame) {
    if (socket !== conn || conn.ws.readyState !== 1) return false;
    conn.ws.send(JSON.stringify(frame));
    const shown = "token" in frame ? Object.assign({}, frame, { token: "•••" }) : frame;
    report(opts.onFrame, { direction: "out", frame: shown });
    return true;
  }

  function receive(conn, frame, since) {
    const type = frame.type;
    if (type === "connect") {
      const data = frame.data || {};
      conn.floor = validPosition({ offset: data.offset, epoch: data.epoch });
      attempt = 0;
      if (!since) {
        // No position to resume from: the server replays what this device has not confirmed (its cursor).
        conn.acceptReplay = true;
        if (conn.floor) {
          position = conn.floor;
          save();
        }
      }
      setState("live", { session: data.session, offset: data.offset, epoch: data.epoch });
      return;
    }
    if (type === "reconnect_messages") {
      const data = frame.data || {};
      if (data.recovered === false) {
        const lost = { previous: since, offset: conn.floor ? conn.floor.offset : null,
          epoch: conn.floor ? conn.floor.epoch : null, diagnosisId: Number(diagnosisId) };
        position = null;
        conn.acceptReplay = true;
        report(opts.onHistoryLost, lost);
      }
      let last = -1;
      for (const message of Array.isArray(data.messages) ? data.messages : []) {
        if (!message || typeof message !== "object") continue;
        if (isBroadcast(message)) {
          if (conn.acceptReplay) {
            if (message.offset <= last) continue;
            last = message.offset;
            deliver(conn, message);
          } else if (!position || message.epoch !== position.epoch || message.offset > position.offset) {
            deliver(conn, message);
          }
        } else if (fresh(message.message_id)) {
          report(opts.onMessage, message);
          personal(conn);
        }
      }
      conn.acceptReplay = false;
      if (conn.floor && (!position || position.epoch !== conn.floor.epoch || position.offset < conn.floor.offset)) {
        position = conn.floor;
        save();
      }
      return;
    }
    if (type === "pong" || type === "error" || type === "auth" || type === "ping") return;
    if (isBroadcast(frame)) {
      if (position && frame.epoch === position.epoch) {
        if (frame.offset <= position.offset) return; // a duplicate
        if (frame.offset > position.offset + 1) {
          restart(conn, CLIENT_CLOSE.resume, "gap"); // resume fills it from history
          return;
        }
      } else if (position) {
        restart(conn, CLIENT_CLOSE.resume, "epoch_changed"); // the resume reports what was lost
        return;
      }
      deliver(conn, frame);
      return;
    }
    if (fresh(frame.message_id)) { // personal and custom frames without an offset
      report(opts.onMessage, frame);
      personal(conn);
    }
  }

  // The service keeps a personal message until a connection confirms it (an ack of any offset, or a PONG),
  // so acknowledge soon after handing one over: a reload then does not bring it back.
  function personal(conn) {
    if (!autoAck) return;
    conn.personalPending = true;
    planAck(conn);
  }

  function deliver(conn, frame) {
    report(opts.onMessage, frame);
    position = { offset: frame.offset, epoch: frame.epoch };
    save();
    if (autoAck) planAck(conn);
  }

  // Acks are cumulative: one at most every ackIntervalMs keeps a burst inside the server's rate limit.
  function planAck(conn) {
    if (conn.ackTimer !== null) return;
    conn.ackTimer = setTimeout(() => {
      conn.ackTimer = null;
      const current = position && conn.floor && position.epoch === conn.floor.epoch ? position.offset : null;
      if ((current !== null && current > conn.acked) || conn.personalPending) {
        const offset = current === null ? conn.acked : Math.max(current, conn.acked);
        if (send(conn, { type: "ack", offset: offset })) {
          conn.acked = offset;
          conn.personalPending = false;
        }
      }
    }, ackInterval);
  }

  function planRefresh(conn) {
    clearTimeout(conn.refreshTimer);
    conn.refreshTimer = null;
    if (typeof opts.token !== "function" || conn.exp === null) return;
    // At least a second apart (a token function handing out ever-shorter tokens must not flood the socket),
    // and never a timer beyond what setTimeout can hold (longer ones would fire at once).
    const delay = Math.max(MIN_REFRESH_GAP_MS, refreshDelay(conn.exp * 1000, Date.now()));
    if (delay > MAX_TIMER_MS) {
      conn.refreshTimer = setTimeout(() => planRefresh(conn), MAX_TIMER_MS);
      return;
    }
    conn.refreshTimer = setTimeout(() => refresh(conn), delay);
  }

  async function refresh(conn) {
    conn.refreshTimer = null;
    let next = null;
    try {
      next = await token();
    } catch (err) {
      next = null;
    }
    if (socket !== conn) return;
    const exp = typeof next === "string" ? tokenExpiry(next) : null;
    if (typeof next === "string" && next !== "" && (exp === null || conn.exp === null || exp > conn.exp)) {
      if (send(conn, { type: "auth", token: next })) {
        conn.exp = exp;
        planRefresh(conn);
      }
      return;
    }
    // No newer token yet: ask again shortly while the old one lasts; if it runs out the server closes
    // token_expired and the reconnect asks for a token once more.
    const left = conn.exp * 1000 - Date.now();
    if (left > 500) conn.refreshTimer = setTimeout(() => refresh(conn), Math.min(5000, left / 2));
  }

  // Browsers hide protocol PINGs, so a dead network is found with an application ping after a quiet spell.
  function watchdog(conn) {
    clearTimeout(conn.idleTimer);
    clearTimeout(conn.pongTimer);
    conn.pongTimer = null;
    if (!pingAfter) return;
    conn.idleTimer = setTimeout(() => {
      if (!send(conn, { type: "ping" })) return;
      conn.pongTimer = setTimeout(() => restart(conn, CLIENT_CLOSE.unresponsive, "unresponsive"),
        PONG_WITHIN_MS);
    }, pingAfter);
  }

  open();

  return {
    /** Stop for good: close the socket (1000) and cancel any reconnect. */
    close() {
      if (stopped) return;
      stopped = true;
      clearTimeout(reconnectTimer);
      const conn = socket;
      if (conn) {
        if (autoAck && position && conn.floor && position.epoch === conn.floor.epoch && position.offset > conn.acked) {
          send(conn, { type: "ack", offset: position.offset });
        }
        finish(conn);
        conn.ws.onclose = conn.ws.onmessage = conn.ws.onopen = null;
        try {
          conn.ws.close(1000);
        } catch (err) { /* already closing */ }
      }
      setState("closed", { code: 1000, reason: "closed by the client" });
    },
    /** Send an application ping; the `pong` reaches onFrame. False when not connected. */
    ping() {
      return socket ? send(socket, { type: "ping" }) : false;
    },
    /** The last position handed over ({offset, epoch}) or null. */
    get position() {
      return position ? { offset: position.offset, epoch: position.epoch } : null;
    },
    /** "connecting", "live", "reconnecting" or "closed". */
    get state() {
      return state;
    },
  };
}
