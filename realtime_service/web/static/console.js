// realtime-service debug console (PROTOCOL 6).
// Tokens live only in the `held` object below: an entered token is moved out of its input at once, and none is
// ever written into the DOM, a URL, the history or web storage. The WebSocket authenticates with a first
// `auth` frame, so no token appears in a URL either.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const MAX_ROWS = 500;

  const dataNode = $("console-data");
  const config = JSON.parse(dataNode.textContent || "{}");
  dataNode.remove(); // the demo tokens (development only) leave the DOM once the script holds them

  const held = { user: null, service: null };
  const seen = { offset: null, epoch: null, session: null };
  let socket = null;
  let frameCount = 0;
  let statusTimer = null;

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
  }

  function take(kind) {
    const input = $(kind + "-token");
    const value = input.value.trim();
    input.value = "";
    if (value) held[kind] = value;
    showHeld(kind);
    return held[kind];
  }

  for (const kind of ["user", "service"]) {
    if (config.demo && config.demo[kind]) held[kind] = config.demo[kind];
    $(kind + "-token").addEventListener("change", () => take(kind));
    showHeld(kind);
  }

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
    tag.className = "tag tag-" + (["connect", "pong", "error", "reconnect_messages", "closed", "auth", "ping"]
      .includes(type) ? type : (extra && extra.personal ? "personal" : "message"));
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
    $("frame-count").textContent = frameCount + (frameCount === 1 ? " frame" : " frames");
    $("frames-empty").hidden = true;
    if ($("follow").checked) $("frames-scroll").scrollTop = $("frames-scroll").scrollHeight;
  }

  function note(text) {
    addRow("sys", "console", null, text);
  }

  // -- connection -----------------------------------------------------------------------------------
  function setState(state, label) {
    const pill = $("conn-state");
    pill.dataset.state = state;
    pill.textContent = label;
    const open = state === "open";
    $("ping").disabled = !open;
    $("disconnect").disabled = state === "idle" || state === "closed";
    $("resume").disabled = seen.offset === null || !$("diagnosis").value;
  }

  function remember(frame) {
    if (typeof frame.offset === "number" && (seen.offset === null || frame.offset > seen.offset)) {
      seen.offset = frame.offset;
    }
    if (typeof frame.epoch === "string") seen.epoch = frame.epoch;
    $("fact-offset").textContent = seen.offset === null ? "–" : String(seen.offset);
    $("fact-epoch").textContent = seen.epoch || "–";
  }

  // Acks are cumulative: send the highest offset at most twice a second, so a burst of broadcasts never
  // pushes the console over the server's rate limit (20 frames/s).
  let ackPending = null;
  let ackTimer = null;
  function ack(offset) {
    if (!$("auto-ack").checked || typeof offset !== "number") return;
    if (ackPending === null || offset > ackPending) ackPending = offset;
    if (ackTimer !== null) return;
    ackTimer = setTimeout(function () {
      ackTimer = null;
      if (ackPending !== null && socket && socket.readyState === WebSocket.OPEN) {
        socket.send(JSON.stringify({ type: "ack", offset: ackPending }));
      }
      ackPending = null;
    }, 500);
  }

  function receive(event) {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch (err) {
      addRow("in", "unparsed", null, String(event.data));
      return;
    }
    const type = String(frame.type);
    const meta = { timestamp: frame.timestamp, personal: frame.user_id !== undefined && frame.offset === undefined };
    if (type === "connect") {
      seen.session = frame.data.session;
      $("fact-session").textContent = frame.data.session;
      if (seen.offset === null) seen.offset = frame.data.offset;
      seen.epoch = frame.data.epoch;
      remember({});
      setState("open", "connected");
      addRow("in", type, frame.data.offset, frame.data, meta);
      return;
    }
    if (type === "reconnect_messages") {
      const messages = frame.data.messages || [];
      addRow("in", type, null, { recovered: frame.data.recovered, messages: messages.length }, meta);
      let highest = null;
      for (const message of messages) {
        remember(message);
        if (typeof message.offset === "number") highest = message.offset;
        addRow("in", String(message.type), message.offset, message.data,
          { nested: true, timestamp: message.timestamp, personal: message.offset === undefined });
      }
      ack(highest);
      return;
    }
    remember(frame);
    addRow("in", type, frame.offset, frame.data, meta);
    if (typeof frame.offset === "number") ack(frame.offset);
  }

  function disconnect(silent) {
    if (socket) {
      const old = socket;
      socket = null;
      old.onclose = null;
      old.onmessage = null;
      old.close(1000);
      if (!silent) note("disconnected by the console");
    }
    setState("idle", "disconnected");
  }

  function connect(resume) {
    const token = take("user");
    const diagnosis = $("diagnosis").value.trim();
    if (!token) {
      note("enter a user token first");
      $("user-token").focus();
      return;
    }
    if (!/^[1-9][0-9]*$/.test(diagnosis)) {
      note("the diagnosis id is a positive integer");
      $("diagnosis").focus();
      return;
    }
    if (resume) {
      $("since").value = seen.offset === null ? "0" : String(seen.offset);
      $("epoch").value = seen.epoch || "";
    }
    disconnect(true);
    const auth = { type: "auth", token: token, device: $("device").value.trim() || "default" };
    const since = $("since").value.trim();
    if (since !== "") auth.since = Number(since);
    const epoch = $("epoch").value.trim();
    if (epoch !== "") auth.epoch = epoch;
    if (resume) {
      $("since").value = "";
      $("epoch").value = "";
    }
    if (!resume) {
      seen.offset = null;
      seen.epoch = null;
    }

    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws/" + diagnosis);
    socket = ws;
    setState("connecting", "connecting…");
    ws.onopen = () => {
      ws.send(JSON.stringify(auth));
      const shown = Object.assign({}, auth, { token: "•••" });
      addRow("out", "auth", null, shown);
      setState("auth", "authenticating…");
    };
    ws.onmessage = receive;
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      addRow("in", "closed", null, { code: event.code, reason: event.reason || "" });
      setState("closed", event.reason ? "closed: " + event.reason : "closed (" + event.code + ")");
    };
  }

  $("connect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    connect(false);
  });
  $("resume").addEventListener("click", () => connect(true));
  $("disconnect").addEventListener("click", () => disconnect(false));
  $("ping").addEventListener("click", () => {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "ping" }));
      addRow("out", "ping", null, { type: "ping" });
    }
  });
  $("clear").addEventListener("click", () => {
    $("frame-rows").replaceChildren();
    frameCount = 0;
    $("frame-count").textContent = "0 frames";
    $("frames-empty").hidden = false;
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
  async function refreshStatus() {
    clearTimeout(statusTimer);
    try {
      const headers = held.service ? { Authorization: "Bearer " + held.service } : {};
      const response = await fetch("/ws/status", { headers: headers, credentials: "omit", cache: "no-store" });
      const status = await response.json();
      $("total-connections").textContent = String(status.connections);
      $("total-diagnoses").textContent = String(status.diagnoses);
      $("total-retained").textContent = String(status.retained_messages);
      $("totals-updated").textContent = "updated " + clock(new Date()).slice(0, 8);
      const mine = status.per_diagnosis && status.per_diagnosis[$("diagnosis").value.trim()];
      $("fact-diagnosis").textContent = mine
        ? mine.connections + " connection(s), " + mine.users + " user(s), offset " + mine.offset
        : status.per_diagnosis ? "no connections" : "–";
    } catch (err) {
      $("totals-updated").textContent = "status unavailable";
    }
    statusTimer = setTimeout(refreshStatus, (config.statusPollSeconds || 3) * 1000);
  }

  setState("idle", "disconnected");
  refreshStatus();
})();
