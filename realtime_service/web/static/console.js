// realtime-service debug console (PROTOCOL 6), built on the browser client module (PROTOCOL 9), so the
// console and every app share one implementation of the client protocol: first-frame auth, resume, acks,
// repeats dropped, backoff by close code, in-band token refresh.
// Tokens live only in the `held` object below: an entered token is moved out of its input at once, and none is
// ever written into the DOM, a URL, the history or web storage (the module masks it in every frame it reports).
import { connect } from "/client/realtime.js";

const $ = (id) => document.getElementById(id);
const MAX_ROWS = 500;

const dataNode = $("console-data");
const config = JSON.parse(dataNode.textContent || "{}");
dataNode.remove(); // the demo tokens (development only) leave the DOM once the script holds them

const held = { user: null, service: null };
let client = null;
let lastPosition = null;
let frameCount = 0;
let statusTimer = null;

const plural = (n, one, many) => n + " " + (n === 1 ? one : many);

// -- tokens -------------------------------------------------------------------------------------
function showHeld(kind) {
  const badge = $(kind + "-token-held");
  const input = $(kind + "-token");
  if (held[kind]) {
    badge.textContent = config.demo && held[kind] === config.demo[kind] ? "demo token held" : "held in memory";
    badge.dataset.held = "yes";
    input.placeholder = "held; paste another to replace it";
  } else {
    badge.textContent = "none held";
    badge.dataset.held = "no";
  }
  showEmptyHint();
}

function take(kind) {
  const input = $(kind + "-token");
  const value = input.value.trim();
  input.value = "";
  if (value) held[kind] = value;
  showHeld(kind);
  return held[kind];
}

// What to do next depends on what is held: never ask for a token the console already has.
function showEmptyHint() {
  const hint = $("frames-empty");
  if (!hint) return;
  if (!held.user) {
    hint.textContent = "No frames yet. Enter a user token and a diagnosis, then connect.";
  } else if (!$("diagnosis").value.trim()) {
    hint.textContent = "No frames yet. Enter a diagnosis, then connect.";
  } else {
    const whose = config.demo && held.user === config.demo.user ? "the demo user" : "the held token";
    hint.textContent = "No frames yet. Press Connect to watch diagnosis " + $("diagnosis").value.trim() +
      " as " + whose + ".";
  }
}

for (const kind of ["user", "service"]) {
  if (config.demo && config.demo[kind]) held[kind] = config.demo[kind];
  $(kind + "-token").addEventListener("change", () => take(kind));
  showHeld(kind);
}
$("diagnosis").addEventListener("input", showEmptyHint);

// -- frame log ----------------------------------------------------------------------------------
function clock(date) {
  const pad = (n, w) => String(n).padStart(w || 2, "0");
  return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds()) + "." +
    pad(date.getMilliseconds(), 3);
}

function summary(value) {
  if (value === undefined) return "";
  const text = JSON.stringify(value);
  return text.length > 140 ? text.slice(0, 139) + "…" : text;
}

const CONTROL = ["connect", "pong", "error", "reconnect_messages", "closed", "auth", "ping", "ack"];

function addRow(direction, type, offset, data, extra) {
  const rows = $("frame-rows");
  const row = document.createElement("tr");
  row.className = "dir-" + direction + (extra && extra.nested ? " nested" : "");
  row.dataset.type = type;
  if (offset !== null && offset !== undefined) row.dataset.offset = String(offset);

  const time = document.createElement("td");
  time.className = "c-time";
  time.textContent = clock(new Date());
  if (extra && extra.timestamp) time.title = "server timestamp " + extra.timestamp;

  const dir = document.createElement("td");
  dir.className = "c-dir";
  dir.textContent = { in: "←", out: "→", sys: "•" }[direction];
  dir.title = { in: "received", out: "sent", sys: "console" }[direction];

  const kind = document.createElement("td");
  kind.className = "c-type";
  const tag = document.createElement("span");
  tag.className = "tag tag-" + (CONTROL.includes(type) ? type : (extra && extra.personal ? "personal" : "message"));
  tag.textContent = (extra && extra.nested ? "↳ " : "") + type;
  kind.appendChild(tag);

  const off = document.createElement("td");
  off.className = "c-offset";
  off.textContent = offset === null || offset === undefined ? "" : String(offset);

  const body = document.createElement("td");
  body.className = "c-data";
  if (data !== undefined && typeof data === "object" && data !== null) {
    const details = document.createElement("details");
    const short = document.createElement("summary");
    short.textContent = summary(data);
    const full = document.createElement("pre");
    full.textContent = JSON.stringify(data, null, 2);
    details.append(short, full);
    body.appendChild(details);
  } else {
    body.textContent = data === undefined ? "" : String(data);
  }

  row.append(time, dir, kind, off, body);
  rows.appendChild(row);
  while (rows.children.length > MAX_ROWS) rows.removeChild(rows.firstChild);
  frameCount += 1;
  $("frame-count").textContent = plural(frameCount, "frame", "frames");
  $("frames-empty").hidden = true;
  if ($("follow").checked) $("frames-scroll").scrollTop = $("frames-scroll").scrollHeight;
}

