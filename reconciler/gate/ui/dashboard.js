// ailayer dashboard. Plain script, no framework, no build step; every URL is relative so the
// page works under a sub-path behind a reverse proxy. State arrives over Server-Sent Events
// (`events`), the activity log over `logs`; nothing here polls for state changes. Text from
// the server is only ever set with textContent, never parsed as HTML.
// With a token configured, engine output (the log, the engine's last line) needs it, in the
// same Authorization header POST /toggle takes. EventSource cannot send a header, so both
// streams are read with fetch (`stream` below); the token never goes into a URL, where a
// proxy's access log or the browser's history would keep it.
"use strict";

(function () {
  const TOKEN_KEY = "ailayer.token";
  const MAX_LOG_ROWS = 1000;
  // Memory and heartbeat age change without a revision bump; refresh them now and then.
  const VOLATILE_REFRESH_MS = 15000;
  const $ = (id) => document.getElementById(id);

  let info = null;          // GET ui/info: models, whether toggling is possible
  let state = null;         // the last observed state (GET status / event "status")
  let stateAt = 0;          // performance.now() when it arrived
  let logSource = null;     // the /logs stream (its close())
  let stateSource = null;   // the /events stream
  let logStale = false;     // the token changed: reopen the log once the state stream says how it went

  // ---------------------------------------------------------------- formatting

  function text(id, value) {
    const el = $(id);
    const s = value === null || value === undefined || value === "" ? "–" : String(value);
    if (el.textContent !== s) el.textContent = s;
  }

  function duration(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return seconds < 10 ? seconds.toFixed(1) + " s" : s + " s";
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? h + " h " + m + " min" : m + " min " + r + " s";
  }

  function when(iso) {
    if (!iso) return "–";
    const t = Date.parse(iso);
    if (isNaN(t)) return String(iso);
    const ago = (Date.now() - t) / 1000;
    const clock = new Date(t).toLocaleTimeString();
    if (ago >= 0 && ago < 86400) return clock + " (" + duration(ago) + " ago)";
    if (ago < 0 && ago > -86400) return clock + " (in " + duration(-ago) + ")";
    return new Date(t).toLocaleString();
  }

  function bytes(n) {
    if (typeof n !== "number") return null;
    if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(2) + " GiB";
    return (n / 2 ** 20).toFixed(0) + " MiB";
  }

  function obj(v) { return v && typeof v === "object" && !Array.isArray(v) ? v : null; }

  function cell(row, value, attr, attrValue) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined || value === "" ? "–" : String(value);
    if (attr) td.setAttribute(attr, String(attrValue));
    row.appendChild(td);
  }

  // ---------------------------------------------------------------- state

  // Progress as the reconciler reports it (boot.progress = {percent, stage}); read with care,
  // since an older reconciler does not send it.
  function progressOf(st) {
    const boot = obj(st.boot);
    const p = boot && obj(boot.progress);
    const percent = p && typeof p.percent === "number" && isFinite(p.percent)
      ? Math.max(0, Math.min(100, p.percent)) : null;
    const stage = p && typeof p.stage === "string" ? p.stage : (st.last_log_line || "");
    return { percent: percent, stage: stage };
  }

  function elapsedNow(boot) {
    if (!boot || typeof boot.elapsed_s !== "number") return null;
    return boot.elapsed_s + (performance.now() - stateAt) / 1000;
  }

  function renderBoot(st) {
    const boot = obj(st.boot);
    const loading = st.phase === "LOADING" && boot;
    $("boot").hidden = !loading;
    if (!loading) return;
    text("boot-model", st.desired_model);
    const p = progressOf(st);
    const bar = $("bar");
    bar.classList.toggle("unknown", p.percent === null);
    $("bar-fill").style.width = (p.percent === null ? 0 : p.percent) + "%";
    if (p.percent === null) bar.removeAttribute("aria-valuenow");
    else bar.setAttribute("aria-valuenow", String(p.percent));
    text("percent", p.percent === null ? "–" : (Math.round(p.percent * 10) / 10) + "%");
    text("stage", p.stage);
    renderClock();
    text("deadline", when(boot.deadline));
    text("attempt", boot.attempt);
  }

  // The parts that move with time alone: elapsed and the share of the boot budget used.
  function renderClock() {
    if (!state || state.phase !== "LOADING") return;
    const boot = obj(state.boot);
    const elapsed = elapsedNow(boot);
    if (elapsed === null) return;
    const budget = typeof boot.budget_s === "number" && boot.budget_s > 0 ? boot.budget_s : null;
    text("elapsed", duration(elapsed) + (budget ? " of " + duration(budget) + " budget" : ""));
    const used = budget ? Math.min(100, (100 * elapsed) / budget) : 0;
    $("budget-fill").style.width = used.toFixed(2) + "%";
    $("budget-bar").setAttribute("aria-valuenow", used.toFixed(1));
  }

  function renderEngine(st) {
    const e = obj(st.engine) || {};
    text("engine-model", e.model);
    text("engine-served", e.served_name);
    text("engine-pid", e.pid);
    text("engine-pids", Array.isArray(e.pids) && e.pids.length ? e.pids.join(", ") : null);
    text("engine-port", e.port);
    const mem = bytes(e.memory_bytes);
    text("engine-memory", mem ? mem + (e.memory_source ? " (" + e.memory_source + ")" : "") : null);
    const gpu = obj(st.gpu);
    let vram = null;
    if (gpu && Array.isArray(gpu.processes) && Array.isArray(e.pids)) {
      const mine = gpu.processes.filter((g) => g && e.pids.indexOf(g.pid) >= 0);
      if (mine.length) vram = mine.reduce((a, g) => a + (g.used_mib || 0), 0) + " MiB";
    }
    if (!vram && gpu && gpu.observable === false) vram = "not observable";
    text("engine-vram", vram);
    $("engine-vram").title = gpu && gpu.message ? String(gpu.message) : "";
    text("engine-started", e.started_at ? when(e.started_at) + (e.adopted ? ", adopted" : "") : null);
  }

  function renderConditions(st) {
    const body = $("conditions-body");
    body.replaceChildren();
    for (const c of Array.isArray(st.conditions) ? st.conditions : []) {
      if (!obj(c)) continue;
      const tr = document.createElement("tr");
      cell(tr, c.type);
      cell(tr, c.status, "data-status", c.status);
      cell(tr, c.reason);
      cell(tr, c.message);
      cell(tr, when(c.last_transition_time));
      body.appendChild(tr);
    }
  }

  function render(st) {
    state = st;
    stateAt = performance.now();
    const phase = typeof st.phase === "string" ? st.phase : "";
    const badge = $("phase");
    badge.dataset.phase = phase;
    text("phase", phase || "no state");
    document.title = (phase || "?") + " · ailayer";
    text("desired", st.desired_model === null ? "none" : st.desired_model);
    text("active", st.active_model === null ? "none" : st.active_model);
    text("message", st.message);
    text("since", when(st.phase_since));
    text("revision", st.revision);
    const gate = obj(st.gate) || {};
    const age = typeof gate.heartbeat_age_s === "number" ? ", heartbeat " + duration(gate.heartbeat_age_s) + " ago" : "";
    text("reconciler", (gate.reconciler || "unknown") + age);
    const banner = $("stale");
    banner.hidden = !st.stale;
    if (st.stale) {
      banner.textContent = st.phase
        ? "The reconciler is " + (gate.reconciler || "not running") + ": what this page shows may be out of date."
        : "No observed state yet: is the reconciler running? (" + (gate.state_file || "state file") + ")";
    }
    renderBoot(st);
    renderEngine(st);
    const err = obj(st.last_error);
    const et = $("error-text");
    et.textContent = err ? err.reason + ": " + err.message + " (" + when(err.at) + ")" : "none";
    et.dataset.kind = err ? "error" : "";
    renderConditions(st);
    renderButtons();
    // For the benchmark and the browser tests: which revision is on screen, and since when.
    document.body.dataset.revision = String(st.revision === undefined ? "" : st.revision);
    document.body.dataset.renderedAt = String(performance.timeOrigin + performance.now());
    requestAnimationFrame(() => {
      document.body.dataset.frameAt = String(performance.timeOrigin + performance.now());
    });
  }

  // ---------------------------------------------------------------- toggling

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  // A token the streams were refused is not sent again by them (each wrong try counts towards
  // the gate's limit); they fall back to what needs none. A toggle still sends it, and forgets
  // it on 401.
  let refusedToken = "";
  function usableToken() { return token() && token() !== refusedToken ? token() : ""; }
  function authHeaders() { return usableToken() ? { "Authorization": "Bearer " + usableToken() } : {}; }

  function tokenRefused() {
    refusedToken = token();
    renderToken();
    logStale = true;
    connect();  // token-free, then the log's note (see the open handler)
  }

  // ---------------------------------------------------------------- streams

  // Server-Sent Events over fetch, with the token's header: calls on.<event name>(data),
  // on.open(), on.error(status), on.refused(status, retryAfterS); reconnects after the
  // server's `retry:` hint unless closed or refused (401: the caller decides what next).
  function stream(path, on) {
    let closed = false, controller = null, retryMs = 2000;
    async function run() {
      while (!closed) {
        controller = new AbortController();
        let wait = retryMs;
        try {
          const resp = await fetch(path, { headers: authHeaders(), cache: "no-store", signal: controller.signal });
          if (resp.status === 401 || resp.status === 429) {
            const after = Number(resp.headers.get("Retry-After")) || 0;
            if (on.refused) on.refused(resp.status, after);
            if (resp.status === 401) return;
            wait = Math.max(wait, after * 1000);
          } else if (!resp.ok || !resp.body) {
            if (on.error) on.error(resp.status);
          } else {
            if (on.open) on.open();
            await readEvents(resp.body.getReader(), on, (ms) => { retryMs = ms; });
            if (on.error && !closed) on.error(0);
          }
        } catch (exc) {
          if (closed) return;
          if (on.error) on.error(0);
        }
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
    run();
    return { close() { closed = true; if (controller) controller.abort(); } };
  }

  async function readEvents(reader, on, setRetry) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
          else if (line.startsWith("retry: ")) setRetry(Number(line.slice(7)) || 2000);
        }
        if (data.length && on[name]) on[name](JSON.parse(data.join("\n")));
      }
    }
  }

  function say(kind, message) {
    const el = $("toggle-result");
    el.dataset.kind = kind;
    el.textContent = message;
  }

  function renderToken() {
    const refused = token() && token() === refusedToken ? " The gate refused it: check it and enter it again." : "";
    text("token-state", token() ? "A token is set for this tab (kept in sessionStorage)." + refused
      : readsNeedToken() ? "No token entered yet: the activity log and the engine's last line need it."
        : "No token entered yet.");
  }

  function readsNeedToken() { return !!(info && info.reads_need_token); }

  function renderButtons() {
    if (!info) return;
    const enabled = !!(info.toggle && info.toggle.enabled);
    const note = $("toggle-note");
    note.hidden = enabled;
    note.textContent = enabled ? "" : (info.toggle && info.toggle.reason) || "toggling is disabled";
    $("token").disabled = !enabled;
    $("token-save").disabled = !enabled;
    const box = $("buttons");
    const names = info.models.map((m) => m.name).concat([null]);
    if (box.childElementCount !== names.length) {
      box.replaceChildren();
      for (const name of names) {
        const b = document.createElement("button");
        b.type = "button";
        b.dataset.model = name === null ? "" : name;
        b.textContent = name === null ? "none (unload)" : name;
        b.addEventListener("click", () => toggle(name));
        box.appendChild(b);
      }
    }
    for (const b of box.children) {
      const name = b.dataset.model || null;
      b.disabled = !enabled;
      b.title = enabled ? "select " + (name || "no model") : note.textContent;
      b.dataset.desired = String(!!state && state.desired_model === name);
      b.dataset.active = String(!!state && state.phase === "READY" && name !== null && state.active_model === name);
    }
  }

  function errorMessage(body) {
    if (!obj(body)) return null;
    if (obj(body.error)) return body.error.message;
    return typeof body.error === "string" ? body.error : null;
  }

  async function toggle(model) {
    const env = info && info.toggle ? info.toggle.token_env : "AILAYER_TOKEN";
    if (!token()) {
      say("error", "Enter the gate's token first (the value of $" + env + ").");
      $("token").focus();
      return;
    }
    say("", "Asking for " + (model || "no model") + "…");
    let resp, body = null;
    try {
      resp = await fetch("toggle", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token() },
        body: JSON.stringify({ model: model, requested_by: "dashboard" }),
      });
      body = await resp.json().catch(() => null);
    } catch (exc) {
      say("error", "The request did not reach the gate: " + exc.message);
      return;
    }
    if (resp.status === 202) {
      say("ok", "Requested " + (model || "no model") + " (generation " + body.generation + ").");
    } else if (resp.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      renderToken();
      say("error", "Wrong token: the gate refused it (401 Unauthorized). Enter the value of $" + env + ".");
      $("token").focus();
    } else if (resp.status === 429) {
      say("error", "Too many wrong tokens from this address: the gate refuses every token for "
        + (resp.headers.get("Retry-After") || "a few") + " s (429).");
    } else {
      say("error", "The gate refused (" + resp.status + "): " + (errorMessage(body) || resp.statusText));
    }
  }

  // ---------------------------------------------------------------- switches

  async function loadSwitches() {
    let data;
    try {
      data = await (await fetch("switches", { cache: "no-store" })).json();
    } catch (exc) {
      return;
    }
    const body = $("switches-body");
    body.replaceChildren();
    for (const s of Array.isArray(data.switches) ? data.switches : []) {
      const tr = document.createElement("tr");
      cell(tr, when(s.started_at));
      cell(tr, s.from === null ? "none" : s.from);
      cell(tr, s.to === null ? "none" : s.to);
      cell(tr, s.outcome, "data-outcome", s.outcome);
      cell(tr, s.duration_s !== null && s.duration_s !== undefined ? duration(s.duration_s)
        : duration(s.elapsed_s) + " so far");
      body.appendChild(tr);
    }
  }

  // ---------------------------------------------------------------- log

  function logRow(line) {
    const li = document.createElement("li");
    const ts = document.createElement("span");
    ts.className = "ts";
    const t = line.ts ? line.ts.replace(/^.*T/, "").replace(/[+-]\d\d:\d\d$|Z$/, "") : "";
    ts.textContent = t ? t + " " : "";
    const model = document.createElement("span");
    model.className = "model";
    model.dataset.self = String(line.model === "ailayer");
    model.textContent = line.model ? "[" + line.model + "] " : "";
    li.dataset.model = line.model || "";
    li.append(ts, model, (line.pid ? "[" + line.pid + "] " : "") + String(line.msg));
    return li;
  }

  function addLines(lines, reset, dropped) {
    const list = $("log-lines");
    const follow = $("log-follow").checked;
    if (reset) list.replaceChildren();
    const frag = document.createDocumentFragment();
    if (dropped) {
      const gap = document.createElement("li");
      gap.className = "gap";
      gap.textContent = "… " + dropped + " lines skipped (too many too fast)";
      frag.appendChild(gap);
    }
    for (const line of lines.slice(-MAX_LOG_ROWS)) frag.appendChild(logRow(line));
    list.appendChild(frag);
    while (list.childElementCount > MAX_LOG_ROWS) list.firstElementChild.remove();
    if (follow) list.scrollTop = list.scrollHeight;
    document.body.dataset.logRows = String(list.childElementCount);
  }

  function openLog() {
    if (logSource) logSource.close();
    logSource = null;
    if (!info) return;  // loadInfo opens it: whether the log needs the token is in ui/info
    if (readsNeedToken() && !usableToken()) {
      $("log-lines").replaceChildren();
      text("log-file", token() ? "the gate refused the token: the activity log needs the right one"
        : "the activity log shows engine output: enter the token above to see it");
      return;
    }
    const model = $("log-filter").value;
    logSource = stream("logs" + (model ? "?model=" + encodeURIComponent(model) : ""), {
      log: (data) => {
        if (data.backlog) text("log-file", data.file ? "from " + data.file : "no log file yet");
        addLines(Array.isArray(data.lines) ? data.lines : [], !!data.backlog, data.dropped || 0);
      },
      refused: (status, after) => {
        if (status === 401) {
          tokenRefused();
        } else {
          text("log-file", "too many wrong tokens from this address: retrying in " + after + " s");
        }
      },
    });
  }

  function fillLogFilter() {
    const select = $("log-filter");
    const have = new Set(Array.from(select.options).map((o) => o.value));
    for (const m of info.models) {
      if (have.has(m.name)) continue;
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = m.name;
      select.appendChild(o);
    }
  }

  // ---------------------------------------------------------------- wiring

  async function loadInfo() {
    const first = !info;
    try {
      info = await (await fetch("ui/info", { cache: "no-store" })).json();
    } catch (exc) {
      return;
    }
    fillLogFilter();
    renderButtons();
    renderToken();
    if (first) openLog();
  }

  async function refreshVolatile() {
    if (document.hidden) return;
    try {
      const resp = await fetch("status", { cache: "no-store", headers: authHeaders() });
      if (resp.ok) render(await resp.json());
    } catch (exc) {
      /* the event stream reports the outage */
    }
  }

  function connect() {
    const conn = $("conn");
    if (stateSource) stateSource.close();
    stateSource = stream("events", {
      status: (data) => {
        render(data);
        loadSwitches();
      },
      open: () => {
        conn.dataset.conn = "live";
        conn.textContent = "live";
        loadInfo();
        if (logStale) {
          logStale = false;
          openLog();
        }
      },
      error: () => {
        conn.dataset.conn = "down";
        conn.textContent = "gate unreachable, reconnecting…";
      },
      refused: (status, after) => {
        if (status === 401) {
          tokenRefused();
        } else {
          conn.dataset.conn = "down";
          conn.textContent = "too many wrong tokens from this address: retrying in " + after + " s";
        }
      },
    });
  }

  // The token changed: the state stream again, with it or without it, then the log (one
  // wrong token costs one try, not one per stream).
  function reconnect() {
    logStale = true;
    connect();
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    renderToken();
    say("", value ? "Token set; pick a model." : "");
    if (value) reconnect();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    renderToken();
    say("", "Token forgotten.");
    reconnect();
  });
  $("log-filter").addEventListener("change", openLog);

  renderToken();
  loadInfo();
  connect();
  setInterval(renderClock, 1000);
  setInterval(refreshVolatile, VOLATILE_REFRESH_MS);
})();
