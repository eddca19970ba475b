/*
 * Omnigate console: the analytics page (/console/analytics.html).
 *
 * Reads GET /api/v1/analytics (gateway/desk/analytics_api.py, OpenAPI at
 * /api/openapi.json; docs/analytics.md) with the console's session cookie and shows every
 * figure in total and per channel, team, topic, intent, label or agent: tables, plus bars
 * drawn as inline SVG, and a table per agent. An agent in no team is told what they see
 * (the report's note) instead of figures that would silently be zeros.
 * Vanilla ES2020, no dependencies, strict-CSP-safe: no inline script or style, data
 * only ever goes into the page through textContent and attribute values.
 *
 * The period and filters live in the address (?from=…&to=…&channel=…&team=…&topic=…
 * &intent=…&label=…&agent=…&by=…)
 * so a view can be bookmarked or shared.
 */
(function () {
  "use strict";

  const API = "/api/v1";
  const SIGN_IN = "/console/";
  const NONE = "(none)";      // the API's group of outcomes without a team / topic / ...
  const TOTAL = "(total)";    // our row key for the totals
  const CHANNELS = ["webchat", "telegram", "slack", "email"];
  const DIMENSIONS = ["channel", "team", "topic", "intent", "label", "agent"];
  const NAMED = ["agent", "label"];  // dimensions keyed by id: shown by name
  const NO_GROUP = { team: "No team", topic: "No topic", intent: "No intent recognised",
    label: "No label", agent: "No agent" };
  const HEAD = { channel: "Channel", team: "Team", topic: "Topic", intent: "Intent",
    label: "Label", agent: "Agent" };
  const SVG_NS = "http://www.w3.org/2000/svg";
  const DAY = 86400000;

  const el = (name) => document.querySelector('[data-an="' + name + '"]');
  const ui = {
    who: el("who"), form: el("controls"), from: el("from"), to: el("to"),
    channel: el("channel"), team: el("team"), topic: el("topic"), intent: el("intent"),
    label: el("label"), agent: el("agent"), by: el("by"),
    status: el("status"), problem: el("problem"), report: el("report"), period: el("period"),
    note: el("note"), cards: el("cards"), volume: el("volume"), agents: el("agents"),
    reasons: el("reasons"), times: el("times"), sla: el("sla"), csat: el("csat"),
    csatChart: el("csat-chart"),
  };

  const state = { from: null, to: null, channel: "", team: "", topic: "", intent: "", label: "",
    agent: "", by: "channel", preset: "7" };
  const seen = { channel: new Set(CHANNELS), team: new Set(), topic: new Set(), intent: new Set(),
    label: new Set(), agent: new Set() };
  const names = { agent: {}, label: {} };  // id -> name, from the report and the lists
  let me = null;
  let loadSeq = 0;
  let controller = null;
  let lastReport = null;    // shown again when only the breakdown changes

  // ------------------------------------------------------------------- DOM
  const { h } = window.OmnigateDom; // dom.js

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  // A horizontal bar, 0..1 of the cell's width (an SVG, so no style attribute is needed).
  function bar(fraction, label, kind) {
    const f = Number.isFinite(fraction) ? Math.max(0, Math.min(1, fraction)) : 0;
    const s = svg("svg", { class: "an-bar" + (kind ? " an-bar-" + kind : ""), viewBox: "0 0 100 10",
      preserveAspectRatio: "none", role: "img", "aria-label": label });
    s.append(svg("rect", { class: "an-bar-bg", x: 0, y: 0, width: 100, height: 10, rx: 2 }));
    if (f > 0) s.append(svg("rect", { class: "an-bar-fg", x: 0, y: 0, width: (f * 100).toFixed(2), height: 10, rx: 2 }));
    return s;
  }

  // ------------------------------------------------------------ formatting
  function fmtSeconds(s) {
    if (typeof s !== "number") return "—";
    let n = Math.round(s);
    if (n < 60) return n + " s";
    if (n < 3600) { const m = Math.floor(n / 60), r = n % 60; return r ? m + " min " + r + " s" : m + " min"; }
    if (n < 86400) { const hh = Math.floor(n / 3600), m = Math.round((n % 3600) / 60); return m ? hh + " h " + m + " min" : hh + " h"; }
    const d = Math.floor(n / 86400); n = Math.round((n % 86400) / 3600);
    return n ? d + " d " + n + " h" : d + " d";
  }
  function fmtPct(x) { return typeof x === "number" ? Math.round(x * 1000) / 10 + "%" : "—"; }
  function fmtAvg(x) { return typeof x === "number" ? x.toFixed(1) : "—"; }
  function fmtCount(n) { return typeof n === "number" ? String(n) : "—"; }
  function groupLabel(dim, key) {
    if (key === TOTAL) return "Total";
    if (key === NONE) return NO_GROUP[dim] || "Unknown";
    if (NAMED.includes(dim)) return names[dim][key] || (dim === "label" ? "Deleted label" : "Agent " + key);
    return key;
  }
  function pad(n) { return String(n).padStart(2, "0"); }
  function toInput(d) {
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" + pad(d.getHours()) + ":" + pad(d.getMinutes());
  }
  function parseTime(text) {
    if (!text) return null;
    const d = new Date(text); // "YYYY-MM-DDTHH:MM" is local time; ISO with a zone is exact
    return isNaN(d) ? null : d;
  }
  function fmtWhen(d) { return d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" }); }

  // ------------------------------------------------------------ period
  function applyPreset(name) {
    const now = new Date();
    const to = new Date(Math.ceil((now.getTime() + 1) / 60000) * 60000); // the next whole minute
    let from;
    if (name === "today") from = new Date(now.getFullYear(), now.getMonth(), now.getDate());
    else from = new Date(to.getTime() - Number(name) * DAY);
    state.from = from;
    state.to = to;
    state.preset = name;
  }

  function readAddress() {
    const q = new URLSearchParams(location.search);
    const from = parseTime(q.get("from")), to = parseTime(q.get("to"));
    if (from && to) { state.from = from; state.to = to; state.preset = ""; }
    else applyPreset(["today", "7", "30"].includes(q.get("preset")) ? q.get("preset") : "7");
    for (const dim of DIMENSIONS) {
      const v = q.get(dim);
      if (v && v !== NONE) { state[dim] = v; seen[dim].add(v); }
    }
    if (DIMENSIONS.includes(q.get("by"))) state.by = q.get("by");
  }

  function writeAddress() {
    const q = new URLSearchParams();
    if (state.preset) q.set("preset", state.preset);
    else { q.set("from", state.from.toISOString()); q.set("to", state.to.toISOString()); }
    for (const dim of DIMENSIONS) if (state[dim]) q.set(dim, state[dim]);
    if (state.by !== "channel") q.set("by", state.by);
    history.replaceState(null, "", location.pathname + "?" + q.toString());
  }

  function showControls() {
    ui.from.value = toInput(state.from);
    ui.to.value = toInput(state.to);
    for (const b of document.querySelectorAll("[data-preset]")) {
      b.setAttribute("aria-pressed", String(b.dataset.preset === state.preset));
    }
    for (const dim of DIMENSIONS) fillSelect(ui[dim], seen[dim], state[dim], dim);
    ui.by.value = state.by;
  }

  function fillSelect(select, values, current, dim) {
    const shown = (v) => NAMED.includes(dim) ? groupLabel(dim, v) : v;
    const sorted = [...values].filter((v) => v && v !== NONE)
      .sort((a, b) => shown(a).localeCompare(shown(b)));
    if (current && !sorted.includes(current)) sorted.push(current);
    const options = [h("option", { value: "", text: "All" })];
    for (const v of sorted) options.push(h("option", { value: v, text: shown(v) }));
    select.replaceChildren(...options);
    select.value = current || "";
  }

  // ------------------------------------------------------------ messages
  function setStatus(text) { ui.status.textContent = text; }

  function showProblem(kind, title, detail, link) {
    ui.report.hidden = true;
    ui.problem.hidden = false;
    ui.problem.dataset.kind = kind;
    ui.problem.replaceChildren(
      h("strong", { class: "an-problem-title", text: title }),
      detail ? h("span", { class: "an-problem-detail", text: " " + detail }) : null,
      link ? h("a", { href: link.href, class: "an-problem-link", text: link.text }) : null,
    );
    setStatus("");
  }

  function clearProblem() {
    ui.problem.hidden = true;
    ui.problem.replaceChildren();
    delete ui.problem.dataset.kind;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      return body && typeof body.message === "string" ? body.message : "";
    } catch (e) { return ""; }
  }

  // One refusal or failure, explained. Returns true if it was one.
  async function explain(response) {
    if (response.ok) return false;
    const message = await errorMessage(response);
    if (response.status === 401) {
      showProblem("signin", "You are not signed in.", "Sign in at the console, then come back.",
        { href: SIGN_IN, text: "Sign in" });
    } else if (response.status === 403) {
      const role = me && me.role === "designer" ? "Bot designers cannot see analytics." : "Not allowed.";
      showProblem("forbidden", role, message);
    } else if (response.status === 400) {
      showProblem("bad", "The period or a filter is not valid.", message);
    } else if (response.status === 503) {
      showProblem("unavailable", "The gateway's store is unavailable.", "Try again in a moment.");
    } else {
      showProblem("error", "Could not load the analytics (HTTP " + response.status + ").", message);
    }
    return true;
  }

  // ------------------------------------------------------------ loading
  async function signIn() {
    let response;
    try {
      response = await fetch(API + "/session", { headers: { Accept: "application/json" } });
    } catch (e) {
      showProblem("network", "Could not reach the gateway.", "Check the connection and reload.");
      return false;
    }
    if (await explain(response)) return false;
    me = (await response.json()).agent;
    ui.who.textContent = me.name + " (" + me.role + ")";
    for (const t of me.teams || []) seen.team.add(t);
    names.agent[me.id] = me.name;
    if (me.role === "admin") {
      try { // every agent and their teams, for the agent and team filters
        const r = await fetch(API + "/agents", { headers: { Accept: "application/json" } });
        if (r.ok) {
          for (const a of (await r.json()).items || []) {
            for (const t of a.teams || []) seen.team.add(t);
            if (a.role !== "designer") { seen.agent.add(a.id); names.agent[a.id] = a.name; }
          }
        }
      } catch (e) { /* the filters still offer what reports show */ }
    } else {
      seen.agent.add(me.id); // agents see their own figures only
    }
    try { // the labels, by name, for the label filter
      const r = await fetch(API + "/labels", { headers: { Accept: "application/json" } });
      if (r.ok) for (const l of (await r.json()).items || []) { seen.label.add(l.id); names.label[l.id] = l.name; }
    } catch (e) { /* the filter still offers the labels seen in reports */ }
    return true;
  }

  async function load() {
    if (!(state.from < state.to)) {
      showProblem("bad", "The period is not valid.", "“From” must be before “To”.");
      return;
    }
    writeAddress();
    const mine = ++loadSeq;
    if (controller) controller.abort();
    controller = new AbortController();
    const q = new URLSearchParams({ from: state.from.toISOString(), to: state.to.toISOString() });
    for (const dim of DIMENSIONS) if (state[dim]) q.set(dim, state[dim]);
    setStatus("Loading…");
    document.body.dataset.loading = "true";
    let response, report;
    try {
      response = await fetch(API + "/analytics?" + q.toString(),
        { headers: { Accept: "application/json" }, signal: controller.signal });
      if (mine !== loadSeq) return;
      if (await explain(response)) return;
      report = await response.json();
    } catch (e) {
      if (mine !== loadSeq) return;
      showProblem("network", "Could not reach the gateway.", "Check the connection and try again.");
      return;
    } finally {
      if (mine === loadSeq) delete document.body.dataset.loading;
    }
    if (mine !== loadSeq) return;
    clearProblem();
    render(report);
    setStatus("Updated " + new Date().toLocaleTimeString());
  }

  // ------------------------------------------------------------ rendering
  function rowsOf(report, pick) {
    const groups = report["by_" + state.by] || {};
    const rows = [{ key: TOTAL, fig: pick(report.total) }];
    for (const key of Object.keys(groups).sort()) rows.push({ key, fig: pick(groups[key]) });
    return rows;
  }

  // columns: [{key, label, value(row) -> {text, raw?, node?}}]
  function table(caption, columns, rows) {
    const head = h("tr", null, h("th", { scope: "col", text: headLabel() }),
      ...columns.map((c) => h("th", { scope: "col", class: c.num ? "an-num" : null, text: c.label })));
    const body = rows.map((row) => h("tr", { "data-group": row.key, class: row.key === TOTAL ? "an-total" : null },
      h("th", { scope: "row", text: groupLabel(state.by, row.key) }),
      ...columns.map((c) => {
        const v = c.value(row);
        const td = h("td", { "data-fig": c.key, class: c.num ? "an-num" : null });
        if (v.raw !== undefined && v.raw !== null) td.dataset.raw = String(v.raw);
        if (v.node) td.append(v.node);
        else td.textContent = v.text;
        return td;
      })));
    return h("table", null, h("caption", { class: "an-sr", text: caption }), h("thead", null, head), h("tbody", null, ...body));
  }
  function headLabel() { return HEAD[state.by] || "Group"; }
  const maxOf = (rows, get) => Math.max(0, ...rows.filter((r) => r.key !== TOTAL).map(get).filter((x) => typeof x === "number"));

  function renderCards(report) {
    const t = report.total, started = Object.values(report.started || {}).reduce((a, b) => a + b, 0);
    const breaches = t.sla.first_response_breaches + t.sla.resolution_breaches;
    const cards = [
      ["started", "Started", String(started), started],
      ["ended", "Ended", String(t.volume.ended), t.volume.ended],
      ["containment", "Bot containment", fmtPct(t.volume.containment_rate), t.volume.containment_rate],
      ["handed_off", "Handed to agents", String(t.volume.handed_off), t.volume.handed_off],
      ["abandoned", "Abandoned", String(t.volume.abandoned), t.volume.abandoned],
      ["first_response", "First response (median)", fmtSeconds(t.times.first_response.median_seconds), t.times.first_response.median_seconds],
      ["resolution", "Resolution (median)", fmtSeconds(t.times.resolution.median_seconds), t.times.resolution.median_seconds],
      ["sla_breaches", "SLA breaches", String(breaches), breaches],
      ["csat", "CSAT (" + t.csat.answered + " answers)", fmtAvg(t.csat.average), t.csat.average],
    ];
    ui.cards.replaceChildren(...cards.map(([key, label, text, raw]) =>
      h("div", { class: "an-card", "data-card": key },
        h("span", { class: "an-card-label", text: label }),
        h("strong", { class: "an-card-value", "data-raw": raw === null ? "" : String(raw), text }))));
  }

  function renderVolume(report) {
    const rows = rowsOf(report, (f) => f.volume);
    const started = report.started || {};
    const total = Object.values(started).reduce((a, b) => a + b, 0);
    const most = maxOf(rows, (r) => r.fig.ended);
    ui.volume.replaceChildren(table("Conversations per " + state.by, [
      { key: "started", label: "Started", num: true, value: (r) => {
        const n = r.key === TOTAL ? total : state.by === "channel" ? (started[r.key] || 0) : null;
        return { text: fmtCount(n), raw: n };
      } },
      { key: "ended", label: "Ended", num: true, value: (r) => ({ text: String(r.fig.ended), raw: r.fig.ended }) },
      { key: "bot_contained", label: "Bot contained", num: true, value: (r) => ({ text: String(r.fig.bot_contained), raw: r.fig.bot_contained }) },
      { key: "handed_off", label: "Handed off", num: true, value: (r) => ({ text: String(r.fig.handed_off), raw: r.fig.handed_off }) },
      { key: "containment", label: "Containment", num: true, value: (r) => ({ text: fmtPct(r.fig.containment_rate), raw: r.fig.containment_rate }) },
      { key: "abandoned", label: "Abandoned", num: true, value: (r) => ({ text: String(r.fig.abandoned), raw: r.fig.abandoned }) },
      { key: "abandoned_in", label: "Abandoned with", value: (r) => ({ text: abandonedIn(r.fig) }) },
      { key: "containment_bar", label: "Contained / ended", value: (r) => ({
        node: bar(r.fig.containment_rate, "containment " + fmtPct(r.fig.containment_rate), "good") }) },
      { key: "ended_bar", label: "Share of ended", value: (r) => ({
        node: r.key === TOTAL ? document.createTextNode("") : bar(most ? r.fig.ended / most : 0, r.fig.ended + " ended") }) },
    ], rows));
  }

  function abandonedIn(volume) {
    const a = volume.abandoned_in || {};
    const parts = [["bot", "the bot"], ["queued", "the queue"], ["agent", "an agent"]]
      .filter(([k]) => a[k]).map(([k, label]) => label + " " + a[k]);
    return parts.length ? parts.join(", ") : "—";
  }

  // One row per agent, whatever the breakdown: handled, abandoned, times, CSAT.
  function renderAgents(report) {
    const groups = report.by_agent || {};
    const keys = Object.keys(groups).sort((a, b) => (a === NONE) - (b === NONE) ||
      groupLabel("agent", a).localeCompare(groupLabel("agent", b)));
    const head = h("tr", null, h("th", { scope: "col", text: "Agent" }),
      ...[["Handled", true], ["Abandoned", true], ["First response, median", true],
        ["Resolution, median", true], ["CSAT", true], ["Answers", true]]
        .map(([label, num]) => h("th", { scope: "col", class: num ? "an-num" : null, text: label })));
    const cell = (key, text, raw) => h("td", { "data-fig": key, class: "an-num",
      "data-raw": raw === null || raw === undefined ? "" : String(raw), text });
    const rows = keys.map((key) => {
      const f = groups[key];
      return h("tr", { "data-group": key },
        h("th", { scope: "row", text: groupLabel("agent", key) }),
        cell("handled", String(f.volume.ended), f.volume.ended),
        cell("abandoned", String(f.volume.abandoned), f.volume.abandoned),
        cell("first_response", fmtSeconds(f.times.first_response.median_seconds), f.times.first_response.median_seconds),
        cell("resolution", fmtSeconds(f.times.resolution.median_seconds), f.times.resolution.median_seconds),
        cell("csat", fmtAvg(f.csat.average), f.csat.average),
        cell("csat_answered", String(f.csat.answered), f.csat.answered));
    });
    if (!rows.length) {
      rows.push(h("tr", null, h("td", { class: "an-empty", colspan: "7", text: "No conversation ended with an agent in the period" })));
    }
    ui.agents.replaceChildren(h("table", null, h("caption", { class: "an-sr", text: "Figures per agent" }),
      h("thead", null, head), h("tbody", null, ...rows)));
  }

  function renderReasons(report) {
    const rows = rowsOf(report, (f) => f.handoff_reasons || {});
    const body = [];
    for (const row of rows) {
      const entries = Object.entries(row.fig);
      const sum = entries.reduce((a, [, n]) => a + n, 0);
      const label = groupLabel(state.by, row.key);
      if (!entries.length) {
        body.push(h("tr", { "data-group": row.key, class: row.key === TOTAL ? "an-total" : null },
          h("th", { scope: "row", text: label }), h("td", { class: "an-empty", colspan: "3", text: "No handoffs" })));
        continue;
      }
      entries.forEach(([reason, n], i) => {
        body.push(h("tr", { "data-group": row.key, "data-reason": reason, class: row.key === TOTAL ? "an-total" : null },
          i === 0 ? h("th", { scope: "rowgroup", rowspan: String(entries.length), text: label }) : null,
          h("td", { "data-fig": "reason", text: reason === NONE ? "No reason given" : reason }),
          h("td", { "data-fig": "count", class: "an-num", "data-raw": String(n), text: String(n) }),
          h("td", { "data-fig": "share" }, bar(sum ? n / sum : 0, fmtPct(sum ? n / sum : null) + " of handoffs"))));
      });
    }
    ui.reasons.replaceChildren(h("table", null, h("caption", { class: "an-sr", text: "Handoff reasons per " + state.by }),
      h("thead", null, h("tr", null, h("th", { scope: "col", text: headLabel() }), h("th", { scope: "col", text: "Reason" }),
        h("th", { scope: "col", class: "an-num", text: "Handoffs" }), h("th", { scope: "col", text: "Share" }))),
      h("tbody", null, ...body)));
  }

  function renderTimes(report) {
    const rows = rowsOf(report, (f) => f.times);
    const most = Math.max(0, ...rows.map((r) => r.fig.resolution.p90_seconds || 0));
    const dur = (pick, which) => (r) => {
      const s = r.fig[pick][which];
      return { text: fmtSeconds(s), raw: s };
    };
    ui.times.replaceChildren(table("Response times per " + state.by, [
      { key: "first_response_count", label: "Answered", num: true, value: (r) => ({ text: String(r.fig.first_response.count), raw: r.fig.first_response.count }) },
      { key: "first_response_median", label: "First response, median", num: true, value: dur("first_response", "median_seconds") },
      { key: "first_response_p90", label: "First response, p90", num: true, value: dur("first_response", "p90_seconds") },
      { key: "resolution_count", label: "Resolved", num: true, value: (r) => ({ text: String(r.fig.resolution.count), raw: r.fig.resolution.count }) },
      { key: "resolution_median", label: "Resolution, median", num: true, value: dur("resolution", "median_seconds") },
      { key: "resolution_p90", label: "Resolution, p90", num: true, value: dur("resolution", "p90_seconds") },
      { key: "resolution_bar", label: "Resolution (median, p90)", value: (r) => {
        const wrap = h("div", { class: "an-bars" });
        wrap.append(bar(most ? (r.fig.resolution.median_seconds || 0) / most : 0, "median " + fmtSeconds(r.fig.resolution.median_seconds)),
          bar(most ? (r.fig.resolution.p90_seconds || 0) / most : 0, "p90 " + fmtSeconds(r.fig.resolution.p90_seconds), "light"));
        return { node: wrap };
      } },
    ], rows));
  }

  function renderSla(report) {
    const rows = rowsOf(report, (f) => f.sla);
    ui.sla.replaceChildren(table("SLA breaches per " + state.by, [
      { key: "with_sla", label: "With SLA targets", num: true, value: (r) => ({ text: String(r.fig.with_sla), raw: r.fig.with_sla }) },
      { key: "first_response_breaches", label: "First response breached", num: true, value: (r) => ({ text: String(r.fig.first_response_breaches), raw: r.fig.first_response_breaches }) },
      { key: "resolution_breaches", label: "Resolution breached", num: true, value: (r) => ({ text: String(r.fig.resolution_breaches), raw: r.fig.resolution_breaches }) },
      { key: "breach_bar", label: "Breached / with SLA", value: (r) => {
        const n = r.fig.first_response_breaches + r.fig.resolution_breaches;
        return { node: bar(r.fig.with_sla ? n / (2 * r.fig.with_sla) : 0, n + " breaches of " + 2 * r.fig.with_sla + " targets", "bad") };
      } },
    ], rows));
  }

  function renderCsat(report) {
    const rows = rowsOf(report, (f) => f.csat);
    const dist = report.total.csat.distribution || {};
    const most = Math.max(0, ...Object.values(dist));
    // the total distribution as a small column chart
    const chart = svg("svg", { class: "an-columns", viewBox: "0 0 250 120", role: "img",
      "aria-label": "CSAT answers per score: " + [1, 2, 3, 4, 5].map((s) => s + ": " + (dist[s] || 0)).join(", ") });
    [1, 2, 3, 4, 5].forEach((score, i) => {
      const n = dist[score] || 0, height = most ? (n / most) * 80 : 0, x = 15 + i * 47;
      chart.append(svg("rect", { class: "an-col an-col-" + score, x, y: 95 - height, width: 32, height }));
      const count = svg("text", { x: x + 16, y: 90 - height, "text-anchor": "middle", class: "an-col-n" });
      count.textContent = String(n);
      const label = svg("text", { x: x + 16, y: 112, "text-anchor": "middle", class: "an-col-label" });
      label.textContent = String(score);
      chart.append(count, label);
    });
    ui.csatChart.replaceChildren(h("p", { class: "an-hint", text: "Answers per score (1 = bad, 5 = great), whole period" }), chart);
    const columns = [
      { key: "asked", label: "Asked", num: true, value: (r) => ({ text: String(r.fig.asked), raw: r.fig.asked }) },
      { key: "answered", label: "Answered", num: true, value: (r) => ({ text: String(r.fig.answered), raw: r.fig.answered }) },
      { key: "average", label: "Average", num: true, value: (r) => ({ text: fmtAvg(r.fig.average), raw: r.fig.average }) },
    ];
    for (const score of [1, 2, 3, 4, 5]) {
      columns.push({ key: "d" + score, label: score + " ★", num: true,
        value: (r) => { const n = (r.fig.distribution || {})[score] || 0; return { text: String(n), raw: n }; } });
    }
    columns.push({ key: "average_bar", label: "Average of 5", value: (r) => ({
      node: bar(typeof r.fig.average === "number" ? r.fig.average / 5 : 0, "average " + fmtAvg(r.fig.average) + " of 5", "good") }) });
    ui.csat.replaceChildren(table("CSAT per " + state.by, columns, rows));
  }

  function render(report) {
    Object.assign(names.agent, report.agent_names || {});
    Object.assign(names.label, report.label_names || {});
    for (const dim of DIMENSIONS) for (const key of Object.keys(report["by_" + dim] || {})) seen[dim].add(key);
    showControls();
    ui.note.hidden = !report.note;
    ui.note.textContent = report.note || "";
    ui.period.textContent = "From " + fmtWhen(new Date(report.period.start)) + " to " + fmtWhen(new Date(report.period.end)) +
      (DIMENSIONS.some((dim) => state[dim]) ? " · filtered" : "");
    renderCards(report);
    renderVolume(report);
    renderAgents(report);
    renderReasons(report);
    renderTimes(report);
    renderSla(report);
    renderCsat(report);
    ui.report.hidden = false;
    lastReport = report;
  }

  // ------------------------------------------------------------ events
  ui.form.addEventListener("submit", (e) => e.preventDefault());
  for (const b of document.querySelectorAll("[data-preset]")) {
    b.addEventListener("click", () => { applyPreset(b.dataset.preset); showControls(); load(); });
  }
  for (const input of [ui.from, ui.to]) {
    input.addEventListener("change", () => {
      const from = parseTime(ui.from.value), to = parseTime(ui.to.value);
      if (!from || !to) return;
      state.from = from;
      state.to = to;
      state.preset = "";
      showControls();
      load();
    });
  }
  for (const dim of DIMENSIONS) {
    ui[dim].addEventListener("change", () => { state[dim] = ui[dim].value; load(); });
  }
  ui.by.addEventListener("change", () => {
    state.by = ui.by.value;
    writeAddress();
    if (lastReport && ui.problem.hidden) render(lastReport);
  });

  // ------------------------------------------------------------ start
  async function start() {
    readAddress();
    showControls();
    if (await signIn()) {
      showControls();
      await load();
    }
  }
  start();
})();