function note(text) {
  addRow("sys", "console", null, text);
}

function showFrame(report) {
  const frame = report.frame;
  if (!frame) {
    addRow("in", "unparsed", null, report.raw);
    return;
  }
  const type = String(frame.type);
  if (report.direction === "out") {
    addRow("out", type, null, frame);
    return;
  }
  const meta = { timestamp: frame.timestamp, personal: frame.user_id !== undefined && frame.offset === undefined };
  if (type === "connect") {
    $("fact-session").textContent = frame.data.session;
    addRow("in", type, frame.data.offset, frame.data, meta);
  } else if (type === "reconnect_messages") {
    const messages = frame.data.messages || [];
    addRow("in", type, null, { recovered: frame.data.recovered, messages: messages.length }, meta);
    for (const message of messages) {
      addRow("in", String(message.type), message.offset, message.data,
        { nested: true, timestamp: message.timestamp, personal: message.offset === undefined });
    }
  } else {
    addRow("in", type, frame.offset, frame.data, meta);
  }
  showPosition();
}

function showPosition() {
  const position = client ? client.position : lastPosition;
  $("fact-offset").textContent = position ? String(position.offset) : "–";
  $("fact-epoch").textContent = position ? position.epoch : "–";
}

// -- connection: all protocol work is the module's ------------------------------------------------------
function setState(state, label) {
  const pill = $("conn-state");
  pill.dataset.state = state;
  pill.textContent = label;
  $("ping").disabled = state !== "open";
  $("disconnect").disabled = state === "idle" || state === "closed";
  $("resume").disabled = lastPosition === null || !$("diagnosis").value;
}

function onState(change) {
  if (change.state === "connecting") {
    setState("connecting", "connecting…");
  } else if (change.state === "live") {
    setState("open", "connected");
  } else if (change.state === "reconnecting") {
    addRow("in", "closed", null, { code: change.code, reason: change.reason });
    note("reconnecting in " + change.delay + " ms (attempt " + change.attempt + "), resuming from offset " +
      (client && client.position ? client.position.offset : "–"));
    setState("connecting", "reconnecting…");
  } else if (change.state === "closed") {
    if (client) lastPosition = client.position;
    if (change.error) {
      addRow("in", "closed", null, { code: change.code, reason: change.reason });
      setState("closed", change.reason ? "closed: " + change.reason : "closed (" + change.code + ")");
    } else {
      setState("idle", "disconnected");
    }
  }
}

function disconnect(silent) {
  if (client) {
    const old = client;
    lastPosition = old.position;
    old.close();
    client = null;
    if (!silent) note("disconnected by the console");
  }
  setState("idle", "disconnected");
  showPosition();
}

function manualPosition() {
  const since = $("since").value.trim();
  const epoch = $("epoch").value.trim();
  if (since === "" && epoch === "") return null;
  if (!/^[0-9]+$/.test(since) || epoch === "") {
    note("resume needs both since (an offset) and epoch; connecting without them");
    return null;
  }
  return { offset: Number(since), epoch: epoch };
}

