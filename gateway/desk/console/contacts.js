/*
 * Omnigate console: the contacts page (/console/contacts.html#<contact id>).
 *
 * For agents and admins, with the console's session (sign in at /console/). Finds contacts
 * (GET /api/v1/search/contacts?q=; without q the newest), shows one: name, email, phone
 * and notes, edited in place (PATCH /api/v1/contacts/{id} with the fields changed, an
 * emptied field sent as null, which clears it; a 400's message is shown as it is), its
 * channel identities, and its timeline on every channel (GET .../timeline, paged back
 * by next_cursor). Merges: another contact merged into this one (POST .../merge, a second
 * click confirms), the merges into it (GET .../merges) and undo (POST /merges/{id}/undo,
 * a second click confirms; a 409 says why it can no longer be exact).
 *
 * Vanilla ES2020, CSP-safe: no inline script or style; text only through textContent.
 */
(function () {
  "use strict";

  const API = "/api/v1";
  const ARM_MS = 5000;  // a second click within this long confirms
  const FIELDS = ["name", "email", "phone", "notes"];
  const CHANNELS = {
    webchat: { label: "Web", title: "Web chat" },
    telegram: { label: "TG", title: "Telegram" },
    slack: { label: "Slack", title: "Slack" },
    email: { label: "Mail", title: "Email" },
  };

  const S = { me: null, csrf: null, id: null, contact: null, cursor: null, seq: 0, searchSeq: 0,
    timer: null, names: new Map() };

  // ------------------------------------------------------------------ DOM
  const { $, h, show, clear } = window.OmnigateDom; // dom.js
  function say(name, err) {
    const el = $(name);
    el.textContent = err ? err.message || String(err) : "";
    show(el, Boolean(err));
  }
  function when(iso) {
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  }
  function badge(channel) {
    const known = CHANNELS[channel] || { label: String(channel || "?"), title: String(channel || "unknown") };
    return h("span", { class: "c-ch c-ch-" + (CHANNELS[channel] ? channel : "other"),
      "data-channel": channel, title: known.title, text: known.label });
  }
  function profileValue(contact, key) {
    const raw = contact && contact.profile ? contact.profile[key] : undefined;
    if (raw && typeof raw === "object" && "value" in raw) return raw.value === null ? "" : String(raw.value);
    return raw === undefined || raw === null ? "" : String(raw);
  }
  function fieldValue(contact, key) { return key === "name" ? (contact.name || "") : profileValue(contact, key); }
  function displayName(contact) {
    if (contact.name) return contact.name;
    const named = (contact.identities || []).find((i) => i.display_name);
    return named ? named.display_name : "Contact " + String(contact.id).slice(-6);
  }

  // A button that asks once more in place: the first click arms it (for ARM_MS), the
  // second runs `action`; leaving it disarms it.
  function confirmButton(label, armedLabel, attrs, action) {
    let armed = null;
    const button = h("button", { type: "button", ...attrs, text: label });
    const disarm = () => {
      clearTimeout(armed); armed = null; button.textContent = label;
      button.classList.remove("k-armed"); delete button.dataset.armed;
    };
    button.addEventListener("blur", disarm);
    button.addEventListener("click", async () => {
      if (!armed) {
        button.textContent = armedLabel;
        button.dataset.armed = "true";
        button.classList.add("k-armed");
        armed = setTimeout(disarm, ARM_MS);
        return;
      }
      disarm();
      button.disabled = true;
      try { await action(); } finally { button.disabled = false; }
    });
    return button;
  }

  // ------------------------------------------------------------------ REST
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET" && S.csrf) headers["X-CSRF-Token"] = S.csrf;
    let res;
    try {
      res = await fetch(API + path, { method, headers, credentials: "same-origin", cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {
      throw new ApiError(0, "The gateway cannot be reached.");
    }
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) {
      if (res.status === 401 && path !== "/session") problem("Your session ended: sign in again in the console.");
      throw new ApiError(res.status, (data && data.message) || ("HTTP " + res.status));
    }
    return data;
  }
  function problem(text) {
    const el = $("problem");
    clear(el);
    el.append(text + " ", h("a", { href: "./", text: "Open the console" }));
    show(el, true);
    show($("page"), false);
  }

  // ---------------------------------------------------------------- search
  function contactRow(contact, attrs) {
    const channels = h("span", { class: "k-channels" });
    for (const i of contact.identities || []) channels.append(badge(i.channel), " ");
    const sub = [profileValue(contact, "email"), profileValue(contact, "phone")].filter(Boolean).join(" · ");
    return [h("span", { "data-c": "contact-row-name", text: displayName(contact) }), channels,
      sub ? h("span", { class: "k-sub", text: sub }) : null];
  }
  async function search() {
    const mine = ++S.searchSeq;
    const q = $("contact-q").value.trim();
    $("contact-status").textContent = "Searching…";
    try {
      const out = await api("GET", "/search/contacts?limit=50" + (q ? "&q=" + encodeURIComponent(q) : ""));
      if (mine !== S.searchSeq) return;
      const list = $("contact-results");
      clear(list);
      for (const c of out.items) {
        S.names.set(c.id, displayName(c));
        list.append(h("li", {}, h("a", { href: "#" + encodeURIComponent(c.id), "data-c": "contact-row",
          "data-id": c.id, "aria-current": c.id === S.id ? "true" : null }, ...contactRow(c))));
      }
      $("contact-status").textContent = out.items.length ? (q ? out.items.length + " found" : "Newest contacts")
        : "No contacts found.";
    } catch (e) {
      if (mine === S.searchSeq) $("contact-status").textContent = e.message;
    }
  }
  function markCurrent() {
    for (const a of document.querySelectorAll('[data-c="contact-row"]')) {
      if (a.dataset.id === S.id) a.setAttribute("aria-current", "true"); else a.removeAttribute("aria-current");
    }
  }

  // --------------------------------------------------------------- contact
  async function openContact(id) {
    const seq = ++S.seq;
    S.id = id;
    markCurrent();
    say("contact-error", null); say("save-error", null); say("merge-error", null);
    $("save-status").textContent = "";
    clear($("merge-candidates"));
    $("merge-q").value = "";
    if (!id) { show($("contact"), false); show($("contact-empty"), true); return; }
    show($("contact-empty"), false);
    show($("contact"), true);
    try {
      const contact = await api("GET", "/contacts/" + encodeURIComponent(id));
      if (seq !== S.seq) return;
      renderContact(contact);
      await Promise.all([loadMerges(seq), loadTimeline(seq, true)]);
    } catch (e) {
      if (seq === S.seq) say("contact-error", e.status === 404 ? new Error("No such contact.") : e);
    }
  }
  function renderContact(contact, saved) {
    // The same contact again (after a merge or an undo): what is being typed stays;
    // `saved`: the answer to a save, shown as the server keeps it.
    const before = !saved && S.contact && S.contact.id === contact.id ? S.contact : null;
    const typing = new Map(before ? FIELDS.filter((key) => $("f-" + key).value.trim() !== fieldValue(before, key))
      .map((key) => [key, $("f-" + key).value]) : []);
    S.contact = contact;
    S.names.set(contact.id, displayName(contact));
    $("contact-title").textContent = displayName(contact);
    const form = $("contact");
    form.dataset.id = contact.id;
    for (const key of FIELDS) $("f-" + key).value = typing.has(key) ? typing.get(key) : fieldValue(contact, key);
    const ids = $("identities");
    clear(ids);
    for (const i of contact.identities || []) {
      ids.append(h("li", { "data-c": "identity", "data-channel": i.channel }, badge(i.channel), " ",
        h("span", { text: i.display_name || i.external_id }),
        i.display_name ? h("span", { class: "c-muted", text: " " + i.external_id }) : null,
        i.reachable ? null : h("span", { class: "c-muted", text: " (unreachable)" })));
    }
    if (!(contact.identities || []).length) ids.append(h("li", { class: "c-muted", text: "None." }));
  }

  // The server's 400 says which field and why; a pattern it did not match is said in
  // words here (other messages are shown as they are).
  const PATTERN_HINT = {
    email: "The email address does not look right (like name@example.com).",
    phone: "The phone number does not look right: 4 to 30 digits, spaces and + ( ) - . / only.",
  };
  function readable(err) {
    if (err.status !== 400) return err;
    const parts = String(err.message).split("; ").map((part) => {
      const m = /^(email|phone): String should match pattern/.exec(part);
      return m ? PATTERN_HINT[m[1]] : part;
    });
    return new Error(parts.join(" "));
  }

  async function save(e) {
    e.preventDefault();
    const contact = S.contact;
    if (!contact) return;
    const changes = {};
    for (const key of FIELDS) {
      const value = $("f-" + key).value.trim();
      if (value !== fieldValue(contact, key)) changes[key] = value === "" ? null : value;
    }
    say("save-error", null);
    if (!Object.keys(changes).length) { $("save-status").textContent = "Nothing changed."; return; }
    $("save").disabled = true;
    $("save-status").textContent = "Saving…";
    try {
      const out = await api("PATCH", "/contacts/" + encodeURIComponent(contact.id), changes);
      if (S.contact && S.contact.id === out.id) renderContact(out, true);
      $("save-status").textContent = "Saved.";
    } catch (err) {
      $("save-status").textContent = "";
      say("save-error", readable(err));
    } finally {
      $("save").disabled = false;
    }
  }

  // -------------------------------------------------------------- timeline
  async function loadTimeline(seq, fresh) {
    const list = $("contact-timeline");
    const q = "?limit=50" + (!fresh && S.cursor ? "&cursor=" + encodeURIComponent(S.cursor) : "");
    const page = await api("GET", "/contacts/" + encodeURIComponent(S.id) + "/timeline" + q);
    if (seq !== S.seq) return;
    if (fresh) clear(list);
    for (const item of page.items) list.append(renderItem(item));
    S.cursor = page.has_more ? page.next_cursor : null;
    show($("timeline-more"), Boolean(S.cursor));
    list.dataset.loaded = "true";
    if (fresh && !page.items.length) list.append(h("li", { class: "c-muted", text: "Nothing yet." }));
  }
  function renderItem(item) {
    const role = (item.sender && item.sender.role) || "system";
    const sender = item.sender && item.sender.name ? item.sender.name
      : role === "customer" ? "Customer" : role === "bot" ? "Bot" : role === "agent" ? "Agent" : "System";
    const text = item.type === "event" ? (item.text || item.name || "event")
      : item.text || (item.value ? "[" + item.value + "]" : "");
    return h("li", { "data-c": "timeline-item", "data-id": item.id, "data-role": role,
      "data-channel": item.channel, "data-conversation": item.conversation_id },
      h("div", { class: "k-head" }, badge(item.channel), h("span", { text: sender }),
        item.private ? h("span", { text: "· private note" }) : null,
        h("time", { datetime: item.created_at, text: when(item.created_at) }),
        item.conversation_id ? h("a", { href: "./#conversation=" + encodeURIComponent(item.conversation_id),
          "data-c": "timeline-conversation", title: "Open this conversation in the console", text: "conversation" }) : null),
      h("div", { class: "k-text", "data-c": "timeline-text", text }));
  }

  // ---------------------------------------------------------------- merges
  async function findCandidates(e) {
    e.preventDefault();
    const q = $("merge-q").value.trim();
    const list = $("merge-candidates");
    say("merge-error", null);
    try {
      const out = await api("GET", "/search/contacts?limit=20" + (q ? "&q=" + encodeURIComponent(q) : ""));
      clear(list);
      const others = out.items.filter((c) => c.id !== S.id);
      for (const c of others) {
        S.names.set(c.id, displayName(c));
        list.append(h("li", { "data-c": "merge-candidate", "data-id": c.id },
          h("div", { class: "k-cand" }, ...contactRow(c),
            confirmButton("Merge into this contact", "Merge: sure? Click again",
              { "data-c": "merge-go", "aria-label": "Merge " + displayName(c) + " into this contact" },
              () => merge(c)))));
      }
      if (!others.length) list.append(h("li", { class: "c-muted", text: "No other contact found." }));
    } catch (err) { say("merge-error", err); }
  }
  async function merge(other) {
    const id = S.id;
    say("merge-error", null);
    try {
      await api("POST", "/contacts/" + encodeURIComponent(id) + "/merge", { contact_id: other.id });
    } catch (err) { say("merge-error", err); return; }
    if (S.id !== id) return;
    clear($("merge-candidates"));
    $("merge-q").value = "";
    await openContact(id);
    search();
  }
  async function contactName(id) {
    if (S.names.has(id)) return S.names.get(id);
    try {
      const c = await api("GET", "/contacts/" + encodeURIComponent(id));
      S.names.set(id, displayName(c));
    } catch (e) { S.names.set(id, "Contact " + String(id).slice(-6)); }
    return S.names.get(id);
  }
  async function loadMerges(seq) {
    const out = await api("GET", "/contacts/" + encodeURIComponent(S.id) + "/merges");
    const names = await Promise.all(out.items.map((m) => contactName(m.merged)));
    if (seq !== S.seq) return;
    const list = $("merges");
    clear(list);
    out.items.forEach((m, n) => {
      const undone = Boolean(m.undone_at);
      const moved = m.identities.length + " channel" + (m.identities.length === 1 ? "" : "s") + ", "
        + Object.keys(m.conversations).length + " conversation" + (Object.keys(m.conversations).length === 1 ? "" : "s");
      list.append(h("li", { "data-c": "merge", "data-id": m.id, "data-merged": m.merged, "data-undone": String(undone) },
        h("span", { "data-c": "merge-name", text: names[n] }),
        h("span", { class: "c-muted", text: "merged " + when(m.merged_at) + " (" + moved + ")" }),
        undone ? h("span", { "data-c": "merge-undone", text: "undone " + when(m.undone_at) })
          : confirmButton("Undo", "Undo: sure? Click again",
            { "data-c": "merge-undo", "aria-label": "Undo the merge of " + names[n] }, () => undo(m))));
    });
    if (!out.items.length) list.append(h("li", { class: "c-muted", text: "None." }));
  }
  async function undo(m) {
    const id = S.id;
    say("merge-error", null);
    try {
      await api("POST", "/merges/" + encodeURIComponent(m.id) + "/undo");
    } catch (err) { say("merge-error", err); return; }
    if (S.id !== id) return;
    await openContact(id);
    search();
  }

  // ------------------------------------------------------------------ boot
  function fromHash() {
    let id = "";
    try { id = decodeURIComponent(location.hash.slice(1)); } catch (e) { id = ""; }
    openContact(id || null);
  }
  function wire() {
    $("contact-search").addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(S.timer); search(); });
    $("contact-q").addEventListener("input", () => { clearTimeout(S.timer); S.timer = setTimeout(search, 300); });
    $("contact-form").addEventListener("submit", save);
    $("merge-search").addEventListener("submit", findCandidates);
    $("timeline-more").addEventListener("click", async () => {
      const seq = S.seq;
      try { await loadTimeline(seq, false); } catch (e) { say("contact-error", e); }
    });
    window.addEventListener("hashchange", fromHash);
  }
  async function boot() {
    wire();
    let session;
    try { session = await api("GET", "/session"); } catch (e) {
      problem(e.status === 401 ? "Not signed in." : e.message);
      return;
    }
    S.me = session.agent;
    S.csrf = session.csrf_token;
    $("me").textContent = S.me.name + " (" + S.me.role + ")";
    show($("nav-audit"), S.me.role === "admin");
    if (S.me.role !== "agent" && S.me.role !== "admin") { problem("Contacts are for agents and admins."); return; }
    show($("page"), true);
    search();
    fromHash();
  }
  boot();
})();
