// The run page, live: follows GET /api/fusion/runs/{id}/events (server-sent events) and
// updates what the server rendered: the DAG's node colours, the timeline's bars, each
// step's status, duration, error, token stream and child steps, then the result. Text
// from the run is only ever set as textContent (never parsed as HTML).
// Should the event stream be unavailable, it polls GET /api/fusion/runs/{id} instead.
(function () {
  "use strict";
  const run = document.getElementById("run");
  if (!run) return;
  const runId = run.dataset.runId;
  const base = "/api/fusion/runs/" + encodeURIComponent(runId);
  // The run with its steps' inputs and outputs (the event stream does not carry them).
  const withIO = base + "?include=io";
  const stepsList = document.getElementById("steps");
  const live = document.getElementById("live");
  const cancelButton = document.getElementById("cancel");
  const timelineSvg = document.querySelector("svg.timeline");
  const SVG = "http://www.w3.org/2000/svg";
  const MAX_TOKENS_CHARS = 100000;
  const POLL_MS = 1500;
  const STATUS_CLASS = /\bstatus-[a-z_]+\b/g;
  const loadedAt = performance.now();
  const elapsedAtLoad = Number(run.dataset.elapsedMs || "0");
  let ended = run.dataset.status !== "running";

  function keyOf(data) {
    if (Array.isArray(data.path) && data.path.length) return data.path.map(String).join("/");
    return String(data.step_id || data.step || "");
  }

  function setStatus(el, status) {
    if (!el) return;
    const cls = (el.getAttribute("class") || "").replace(STATUS_CLASS, "").trim();
    el.setAttribute("class", (cls + " status-" + status).trim());
  }

  function byKey(root, selector, key) {
    return root ? root.querySelector(selector + '[data-step="' + CSS.escape(key) + '"]') : null;
  }

  function formatMs(ms) {
    if (ms === null || ms === undefined) return "";
    if (ms < 1000) return Math.round(ms) + " ms";
    const s = ms / 1000;
    if (s < 120) return s.toFixed(1) + " s";
    return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  }

  function shown(value) {
    return typeof value === "string" ? value : JSON.stringify(value, null, 2);
  }

  // A step's input or output as the server draws it (views.shown): cut at this many
  // characters so a large value cannot make the page slow.
  const MAX_SHOWN_CHARS = 20000;
  const ENDED_STEP = new Set(["completed", "failed", "skipped"]);

  function shownCut(value) {
    const text = shown(value);
    if (text.length <= MAX_SHOWN_CHARS) return text;
    return text.slice(0, MAX_SHOWN_CHARS) + "\n… (" + (text.length - MAX_SHOWN_CHARS) + " more characters)";
  }

  function setLive(text) {
    live.hidden = false;
    live.textContent = text;
  }

  // -- steps ------------------------------------------------------------------------------
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function newStep(key, id, type) {
    const li = el("li", "step status-pending");
    li.dataset.step = key;
    const head = el("div", "step-head");
    const badge = el("span", "badge status-pending", "pending");
    badge.dataset.role = "status";
    const duration = el("span", "step-duration");
    duration.dataset.role = "duration";
    head.append(badge, el("strong", "step-id", id), el("span", "step-type", type || ""), duration);
    const details = el("details", "error");
    details.hidden = true;
    const pre = el("pre", "error-text");
    pre.dataset.role = "error";
    details.append(el("summary", "", "Error"), pre);
    const tokens = el("pre", "tokens");
    tokens.dataset.role = "tokens";
    tokens.hidden = true;
    const children = el("ul", "children");
    children.dataset.role = "children";
    li.append(head, details, tokens, children);
    return li;
  }

  // The step's <li>, created (under its parent step) when the page does not have it yet.
  function stepItem(key, data) {
    let li = byKey(stepsList, "li.step", key);
    if (li) return li;
    const parts = key.split("/");
    const last = parts[parts.length - 1];
    let id = String(data.step_id || data.step || last);
    if (parts.length > 1 && /^\d+$/.test(last)) id += " #" + last; // an item or a pass
    li = newStep(key, id, data.type);
    if (parts.length > 1) {
      const parent = stepItem(parts.slice(0, -1).join("/"), {});
      parent.querySelector(':scope > [data-role="children"]').append(li);
    } else {
      stepsList.append(li);
    }
    return li;
  }

  // The step's collapsed <details class="input|output"> (made when missing), its text set
  // as text (never markup).
  function setIO(li, cls, summary, value) {
    let details = li.querySelector(":scope > details." + cls);
    if (!details) {
      details = el("details", cls);
      details.append(el("summary", "", summary), el("pre"));
      li.insertBefore(details, part(li, "tokens"));
    }
    details.querySelector("pre").textContent = shownCut(value);
  }

  function part(li, role) {
    return li.querySelector(':scope > [data-role="' + role + '"], :scope > * > [data-role="' + role + '"]');
  }

  function updateStep(key, data) {
    const li = stepItem(key, data);
    if (data.status) {
      setStatus(li, data.status);
      const badge = part(li, "status");
      setStatus(badge, data.status);
      badge.textContent = data.status;
    }
    if (data.duration_ms !== undefined && data.duration_ms !== null) {
      part(li, "duration").textContent = formatMs(data.duration_ms);
    }
    if (data.error) {
      const pre = part(li, "error");
      pre.textContent = data.error;
      pre.parentElement.hidden = false;
    }
    // Entries of GET ...?include=io carry the step's rendered input and its output.
    if (data.input !== undefined && data.input !== null) {
      setIO(li, "input", "Inputs (rendered)", data.input);
    }
    if (data.output !== undefined && (data.output !== null || ENDED_STEP.has(data.status))) {
      setIO(li, "output", "Output", data.output);
    }
    if (key.indexOf("/") < 0 && data.status) {
      const node = byKey(document.querySelector("svg.dag"), "g.node", key);
      setStatus(node, data.status);
    }
  }

  // Appended to one text node (no copy of what is there); the oldest text goes past
  // MAX_TOKENS_CHARS.
  function appendTokens(key, delta) {
    const pre = part(stepItem(key, {}), "tokens");
    pre.hidden = false;
    if (!pre.firstChild) pre.append(document.createTextNode(""));
    const text = pre.firstChild;
    text.appendData(delta);
    if (text.length > MAX_TOKENS_CHARS) text.deleteData(0, text.length - MAX_TOKENS_CHARS);
  }

  // -- timeline ---------------------------------------------------------------------------
  const spans = {}; // step -> {start: ms from the first start, duration: ms or null}
  function readSpans() {
    if (!timelineSvg) return;
    for (const bar of timelineSvg.querySelectorAll("g.bar")) {
      const offset = bar.dataset.offsetMs;
      if (offset === undefined || offset === "") continue;
      const duration = bar.dataset.durationMs;
      spans[bar.dataset.step] = {
        start: Number(offset),
        duration: duration === undefined || duration === "" ? null : Number(duration),
      };
    }
  }

  function nowMs() {
    return elapsedAtLoad + (performance.now() - loadedAt);
  }

  function barFor(step) {
    let bar = byKey(timelineSvg, "g.bar", step);
    if (bar) return bar;
    const rowH = Number(timelineSvg.dataset.rowH);
    const rows = timelineSvg.querySelectorAll("g.bar").length;
    bar = document.createElementNS(SVG, "g");
    bar.setAttribute("class", "bar status-pending");
    bar.dataset.step = step;
    bar.setAttribute("transform", "translate(0," + rows * rowH + ")");
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", "0");
    label.setAttribute("y", "15");
    label.setAttribute("class", "bar-label");
    label.textContent = step;
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("y", "4");
    rect.setAttribute("height", String(rowH - 8));
    rect.setAttribute("rx", "2");
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("y", "15");
    text.setAttribute("class", "bar-duration");
    bar.append(label, rect, text);
    timelineSvg.append(bar);
    const height = (rows + 1) * rowH;
    timelineSvg.setAttribute("height", String(height));
    timelineSvg.setAttribute("viewBox", "0 0 " + timelineSvg.getAttribute("width") + " " + height);
    return bar;
  }

  function drawTimeline() {
    if (!timelineSvg) return;
    const labelW = Number(timelineSvg.dataset.labelW);
    const width = Number(timelineSvg.dataset.barsW);
    const now = nowMs();
    let total = 1;
    for (const s of Object.values(spans)) {
      total = Math.max(total, s.start + (s.duration === null ? Math.max(now - s.start, 0) : s.duration));
    }
    const scale = width / total;
    for (const [step, s] of Object.entries(spans)) {
      const bar = barFor(step);
      const ms = s.duration === null ? Math.max(now - s.start, 0) : s.duration;
      const x = labelW + s.start * scale;
      const w = Math.max(ms * scale, 2);
      const rect = bar.querySelector("rect");
      rect.setAttribute("x", x.toFixed(1));
      rect.setAttribute("width", w.toFixed(1));
      const text = bar.querySelector(".bar-duration");
      text.setAttribute("x", (x + w + 6).toFixed(1));
      text.textContent = s.duration === null ? "" : formatMs(s.duration);
    }
  }

  function timelineEvent(name, data) {
    if (!timelineSvg || keyOf(data).indexOf("/") >= 0) return;
    const step = keyOf(data);
    if (name === "step_started" && !spans[step]) {
      spans[step] = { start: nowMs(), duration: null };
      setStatus(barFor(step), "running");
    } else if (name === "step_finished") {
      if (!spans[step]) spans[step] = { start: nowMs(), duration: null };
      spans[step].duration = data.duration_ms === undefined || data.duration_ms === null ? 0 : data.duration_ms;
      setStatus(barFor(step), data.status || "completed");
    }
    drawTimeline();
  }

  function timelineFromTrace(trace) {
    if (!timelineSvg) return;
    const starts = trace.map((e) => (e.started_at ? Date.parse(e.started_at) : NaN));
    const known = starts.filter((t) => !Number.isNaN(t));
    if (!known.length) return;
    const origin = Math.min.apply(null, known);
    trace.forEach((entry, i) => {
      if (Number.isNaN(starts[i])) return;
      spans[entry.step] = { start: starts[i] - origin, duration: entry.duration_ms || 0 };
      setStatus(barFor(entry.step), entry.status);
    });
    drawTimeline();
  }

  // -- the run ----------------------------------------------------------------------------
  function applyEntries(entries) {
    for (const entry of entries || []) {
      const key = keyOf(entry);
      updateStep(key, entry);
      if (entry.children) applyEntries(entry.children.map((c) => (c.path ? c : Object.assign({ path: key.split("/").concat([c.step]) }, c))));
    }
  }

  function applyRun(body) {
    const status = body.status;
    const badge = document.getElementById("run-status");
    setStatus(badge, status);
    badge.textContent = status;
    run.dataset.status = status;
    document.getElementById("run-duration").textContent = formatMs(body.total_latency_ms);
    const error = document.getElementById("run-error");
    error.textContent = body.error || "";
    error.hidden = !body.error;
    if (status !== "running") {
      document.getElementById("run-result").textContent = shown(body.result);
    }
    applyEntries(body.execution_trace);
    timelineFromTrace(body.execution_trace || []);
    if (status !== "running") finish(status);
  }

  function finish(status) {
    ended = true;
    setLive("ended: " + status);
    if (cancelButton) {
      cancelButton.disabled = true;
      cancelButton.hidden = true;
    }
    const reload = document.getElementById("reload");
    if (reload) reload.hidden = true;
  }

  function handle(name, data) {
    const key = keyOf(data);
    if (name === "step_started") {
      updateStep(key, Object.assign({ status: "running" }, data));
      timelineEvent(name, data);
    } else if (name === "step_finished") {
      updateStep(key, data);
      timelineEvent(name, data);
    } else if (name === "token" && typeof data.delta === "string") {
      appendTokens(key, data.delta);
    }
  }

  function fetchIO() {
    fetch(withIO, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => { if (body) applyEntries(body.execution_trace); })
      .catch(() => {});
  }

  function poll() {
    fetch(withIO, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => {
        if (body) applyRun(body);
        if (!ended) setTimeout(poll, POLL_MS);
      })
      .catch(() => { if (!ended) setTimeout(poll, POLL_MS); });
  }

  function follow() {
    const source = new EventSource(base + "/events", { withCredentials: true });
    setLive("live");
    for (const name of ["step_started", "step_finished", "token"]) {
      source.addEventListener(name, (e) => handle(name, JSON.parse(e.data)));
    }
    source.addEventListener("result", (e) => {
      source.close();
      applyRun(JSON.parse(e.data));
      fetchIO();
    });
    source.addEventListener("error", (e) => {
      if (e.data) { // the run's own `error` event: the §7 envelope
        source.close();
        const body = JSON.parse(e.data);
        const box = document.getElementById("run-error");
        box.textContent = (body.error && body.error.message) || "the run failed";
        box.hidden = false;
        poll();
        return;
      }
      // The connection failed (no events route, a refused key): poll instead.
      if (source.readyState === EventSource.CLOSED && !ended) {
        setLive("polling");
        poll();
      }
    });
    setInterval(() => { if (!ended) drawTimeline(); }, 1000);
  }

  // -- cancel -----------------------------------------------------------------------------
  if (cancelButton) {
    cancelButton.addEventListener("click", () => {
      cancelButton.disabled = true;
      fetch(cancelButton.dataset.url, {
        method: "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      })
        .then((r) => r.json().then((body) => ({ ok: r.ok, body: body })))
        .then(({ ok, body }) => {
          if (ok) {
            // The run's body follows as the stream's `result` (or the next poll).
            setLive("cancelling…");
          } else {
            const box = document.getElementById("run-error");
            box.textContent = (body.error && body.error.message) || "could not cancel";
            box.hidden = false;
          }
        })
        .catch(() => { cancelButton.disabled = false; });
    });
  }

  readSpans();
  if (!ended) follow();
})();