function start(resume) {
  take("user");
  const diagnosis = $("diagnosis").value.trim();
  if (!held.user) {
    note("enter a user token first");
    $("user-token").focus();
    return;
  }
  if (!/^[1-9][0-9]*$/.test(diagnosis)) {
    note("the diagnosis id is a positive integer");
    $("diagnosis").focus();
    return;
  }
  const position = resume ? lastPosition : manualPosition();
  disconnect(true);
  if (!resume) lastPosition = null;
  $("since").value = "";
  $("epoch").value = "";
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  let current = null; // callbacks may run before connect() returns
  current = connect({
    url: scheme + location.host,
    diagnosisId: diagnosis,
    token: () => held.user, // read when needed, never copied anywhere
    device: $("device").value.trim() || "default",
    position: position || undefined,
    ack: $("auto-ack").checked,
    ackIntervalMs: 500,
    onMessage: () => queueMicrotask(showPosition), // the module moves its position once this returns
    onHistoryLost: (lost) => note("history lost (recovered: false): an app would refetch state now; " +
      "the diagnosis is at offset " + lost.offset + " in epoch " + lost.epoch),
    onFrame: showFrame,
    onState: (change) => { if (client === current || client === null) onState(change); },
  });
  client = current;
}

$("connect-form").addEventListener("submit", (event) => {
  event.preventDefault();
  start(false);
});
$("resume").addEventListener("click", () => start(true));
$("disconnect").addEventListener("click", () => disconnect(false));
$("ping").addEventListener("click", () => {
  if (client) client.ping();
});
$("clear").addEventListener("click", () => {
  $("frame-rows").replaceChildren();
  frameCount = 0;
  $("frame-count").textContent = "0 frames";
  $("frames-empty").hidden = false;
  showEmptyHint();
});

// -- publish through the REST API -----------------------------------------------------------------
function showResult(ok, text) {
  const result = $("publish-result");
  result.className = "result " + (ok ? "ok" : "bad");
  result.textContent = text;
}

$("publish-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = take("service");
  if (!token) {
    showResult(false, "Enter a service token first.");
    return;
  }
  let data;
  try {
    data = JSON.parse($("publish-data").value || "{}");
  } catch (err) {
    showResult(false, "Data is not valid JSON: " + err.message);
    return;
  }
  const body = { diagnosis_id: Number($("diagnosis").value), type: $("publish-type").value.trim(), data: data };
  const user = $("publish-user").value.trim();
  if (user !== "") body.user_id = Number(user);
  $("publish").disabled = true;
  try {
    const response = await fetch("/api/v1/publish", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
      body: JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    const answer = await response.json().catch(() => ({}));
    if (response.ok) {
      const where = answer.offset === null ? "personal message" : "offset " + answer.offset;
      showResult(true, "Published: " + where + ", handed to " + answer.delivered + " connection(s).");
    } else {
      const error = answer.error || {};
      const fields = error.fields ? " (" + Object.keys(error.fields).join(", ") + ")" : "";
      showResult(false, response.status + " " + (error.code || "") + ": " + (error.message || "") + fields);
    }
  } catch (err) {
    showResult(false, "Request failed: " + err.message);
  } finally {
    $("publish").disabled = false;
  }
  refreshStatus();
});

// -- /ws/status -------------------------------------------------------------------------------------
function showTotal(id, n, one, many) {
  $(id).textContent = String(n);
  $(id + "-label").textContent = n === 1 ? one : many;
}

async function refreshStatus() {
  clearTimeout(statusTimer);
  try {
    const headers = held.service ? { Authorization: "Bearer " + held.service } : {};
    const response = await fetch("/ws/status", { headers: headers, credentials: "omit", cache: "no-store" });
    const status = await response.json();
    showTotal("total-connections", status.connections, "connection", "connections");
    showTotal("total-diagnoses", status.diagnoses, "diagnosis watched", "diagnoses watched");
    showTotal("total-retained", status.retained_messages, "retained message", "retained messages");
    $("totals-updated").textContent = "updated " + clock(new Date()).slice(0, 8);
    const mine = status.per_diagnosis && status.per_diagnosis[$("diagnosis").value.trim()];
    $("fact-diagnosis").textContent = mine
      ? plural(mine.connections, "connection", "connections") + ", " + plural(mine.users, "user", "users") +
        ", offset " + mine.offset
      : status.per_diagnosis ? "no connections" : "–";
  } catch (err) {
    $("totals-updated").textContent = "status unavailable";
  }
  statusTimer = setTimeout(refreshStatus, (config.statusPollSeconds || 3) * 1000);
}

setState("idle", "disconnected");
showEmptyHint();
refreshStatus();
