/*
 * Omnigate console: the audit log (/console/audit.html), for admins.
 *
 * Reads GET /api/v1/audit (gateway/desk/audit.py, docs/audit.md) with the console's
 * session: filtered by action, agent (GET /api/v1/agents for the names) and object,
 * newest first, paged back by the answer's next_cursor (sent as ?cursor=). The filters
 * live in the address (?action=…&who=…&target=…) so a view can be bookmarked.
 *
 * Vanilla ES2020, CSP-safe: no inline script or style; text only through textContent.
 */
(function () {
  "use strict";

  const API = "/api/v1";
  const LIMIT = 50;
  const CONTACT_ACTIONS = new Set(["update_contact", "merge"]);  // their object is a contact
  const S = { seq: 0, before: null };

  const { $, h, show, clear } = window.OmnigateDom; // dom.js
  function when(iso) {
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleString([], { dateStyle: "short", timeStyle: "medium" });
  }

  async function api(path) {
    let res;
    try {
      res = await fetch(API + path, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      throw Object.assign(new Error("The gateway cannot be reached."), { status: 0 });
    }
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) throw Object.assign(new Error((data && data.message) || ("HTTP " + res.status)), { status: res.status });
    return data;
  }
  function problem(text, signIn) {
    const el = $("problem");
    clear(el);
    el.append(text, signIn ? " " : "", signIn ? h("a", { href: "./", text: "Open the console" }) : "");
    show(el, true);
    show($("page"), false);
  }

  function filters() {
    const q = new URLSearchParams();
    for (const [key, name] of [["action", "a-action"], ["who", "a-who"], ["target", "a-target"]]) {
      const v = $(name).value.trim();
      if (v) q.set(key, v);
    }
    return q;
  }
  function details(d) {
    const entries = Object.entries(d || {});
    if (!entries.length) return "";
    return entries.map(([k, v]) => k + ": " + (typeof v === "string" ? v : JSON.stringify(v))).join(", ");
  }
  function row(e) {
    const target = e.target
      ? CONTACT_ACTIONS.has(e.action)
        ? h("a", { href: "contacts.html#" + encodeURIComponent(e.target), text: e.target })
        : h("code", { text: e.target })
      : "";
    return h("tr", { "data-c": "audit-row", "data-action": e.action, "data-id": e.id },
      h("td", {}, h("time", { datetime: e.at, text: when(e.at) })),
      h("td", { "data-c": "audit-who", text: e.who ? (e.who.name || e.who.id) : "—" }),
      h("td", { "data-c": "audit-action", text: e.action }),
      h("td", { "data-c": "audit-target" }, target),
      h("td", { title: e.user_agent || "", text: e.ip || "" }),
      h("td", { "data-c": "audit-details" }, h("code", { text: details(e.details) })));
  }

  async function load(more) {
    const seq = ++S.seq;
    const q = filters();
    if (!more) {
      S.before = null;
      history.replaceState(null, "", location.pathname + (q.toString() ? "?" + q.toString() : ""));
    }
    q.set("limit", String(LIMIT));
    if (more && S.before) q.set("cursor", S.before);
    $("audit-status").textContent = "Loading…";
    show($("audit-error"), false);
    try {
      const page = await api("/audit?" + q.toString());
      if (seq !== S.seq) return;
      const rows = $("audit-rows");
      if (!more) clear(rows);
      for (const e of page.items) rows.append(row(e));
      S.before = page.next_cursor;
      show($("audit-more"), Boolean(S.before));
      const n = rows.querySelectorAll('[data-c="audit-row"]').length;
      $("audit-status").textContent = n ? n + " entr" + (n === 1 ? "y" : "ies") + (S.before ? " (older ones below)" : "")
        : "No entries.";
    } catch (e) {
      if (seq !== S.seq) return;
      $("audit-status").textContent = "";
      $("audit-error").textContent = e.message;
      show($("audit-error"), true);
    }
  }

  async function boot() {
    let session;
    try { session = await api("/session"); } catch (e) {
      problem(e.status === 401 ? "Not signed in." : e.message, e.status === 401);
      return;
    }
    const me = session.agent;
    $("me").textContent = me.name + " (" + me.role + ")";
    if (me.role !== "admin") { problem("The audit log is for admins.", false); return; }
    show($("page"), true);
    const q = new URLSearchParams(location.search);
    $("a-action").value = q.get("action") || "";
    $("a-target").value = q.get("target") || "";
    try {
      const agents = await api("/agents");
      for (const a of agents.items || []) $("a-who").append(h("option", { value: a.id, text: a.name }));
    } catch (e) { /* the filter offers anyone only */ }
    $("a-who").value = q.get("who") || "";
    $("audit-filters").addEventListener("submit", (e) => { e.preventDefault(); load(false); });
    $("a-who").addEventListener("change", () => load(false));
    $("a-reset").addEventListener("click", () => {
      $("a-action").value = ""; $("a-who").value = ""; $("a-target").value = ""; load(false);
    });
    $("audit-more").addEventListener("click", () => load(true));
    load(false);
  }
  boot();
})();
