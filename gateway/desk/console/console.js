/*
 * Omnigate agent console (served by the gateway at /console/).
 *
 * Vanilla ES2020, no dependencies, CSP-safe: the page's Content-Security-Policy allows
 * scripts and styles from this origin only. Every piece of text that comes from a
 * customer, an agent or the bot is put into the DOM with textContent (the `h` helper's
 * `text`), never as HTML.
 *
 * REST: /api/v1 (session cookie; X-CSRF-Token on every POST/PUT/PATCH/DELETE).
 * Live: /api/v1/live, protocol 1 (docs/console-protocol.md).
 *
 * Files: the reply box takes files (the attach button, drag and drop, paste), previewed
 * before sending (images drawn on a canvas from the file itself) and sent as
 * multipart/form-data. Items show their files from /api/v1/attachments/{id} (same
 * origin, the session cookie): images inline, other files as downloads.
 *
 * Search: the box above the lists (GET /api/v1/search/conversations, as you type after
 * 300 ms, Enter at once) with a filter row; the hits replace the lists until cleared.
 * Snippets highlight the query's words with <mark> elements made here around text nodes.
 *
 * Labels (GET /api/v1/labels): coloured chips in the lists, the results and the
 * conversation view (colours set through the CSSOM, which the CSP allows, not a style
 * attribute); a picker sets a conversation's (PUT .../labels, the whole list); the queue
 * filters by one; admins add, rename, recolour and delete them under "Manage labels".
 */
(function () {
  "use strict";

  const API = "/api/v1";
  const WS_URL = (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + API + "/live";
  const TITLE = "Omnigate console";
  const PING_MS = 25000;
  const TYPING_EVERY_MS = 2000;   // send typing on:true at most this often
  const TYPING_SHOW_MS = 6000;    // stop showing typing this long after the last on:true
  const BACKOFF_MIN = 1000, BACKOFF_MAX = 15000;
  const PRIORITY = { urgent: 0, high: 1, normal: 2, low: 3 };
  const MAX_FILES = 10;            // files in one reply (the server's limit too)
  const THUMB_PX = 80;             // preview canvases (shown at half that)
  const INLINE = new Set(["image/png", "image/jpeg", "image/gif", "image/webp"]); // served inline
  const CHANNELS = {
    webchat: { label: "Web", title: "Web chat" },
    telegram: { label: "TG", title: "Telegram" },
    slack: { label: "Slack", title: "Slack" },
    email: { label: "Mail", title: "Email" },
  };

  // ------------------------------------------------------------------ state
  const S = {
    me: null, csrf: null,
    ws: null, wsWanted: false, backoff: BACKOFF_MIN, reconnectTimer: null, pingTimer: null,
    refs: new Map(), refSeq: 0,
    queue: new Map(), mine: new Map(),   // id -> conversation summary (with _at: received ms)
    listLoads: 0, framesDuringLoad: null, // conversation frames while the lists load: [conv, in_queue, mine, at]
    unread: new Map(),                   // conversation id -> count
    agents: new Map(),                   // id -> {id, name, presence}
    canned: [],
    open: null,                          // { id, conv, contactId, cursor, hasMore, loading, loaded, seen:Set, pending:[] }
    typingSentAt: 0, typingOn: false, typingHide: null,
    files: [],                           // files for the next reply: { file, el }
    labels: new Map(),                   // id -> {id, name, color}, by name
    labelsLoad: null, labelsAt: 0, labelsRetry: null, labelsGone: new Set(),  // ids asked for and not there
    queueLabel: "",                      // the queue shows only conversations with this label
    search: { seq: 0, timer: null, active: false, hits: [], partial: false, words: [], prefix: null },
  };
  const SEARCH_DEBOUNCE_MS = 300;
  const SEARCH_LIMIT = 50;
  const LABELS_EVERY_MS = 60000;  // labels are read again this often (renames, colours)
  const OWNER_TEXT = { bot: "bot", queued: "queued", agent: "agent", resolved: "resolved" };

  // -------------------------------------------------------------------- DOM
  const { $, h, show, clear } = window.OmnigateDom; // dom.js

  function channelBadge(channel) {
    const known = CHANNELS[channel] || { label: String(channel || "?"), title: String(channel || "unknown") };
    return h("span", { class: "c-ch c-ch-" + (CHANNELS[channel] ? channel : "other"),
      "data-channel": channel, title: known.title, text: known.label });
  }

  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + "s";
    const m = Math.floor(seconds / 60), s = seconds % 60;
    if (m < 60) return m + "m " + String(s).padStart(2, "0") + "s";
    const hrs = Math.floor(m / 60);
    return hrs + "h " + String(m % 60).padStart(2, "0") + "m";
  }
  function when(iso) {
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  }
  function safeUrl(url) {
    try {
      const u = new URL(String(url), location.href);
      return u.protocol === "https:" || u.protocol === "http:" ? u.href : null;
    } catch (e) { return null; }
  }
  function fileSize(n) {
    if (typeof n !== "number") return "";
    return n < 1024 ? n + " B" : n < 1048576 ? Math.round(n / 1024) + " KB" : (n / 1048576).toFixed(1) + " MB";
  }
  function contactName(conv) {
    const c = conv && conv.contact;
    if (!c) return "Unknown contact";
    if (c.name) return c.name;
    const named = (c.identities || []).find((i) => i.display_name);
    return named ? named.display_name : "Visitor " + String(c.id).slice(-6);
  }

  // ---------------------------------------------------------------- REST
  class ApiError extends Error {
    constructor(status, code, message) { super(message); this.status = status; this.code = code; }
  }
  // `body`: an object sent as JSON, or a FormData sent as multipart/form-data.
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const form = body instanceof FormData;
    if (body !== undefined && !form) headers["Content-Type"] = "application/json";
    if (method !== "GET" && S.csrf) headers["X-CSRF-Token"] = S.csrf;
    let res;
    try {
      res = await fetch(API + path, {
        method, headers, credentials: "same-origin", cache: "no-store",
        body: body === undefined ? undefined : form ? body : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, "network", "the gateway cannot be reached");
    }
    if (res.status === 204) return null;
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok) {
      const err = new ApiError(res.status, (data && data.error) || "error",
        (data && data.message) || ("HTTP " + res.status));
      if (res.status === 401 && path !== "/session") signedOut("Your session ended; sign in again.");
      throw err;
    }
    return data;
  }

  function convError(err) {
    const el = $("conv-error");
    if (!err) { show(el, false); el.textContent = ""; return; }
    el.textContent = err.message || String(err);
    show(el, true);
  }

  // ------------------------------------------------------------- sign-in
  function showLogin(message) {
    show($("app"), false);
    show($("login"), true);
    const err = $("login-error");
    err.textContent = message || "";
    show(err, Boolean(message));
    document.title = TITLE;
    $("email").focus();
  }

  async function signIn(e) {
    e.preventDefault();
    const button = $("sign-in");
    button.disabled = true;
    try {
      const out = await api("POST", "/session", { email: $("email").value.trim(), password: $("password").value });
      $("password").value = "";
      start(out);
    } catch (err) {
      const box = $("login-error");
      box.textContent = err.status === 400 ? "Enter your email and password." : err.message;
      show(box, true);
    } finally {
      button.disabled = false;
    }
  }

  async function signOut() {
    try { await api("DELETE", "/session"); } catch (e) { /* ended anyway */ }
    signedOut("");
  }

  function signedOut(message) {
    S.wsWanted = false;
    clearTimeout(S.reconnectTimer);
    clearInterval(S.pingTimer);
    if (S.ws) { try { S.ws.close(1000); } catch (e) { /* closed */ } S.ws = null; }
    S.me = null; S.csrf = null; S.open = null;
    clearFiles();
    S.queue.clear(); S.mine.clear(); S.unread.clear();
    S.labels = new Map(); S.labelsAt = 0; S.labelsGone.clear(); S.queueLabel = "";
    resetSearch();
    clear($("queue")); clear($("mine")); clear($("items"));
    closeConversationView();
    showLogin(message);
  }

  function start(session) {
    S.me = session.agent;
    S.csrf = session.csrf_token;
    show($("login"), false);
    show($("app"), true);
    $("me").textContent = S.me.name + " (" + S.me.role + ")";
    if ("Notification" in window && Notification.permission === "default") show($("notify-perm"), true);
    show($("search-form"), isStaff());
    show($("manage-labels"), isAdmin());
    show($("nav-contacts"), isStaff());
    show($("nav-audit"), isAdmin());
    show($("label-picker"), isStaff());
    loadCanned();
    loadAgents();
    loadLabels(true);
    S.wsWanted = true;
    connect();
    openFromAddress();
  }
  // /console/#conversation=<id> (the contacts page's links) opens that conversation; the
  // address is cleaned so a reload shows the lists. Subscribed when the socket is ready
  // (the "ready" frame opens S.open again).
  function openFromAddress() {
    const m = /^#conversation=([^&]+)$/.exec(location.hash);
    if (!m || !S.me) return;
    history.replaceState(null, "", location.pathname + location.search);
    let id = "";
    try { id = decodeURIComponent(m[1]); } catch (e) { return; }
    if (id) openConversation(id);
  }

  // -------------------------------------------------------------- socket
  function setLive(state) {
    const el = $("live");
    el.dataset.state = state;
    el.textContent = state;
  }

  function connect() {
    clearTimeout(S.reconnectTimer);
    if (!S.wsWanted) return;
    setLive("connecting");
    const ws = new WebSocket(WS_URL);
    S.ws = ws;
    ws.addEventListener("message", (ev) => {
      let frame;
      try { frame = JSON.parse(ev.data); } catch (e) { return; }
      if (frame && typeof frame.type === "string") onFrame(frame);
    });
    ws.addEventListener("close", (ev) => {
      if (S.ws !== ws) return;
      S.ws = null;
      clearInterval(S.pingTimer);
      setLive("offline");
      for (const [, pending] of S.refs) pending.reject(new Error("the live connection closed"));
      S.refs.clear();
      if (ev.code === 4401) { signedOut("Your session ended; sign in again."); return; }
      if (!S.wsWanted) return;
      S.reconnectTimer = setTimeout(connect, S.backoff);
      S.backoff = Math.min(S.backoff * 2, BACKOFF_MAX);
    });
  }

  function send(frame) {
    if (!S.ws || S.ws.readyState !== WebSocket.OPEN) return false;
    S.ws.send(JSON.stringify(frame));
    return true;
  }

  function request(frame, timeoutMs) {
    const ref = "r" + (++S.refSeq);
    return new Promise((resolve, reject) => {
      if (!send({ ...frame, ref })) { reject(new Error("not connected")); return; }
      const timer = setTimeout(() => { S.refs.delete(ref); reject(new Error("no answer")); }, timeoutMs || 5000);
      S.refs.set(ref, {
        resolve: (v) => { clearTimeout(timer); resolve(v); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
    });
  }

  function onFrame(f) {
    if (f.ref && S.refs.has(f.ref)) {
      const pending = S.refs.get(f.ref);
      S.refs.delete(f.ref);
      if (f.type === "error") pending.reject(new Error(f.message || f.code));
      else pending.resolve(f);
    }
    switch (f.type) {
      case "ready":
        S.backoff = BACKOFF_MIN;
        setLive(f.live ? "live" : "degraded");
        if (f.agent) S.me = { ...S.me, ...f.agent };
        setPresence("online");
        clearInterval(S.pingTimer);
        S.pingTimer = setInterval(() => send({ type: "ping" }), PING_MS);
        reloadLists();
        loadLabels(true);  // labels may have changed while away
        if (S.open) openConversation(S.open.id);
        if (S.search.active) runSearch();
        break;
      case "conversation": onConversation(f.conversation, f.in_queue, f.mine); break;
      case "notification": onNotification(f); break;
      case "item": onItem(f.conversation_id, f.item); break;
      case "typing": onTyping(f); break;
      case "presence": onPresence(f); break;
      case "resync": reloadLists(); if (S.open) openConversation(S.open.id); break;
      case "error":
        if (!f.ref) toast("Live: " + (f.message || f.code), "error");
        break;
      default: break;
    }
  }

  // ------------------------------------------------------------- presence
  function setPresence(value) {
    const sel = $("presence");
    if (value === "online" || value === "away") sel.value = value;
    sel.dataset.state = value;
  }
  async function changePresence() {
    const sel = $("presence");
    sel.dataset.state = "";
    try {
      const answer = await request({ type: "presence", presence: sel.value });
      setPresence(answer.agent ? answer.agent.presence : sel.value);
    } catch (e) {
      toast("Presence not changed: " + e.message, "error");
    }
  }
  function onPresence(f) {
    const a = f.agent;
    if (!a || !a.id) return;
    S.agents.set(a.id, { ...(S.agents.get(a.id) || {}), ...a });
    if (S.me && a.id === S.me.id && !f.ref) setPresence(a.presence);
    renderAgentPicker();
  }

  async function loadAgents() {
    if (!S.me) return;
    try {
      const out = await api("GET", "/colleagues");  // active agents, for the transfer picker
      for (const a of out.items) S.agents.set(a.id, { ...(S.agents.get(a.id) || {}), id: a.id, name: a.name, presence: a.presence });
      renderAgentPicker();
    } catch (e) { /* transfer by team still works */ }
  }
  function renderAgentPicker() {
    const sel = $("transfer-agent");
    const current = sel.value;
    clear(sel);
    sel.append(h("option", { value: "", text: "—" }));
    const others = [...S.agents.values()].filter((a) => !S.me || a.id !== S.me.id)
      .sort((a, b) => String(a.name).localeCompare(String(b.name)));
    for (const a of others) {
      sel.append(h("option", { value: a.id, text: a.name + (a.presence ? " (" + a.presence + ")" : "") }));
    }
    sel.value = current;
  }

  // ---------------------------------------------------------------- lists
  // The lists by REST, with the socket's frames on top (docs/console-protocol.md): a frame
  // that arrives while the lists load may be newer than what they answer (signing in with
  // conversations waiting: assigned at once), so it is applied again after them.
  async function reloadLists() {
    const load = ++S.listLoads;
    S.framesDuringLoad = [];
    try {
      const label = S.queueLabel;
      const [queue, mine] = await Promise.all([
        api("GET", "/conversations?owner=queued&limit=200" + (label ? "&label=" + encodeURIComponent(label) : "")),
        api("GET", "/conversations?owner=agent&mine=true&limit=200"),
      ]);
      if (load !== S.listLoads) return;  // a later load answers for both
      const now = Date.now();
      S.queue.clear(); S.mine.clear();
      for (const c of queue.items) if (inQueueView(c)) S.queue.set(c.id, { ...c, _at: now });
      for (const c of mine.items) S.mine.set(c.id, { ...c, _at: now });
      for (const [conv, inQueue, isMine, at] of S.framesDuringLoad) placeConversation(conv, inQueue, isMine, at);
      S.framesDuringLoad = null;
      renderLists();
    } catch (e) {
      if (load === S.listLoads) S.framesDuringLoad = null;
      if (e.status !== 401) toast("Could not load the lists: " + e.message, "error");
    }
  }

  // The queue shows the conversations waiting, with the label chosen if one is.
  function inQueueView(conv) {
    return !S.queueLabel || (conv.labels || []).includes(S.queueLabel);
  }

  function placeConversation(conv, inQueue, mine, at) {
    const c = { ...conv, _at: at };
    if (inQueue && inQueueView(c)) S.queue.set(c.id, c); else S.queue.delete(c.id);
    if (mine) S.mine.set(c.id, c); else S.mine.delete(c.id);
    return c;
  }

  function onConversation(conv, inQueue, mine) {
    const at = Date.now();
    if (S.framesDuringLoad) S.framesDuringLoad.push([conv, inQueue, mine, at]);
    const c = placeConversation(conv, inQueue, mine, at);
    if (!mine) S.unread.delete(c.id);
    renderLists();
    if (S.open && S.open.id === c.id) setOpenConv(S.open, c);
    updateHit(c);
  }

  function serverOffset(conv) {
    // The server's clock minus ours, from the SLA figures' `now` (0 without them).
    return conv.sla && conv.sla.now ? Date.parse(conv.sla.now) - conv._at : 0;
  }

  function slaText(conv) {
    const sla = conv.sla;
    if (!sla) return { text: "no SLA", state: "none" };
    const elapsed = (Date.now() - conv._at) / 1000;
    const timer = sla.first_response.state === "met" ? sla.resolution : sla.first_response;
    const label = timer === sla.resolution ? "resolve" : "reply";
    if (timer.state === "running" && typeof timer.remaining_seconds === "number") {
      const left = timer.remaining_seconds - elapsed;
      return left >= 0 ? { text: label + " in " + duration(left), state: "running" }
        : { text: label + " overdue " + duration(-left), state: "breached" };
    }
    if (timer.state === "breached") {
      const over = typeof timer.overdue_seconds === "number" ? " " + duration(timer.overdue_seconds + (timer.done_at ? 0 : elapsed)) : "";
      return { text: label + " breached" + over, state: "breached" };
    }
    return { text: label + " " + timer.state, state: timer.state };
  }

  function row(conv, list) {
    const unread = S.unread.get(conv.id) || 0;
    const handoff = conv.handoff;
    const priority = handoff ? handoff.priority : "normal";
    let waiting = "";
    if (handoff && handoff.requested_at) {
      const now = Date.now() + serverOffset(conv);
      waiting = "waiting " + duration((now - Date.parse(handoff.requested_at)) / 1000);
    }
    const sla = slaText(conv);
    const button = h("button", {
      type: "button", class: "c-row" + (S.open && S.open.id === conv.id ? " c-row-open" : ""),
      "data-c": "conv-item", "data-id": conv.id, "data-owner": conv.owner,
      onclick: () => openConversation(conv.id),
    },
    h("span", { class: "c-row-top" },
      channelBadge(conv.reply_channel || conv.channel),
      h("span", { class: "c-row-name", text: contactName(conv) }),
      unread ? h("span", { class: "c-unread", "data-c": "unread", text: String(unread) }) : null),
    h("span", { class: "c-row-meta" },
      h("span", { class: "c-prio c-prio-" + (PRIORITY[priority] === undefined ? "normal" : priority), "data-c": "priority", text: priority }),
      handoff && handoff.reason ? h("span", { class: "c-reason", text: handoff.reason }) : null,
      list === "queue" && waiting ? h("span", { class: "c-wait", "data-c": "waiting", text: waiting }) : null,
      h("span", { class: "c-sla", "data-c": "sla", "data-state": sla.state, text: sla.text })),
    labelChips(conv.labels));
    return h("li", {}, button);
  }

  function renderLists() {
    const queue = [...S.queue.values()].sort((a, b) => {
      const pa = PRIORITY[(a.handoff || {}).priority] ?? 2, pb = PRIORITY[(b.handoff || {}).priority] ?? 2;
      if (pa !== pb) return pa - pb;
      return Date.parse((a.handoff || {}).requested_at || a.created_at) - Date.parse((b.handoff || {}).requested_at || b.created_at);
    });
    const mine = [...S.mine.values()].sort((a, b) =>
      Date.parse(b.last_activity_at || b.created_at) - Date.parse(a.last_activity_at || a.created_at));
    const q = $("queue"), m = $("mine");
    const focused = focusedRow();
    clear(q); clear(m);
    for (const c of queue) q.append(row(c, "queue"));
    for (const c of mine) m.append(row(c, "mine"));
    const label = S.labels.get(S.queueLabel);
    if (!queue.length) q.append(h("li", { class: "c-none", text: label ? "Nobody with the label " + label.name + " is waiting." : "Nobody is waiting." }));
    if (!mine.length) m.append(h("li", { class: "c-none", text: "None assigned to you." }));
    $("queue-count").textContent = String(queue.length);
    $("mine-count").textContent = String(mine.length);
    refocus(focused);
    updateTitle();
  }
  // A list drawn again keeps the keyboard where it was (the same row, by list and id).
  function focusedRow() {
    const el = document.activeElement;
    if (!el || !el.dataset || !el.dataset.id || !el.closest(".c-lists")) return null;
    const list = el.closest("ul");
    return list ? { list: list.dataset.c, id: el.dataset.id, c: el.dataset.c } : null;
  }
  function refocus(was) {
    if (!was || (document.activeElement && document.activeElement !== document.body)) return;
    const el = [...document.querySelectorAll('[data-c="' + was.list + '"] [data-c="' + was.c + '"]')]
      .find((b) => b.dataset.id === was.id);
    if (el) el.focus();
  }

  function tickLists() {
    for (const button of document.querySelectorAll('[data-c="conv-item"]')) {
      const conv = S.queue.get(button.dataset.id) || S.mine.get(button.dataset.id);
      if (!conv) continue;
      const sla = button.querySelector('[data-c="sla"]');
      if (sla) { const s = slaText(conv); sla.textContent = s.text; sla.dataset.state = s.state; }
      const wait = button.querySelector('[data-c="waiting"]');
      if (wait && conv.handoff && conv.handoff.requested_at) {
        const now = Date.now() + serverOffset(conv);
        wait.textContent = "waiting " + duration((now - Date.parse(conv.handoff.requested_at)) / 1000);
      }
    }
  }

  // -------------------------------------------------------- notifications
  function updateTitle() {
    let n = 0;
    for (const v of S.unread.values()) n += v;
    document.title = n > 0 ? "(" + n + ") " + TITLE : TITLE;
  }

  function toast(text, kind) {
    const box = $("toasts");
    const el = h("div", { class: "c-toast c-toast-" + (kind || "info"), "data-c": "toast", role: "status" },
      h("span", { text }),
      h("button", { type: "button", class: "c-link", "aria-label": "Dismiss", text: "×", onclick: () => el.remove() }));
    box.append(el);
    while (box.children.length > 5) box.firstElementChild.remove();
    setTimeout(() => el.remove(), 10000);
  }

  function desktop(title, body) {
    if (!("Notification" in window) || Notification.permission !== "granted" || !document.hidden) return;
    try { new Notification(title, { body }); } catch (e) { /* not allowed here */ }
  }

  function onNotification(f) {
    if (f.kind === "assigned" && f.conversation) {
      const name = contactName(f.conversation);
      toast("Assigned to you: " + name, "assigned");
      desktop("New conversation", name);
      if (!(S.open && S.open.id === f.conversation.id)) bumpUnread(f.conversation.id);
    } else if (f.kind === "message" && f.item) {
      const viewing = S.open && S.open.id === f.conversation_id && !document.hidden;
      if (viewing) return;
      const conv = S.mine.get(f.conversation_id);
      const who = conv ? contactName(conv) : "A customer";
      const text = f.item.text || "(attachment)";
      toast(who + ": " + text.slice(0, 140), "message");
      desktop(who, text.slice(0, 140));
      bumpUnread(f.conversation_id);
    }
  }
  function bumpUnread(id) {
    S.unread.set(id, (S.unread.get(id) || 0) + 1);
    renderLists();
  }

  // ---------------------------------------------------------- conversation
  function closeConversationView() {
    show($("conversation"), false);
    show($("profile"), false);
    show($("empty"), true);
  }

  async function openConversation(id) {
    const previous = S.open;
    if (previous && previous.id !== id) send({ type: "unsubscribe", conversation_id: previous.id });
    if (!previous || previous.id !== id) { clearFiles(); $("label-picker").open = false; } // never send them to another customer
    stopTyping();
    const open = { id, conv: null, contactId: null, cursor: null, hasMore: false, loading: true,
      loaded: false, seen: new Set(), pending: [] };
    S.open = open;
    S.unread.delete(id);
    renderLists();
    renderResults();
    convError(null);
    clear($("items"));
    show($("typing"), false);
    show($("empty"), false);
    show($("conversation"), true);
    show($("profile"), true);
    $("items").dataset.loaded = "false";
    try {
      await request({ type: "subscribe", conversation_id: id }).catch(() => null);
      const conv = await api("GET", "/conversations/" + encodeURIComponent(id));
      if (S.open !== open) return;
      open.conv = { ...conv, _at: Date.now() };
      renderHead();
      renderProfile(conv.contact);
      renderChannels(conv);
      if (conv.contact) {
        open.contactId = conv.contact.id;
        await loadTimeline(open);
      }
      if (S.open !== open) return;
      open.loaded = true;
      $("items").dataset.loaded = "true";
      for (const item of open.pending.splice(0)) appendItem(open, item);
      scrollToBottom();
      fillTimeline(open);
    } catch (e) {
      if (S.open === open) convError(e);
    } finally {
      open.loading = false;
    }
  }

  function renderHead() {
    const open = S.open;
    if (!open || !open.conv) return;
    const c = open.conv;
    $("conv-title").textContent = contactName(c);
    const meta = $("conv-meta");
    clear(meta);
    const owner = c.owner === "agent" ? (c.assignee_id === (S.me && S.me.id) ? "assigned to you" : "assigned to " + agentName(c.assignee_id)) : c.owner;
    meta.append(channelBadge(c.channel), " ",
      h("span", { "data-c": "conv-owner", "data-owner": c.owner, text: owner }));
    if (c.handoff) {
      meta.append(" · ", h("span", { class: "c-prio c-prio-" + c.handoff.priority, text: c.handoff.priority }),
        " · ", h("span", { text: c.handoff.reason }));
      if (c.handoff.team) meta.append(" · team ", h("span", { text: c.handoff.team }));
      if (c.handoff.skill) meta.append(" · skill ", h("span", { text: c.handoff.skill }));
    }
    const sla = slaText(c);
    meta.append(" · ", h("span", { class: "c-sla", "data-c": "conv-sla", "data-state": sla.state, text: sla.text }));
    renderConvLabels();
    const mine = c.owner === "agent" && S.me && c.assignee_id === S.me.id;
    $("claim").hidden = c.owner !== "queued";
    $("resolve").hidden = !mine;
    $("handback").hidden = !mine;
    $("transfer").hidden = !mine;
    updateComposer();
  }
  function agentName(id) {
    const a = S.agents.get(id);
    return a ? a.name : "another agent";
  }

  function isMine() {
    const c = S.open && S.open.conv;
    return Boolean(c && S.me && c.owner === "agent" && c.assignee_id === S.me.id);
  }
  // When the agent cannot reply: why, and what can be done instead (a claim, or a note).
  function cannotReply(c) {
    const note = " A private note can still be added.";
    if (!c || isMine()) return null;
    if (c.owner === "queued") return { state: "queued", action: "claim", placeholder: "Claim the conversation to reply",
      text: "Waiting in the queue: claim it to reply to the customer." };
    if (c.owner === "resolved") return { state: "resolved", action: "note", placeholder: "Resolved: it opens again when the customer writes",
      text: "Resolved. It opens again when the customer writes (the bot answers first, and hands it to the queue if asked)." + note };
    if (c.owner === "bot") return { state: "bot", action: "note", placeholder: "The bot is answering",
      text: "The bot is answering. The conversation comes to the queue when the customer asks for a person." + note };
    const who = agentName(c.assignee_id);
    return { state: "other-agent", action: "note", placeholder: who + " is answering",
      text: who + " has this conversation: only they can reply." + note };
  }
  function updateComposer() {
    const note = $("note-toggle").checked;
    const reply = $("reply");
    const why = cannotReply(S.open && S.open.conv);
    $("composer").classList.toggle("c-composer-note", note);
    reply.placeholder = note ? "Private note (agents only)…" : why ? why.placeholder : "Reply to the customer…";
    const state = $("composer-state");
    show(state, Boolean(why) && !note);
    if (why) {
      state.dataset.state = why.state;
      $("composer-state-text").textContent = why.text;
      const action = $("composer-action");
      action.dataset.action = why.action;
      action.textContent = why.action === "claim" ? "Claim" : "Write a private note";
    }
    $("send").disabled = !note && !isMine();
    $("send").textContent = note ? "Add note" : "Send";
    $("attach").disabled = note;  // notes are text only
  }

  function renderProfile(contact) {
    const name = $("contact-name");
    clear(name);
    if (contact) {  // the contacts page: edit, merge, the whole timeline
      name.append(h("a", { href: "contacts.html#" + encodeURIComponent(contact.id), "data-c": "contact-link",
        title: "Open the contact", text: contact.name || "(no name)" }));
    } else name.textContent = "Unknown contact";
    const ids = $("identities");
    clear(ids);
    for (const i of (contact && contact.identities) || []) {
      ids.append(h("li", { "data-c": "identity" }, channelBadge(i.channel), " ",
        h("span", { text: i.display_name || i.external_id }),
        i.reachable ? null : h("span", { class: "c-muted", text: " (unreachable)" })));
    }
    const dl = $("profile-data");
    clear(dl);
    const entries = Object.entries((contact && contact.profile) || {}).filter(([k]) => !k.startsWith("_"));
    if (!entries.length) dl.append(h("dd", { class: "c-muted", text: "Nothing yet." }));
    for (const [key, raw] of entries) {
      let value = raw, expires = null;
      if (raw && typeof raw === "object" && !Array.isArray(raw) && "value" in raw) {
        value = raw.value;
        expires = raw.expires_at || null;
      }
      const text = typeof value === "string" ? value : JSON.stringify(value);
      dl.append(h("dt", { text: key }));
      dl.append(h("dd", { "data-c": "profile-value", "data-key": key },
        h("span", { text }),
        expires ? h("span", { class: "c-muted", "data-c": "profile-expires", text: " · expires " + when(expires) }) : null));
    }
  }

  function renderChannels(conv) {
    const sel = $("reply-channel");
    clear(sel);
    const channels = new Set([conv.reply_channel || conv.channel]);
    for (const i of (conv.contact && conv.contact.identities) || []) if (i.reachable) channels.add(i.channel);
    for (const ch of channels) {
      const known = CHANNELS[ch];
      sel.append(h("option", { value: ch, text: (known ? known.title : ch) + (ch === (conv.reply_channel || conv.channel) ? " (last used)" : "") }));
    }
    sel.value = conv.reply_channel || conv.channel;
  }

  // ------------------------------------------------------------- timeline
  const timelineBox = () => $("timeline");
  function scrollToBottom() { const t = timelineBox(); t.scrollTop = t.scrollHeight; }
  function nearBottom() { const t = timelineBox(); return t.scrollHeight - t.scrollTop - t.clientHeight < 80; }

  async function loadTimeline(open) {
    const q = "?limit=50" + (open.cursor ? "&cursor=" + encodeURIComponent(open.cursor) : "");
    show($("older"), true);
    try {
      const page = await api("GET", "/contacts/" + encodeURIComponent(open.contactId) + "/timeline" + q);
      if (S.open !== open) return;
      open.cursor = page.next_cursor;
      open.hasMore = Boolean(page.has_more && page.next_cursor);
      const box = timelineBox(), list = $("items");
      const before = box.scrollHeight;
      const frag = document.createDocumentFragment();
      for (const item of page.items.slice().reverse()) {  // newest first -> oldest on top
        if (open.seen.has(item.id)) continue;
        open.seen.add(item.id);
        frag.append(renderItem(item, open));
      }
      list.prepend(frag);
      box.scrollTop += box.scrollHeight - before;  // keep what the agent was reading in place
      list.dataset.hasMore = String(open.hasMore);
    } finally {
      show($("older"), false);
    }
  }

  async function loadOlder() {
    const open = S.open;
    if (!open || !open.loaded || open.loading || !open.hasMore) return;
    open.loading = true;
    try { await loadTimeline(open); } catch (e) { convError(e); } finally { open.loading = false; }
    fillTimeline(open);
  }
  function fillTimeline(open) {
    // No scroll bar yet: nothing to scroll up with, so load the next page now.
    const box = timelineBox();
    if (S.open === open && open.hasMore && box.scrollHeight <= box.clientHeight + 10) loadOlder();
  }

  function onItem(conversationId, item) {
    const open = S.open;
    if (!open || open.id !== conversationId || !item) return;
    if (!open.loaded) { open.pending.push(item); return; }
    if (open.seen.has(item.id)) { appendItem(open, item); return; } // again: its files changed
    appendItem(open, item);
    if (item.sender && item.sender.role === "customer") {
      hideTyping();
      // written on another channel (a channel switch): replies go there now
      if (open.conv && item.channel && item.channel !== (open.conv.reply_channel || open.conv.channel)) refreshConversation(open);
    }
  }
  // A new item goes at the end; one shown already (the same id: sent again when its
  // files arrived or failed, or the echo of our own reply) replaces the one shown.
  function appendItem(open, item) {
    if (open.seen.has(item.id)) {
      const shown = [...$("items").querySelectorAll('[data-c="item"]')].find((el) => el.dataset.id === item.id);
      if (shown) shown.replaceWith(renderItem(item, open));
      return;
    }
    open.seen.add(item.id);
    const stick = nearBottom();
    $("items").append(renderItem(item, open));
    if (stick) scrollToBottom();
  }

  function renderItem(item, open) {
    const role = (item.sender && item.sender.role) || "system";
    const other = item.conversation_id !== open.id;
    const attrs = {
      class: "c-item c-" + role + (item.private ? " c-private" : "") + (other ? " c-other" : ""),
      "data-c": "item", "data-role": role, "data-id": item.id, "data-seq": item.seq,
      "data-conversation": item.conversation_id, "data-channel": item.channel,
    };
    if (item.private) attrs["data-private"] = "true";
    if (item.type === "event") {
      attrs.class += " c-event";
      attrs["data-event"] = item.name || "event";
      return h("li", attrs, channelBadge(item.channel), " ",
        h("span", { class: "c-event-text", text: item.text || item.name || "event" }),
        h("time", { class: "c-time", datetime: item.created_at, text: when(item.created_at) }));
    }
    const sender = item.sender && item.sender.name ? item.sender.name
      : role === "customer" ? "Customer" : role === "bot" ? "Bot" : role === "agent" ? "Agent" : "System";
    const head = h("div", { class: "c-item-head" }, channelBadge(item.channel), " ",
      h("span", { class: "c-sender", text: sender }),
      item.private ? h("span", { class: "c-private-tag", "data-c": "private-tag", text: "Private note" }) : null,
      other ? h("span", { class: "c-muted", text: " · other conversation" }) : null,
      h("time", { class: "c-time", datetime: item.created_at, text: when(item.created_at) }));
    const body = h("div", { class: "c-text", "data-c": "text" });
    body.textContent = item.text || (item.value ? "[" + item.value + "]" : "");
    const li = h("li", attrs, head, body);
    if (item.attachments && item.attachments.length) {
      li.append(h("ul", { class: "c-attachments", "data-c": "attachments" }, ...item.attachments.map(renderAttachment)));
    }
    const raw = item.channel_data && item.channel_data.raw_attachment_id;
    if (typeof raw === "string" && raw) {  // a mail: the message as received
      li.append(h("a", { class: "c-raw-mail", "data-c": "raw-mail", download: "message.eml",
        href: API + "/attachments/" + encodeURIComponent(raw) + "?download=true", text: "Original mail (.eml)" }));
    }
    if (item.buttons && item.buttons.length) {
      li.append(h("div", { class: "c-buttons" }, ...item.buttons.map((b) => h("span", { class: "c-chip", text: b.title || b.value || "" }))));
    }
    if (item.delivery && item.delivery.status) li.dataset.delivery = item.delivery.status;
    return li;
  }

  // One file of an item: a stored image inline (and a download link), another stored
  // file as a download link, a file on its way or refused with its state and reason.
  function renderAttachment(a) {
    const name = String(a.name || a.content_type || "attachment");
    const size = fileSize(a.size);
    const state = a.state || (a.id ? "stored" : "link");  // items from before files had states
    const li = h("li", { class: "c-file", "data-c": "attachment", "data-state": state, "data-name": name });
    const label = name + (size ? " (" + size + ")" : "");
    if (state === "pending") {
      li.append(h("span", { text: label }), h("span", { class: "c-file-state", "data-c": "attachment-state", text: "receiving…" }));
    } else if (state === "failed" || state === "too_large") {
      const why = a.error || (state === "too_large" ? "over the size limit" : "could not be fetched");
      li.append(h("span", { text: label }), h("span", { class: "c-file-state", "data-c": "attachment-state",
        text: (state === "too_large" ? "too large: " : "not received: ") + why }));
    } else if (a.id) {
      const url = API + "/attachments/" + encodeURIComponent(a.id);
      if (INLINE.has(a.content_type)) {
        const img = h("img", { class: "c-image", src: url, alt: name, "data-c": "attachment-image" });
        img.addEventListener("load", () => {  // the newest item stays in view as images load
          const t = timelineBox();
          if (t.scrollHeight - t.scrollTop - t.clientHeight - img.offsetHeight < 120) scrollToBottom();
        });
        li.append(h("a", { class: "c-image-link", href: url, target: "_blank", rel: "noopener noreferrer",
          "aria-label": "Open " + name + " in a new tab" }, img));
      }
      li.append(h("a", { href: url + "?download=true", download: name, "data-c": "attachment-link", text: label }));
    } else {
      const url = a.url ? safeUrl(a.url) : null;  // a link a channel gave (older items)
      li.append(url ? h("a", { href: url, target: "_blank", rel: "noopener noreferrer", "data-c": "attachment-link", text: label })
        : h("span", { text: label }));
    }
    return li;
  }

  // ---------------------------------------------------------- reply files
  // Files for the next reply: picked, dropped or pasted; previewed, each removable.
  function addFiles(list) {
    const files = Array.from(list || []).filter((f) => f instanceof File);
    if (!files.length) return;
    convError(null);
    for (const file of files) {
      if (S.files.length >= MAX_FILES) { convError(new Error("At most " + MAX_FILES + " files in one reply.")); break; }
      const entry = { file, el: null };
      const thumb = h("span", { class: "c-thumb", "aria-hidden": "true", text: fileBadge(file) });
      entry.el = h("li", { class: "c-draft-file", "data-c": "draft-file", "data-name": file.name },
        thumb,
        h("span", { class: "c-draft-name" }, h("span", { text: file.name || "file" }),
          h("span", { class: "c-muted", text: fileSize(file.size) })),
        h("button", { type: "button", "data-c": "remove-file", "aria-label": "Remove " + file.name,
          title: "Remove", text: "×", onclick: () => removeFile(entry) }));
      S.files.push(entry);
      $("files").append(entry.el);
      preview(file, thumb);
    }
    show($("files"), S.files.length > 0);
  }
  function fileBadge(file) {  // "PDF", "TXT", ...: what a file without a preview shows
    const ext = /\.([a-z0-9]{1,4})$/i.exec(file.name || "");
    return ext ? ext[1].toUpperCase() : "FILE";
  }
  function removeFile(entry) {
    const at = S.files.indexOf(entry);
    if (at < 0) return;
    S.files.splice(at, 1);
    entry.el.remove();
    show($("files"), S.files.length > 0);
    const next = $("files").querySelectorAll('[data-c="remove-file"]')[Math.min(at, S.files.length - 1)];
    (next || $("reply")).focus();
  }
  function clearFiles() {
    S.files = [];
    clear($("files"));
    show($("files"), false);
  }
  // An image's preview, drawn from the file itself (no blob: or data: URL needed).
  function preview(file, thumb) {
    if (!/^image\//.test(file.type) || typeof createImageBitmap !== "function") return;
    createImageBitmap(file).then((bitmap) => {
      const canvas = h("canvas", { width: THUMB_PX, height: THUMB_PX, "data-c": "thumb" });
      const scale = Math.max(THUMB_PX / bitmap.width, THUMB_PX / bitmap.height);
      const w = bitmap.width * scale, ht = bitmap.height * scale;
      canvas.getContext("2d").drawImage(bitmap, (THUMB_PX - w) / 2, (THUMB_PX - ht) / 2, w, ht);
      bitmap.close();
      thumb.replaceChildren(canvas);
    }, () => { /* not an image the browser can draw: the badge stays */ });
  }
  const carriesFiles = (dt) => Boolean(dt) && Array.from(dt.types || []).includes("Files");

  // --------------------------------------------------------------- typing
  function onTyping(f) {
    if (!S.open || S.open.id !== f.conversation_id) return;
    if (!f.on) { hideTyping(); return; }
    const el = $("typing");
    el.textContent = (f.role === "customer" ? contactName(S.open.conv) : (f.name || "Another agent")) + " is typing…";
    el.dataset.role = f.role;
    show(el, true);
    clearTimeout(S.typingHide);
    S.typingHide = setTimeout(hideTyping, TYPING_SHOW_MS);
  }
  function hideTyping() { clearTimeout(S.typingHide); show($("typing"), false); }

  function typed() {
    if ($("note-toggle").checked || !isMine()) return;
    const text = $("reply").value;
    if (!text.trim()) { stopTyping(); return; }
    const now = Date.now();
    if (now - S.typingSentAt >= TYPING_EVERY_MS) {
      if (send({ type: "typing", conversation_id: S.open.id, on: true })) {
        S.typingSentAt = now;
        S.typingOn = true;
      }
    }
  }
  function stopTyping() {
    if (S.typingOn && S.open) send({ type: "typing", conversation_id: S.open.id, on: false });
    S.typingOn = false;
    S.typingSentAt = 0;
  }

  // -------------------------------------------------------------- actions
  async function act(path, body) {
    const open = S.open;
    if (!open) return null;
    convError(null);
    try {
      const conv = await api("POST", "/conversations/" + encodeURIComponent(open.id) + path, body);
      if (S.open === open && conv && conv.id === open.id) { open.conv = { ...conv, _at: Date.now() }; renderHead(); }
      return conv;
    } catch (e) {
      convError(e);
      return null;
    }
  }

  async function submitReply(e) {
    e.preventDefault();
    const open = S.open;
    const box = $("reply");
    const text = box.value.trim();
    const files = S.files.map((f) => f.file);
    if (!open || (!text && !files.length)) return;
    const note = $("note-toggle").checked;
    if (note && files.length) { convError(new Error("A private note cannot carry files: remove them, or send a reply.")); return; }
    const button = $("send");
    button.disabled = true;
    convError(null);
    try {
      let item;
      if (note) {
        item = await api("POST", "/conversations/" + encodeURIComponent(open.id) + "/notes", { text });
      } else {
        stopTyping();
        const body = text ? { text } : {};
        const channel = $("reply-channel").value;
        if (channel && open.conv && channel !== (open.conv.reply_channel || open.conv.channel)) body.channel = channel;
        let payload = body;
        if (files.length) {  // multipart: text, channel and the files
          payload = new FormData();
          for (const [k, v] of Object.entries(body)) payload.append(k, v);
          for (const f of files) payload.append("file", f, f.name);
        }
        item = await api("POST", "/conversations/" + encodeURIComponent(open.id) + "/messages", payload);
      }
      box.value = "";
      if (S.open === open) clearFiles();
      show($("canned-missing"), false);
      if (item && S.open === open && open.loaded) appendItem(open, item);
      scrollToBottom();
      if (!note) refreshConversation(open);  // the SLA timers moved on (first response met)
    } catch (err) {
      // the draft (text and files) stays, with the server's reason
      convError(err.status === 413 ? new Error("Not sent: " + err.message) : err);
    } finally {
      updateComposer();
    }
  }

  async function refreshConversation(open) {
    try {
      const conv = await api("GET", "/conversations/" + encodeURIComponent(open.id));
      newerConversation(open, conv);
    } catch (e) { /* the next live frame brings it */ }
  }
  // A conversation the API just answered: in the lists, the view and the results.
  function newerConversation(open, conv) {
    const c = { ...conv, _at: Date.now() };
    if (S.mine.has(c.id)) S.mine.set(c.id, c);
    if (S.queue.has(c.id)) { if (inQueueView(c)) S.queue.set(c.id, c); else S.queue.delete(c.id); }
    if (S.open === open && open.id === c.id) setOpenConv(open, c);
    renderLists();
    updateHit(c);
  }
  // The open conversation, newer. If where replies go (the channel the customer used
  // last, the contact's channels) changed, the picker and the profile follow: a picker
  // left on the old default would send the next reply there.
  function setOpenConv(open, c) {
    const was = open.conv;
    open.conv = c;
    renderHead();
    if (!was || channelsOf(was) !== channelsOf(c)) { renderChannels(c); if (c.contact) renderProfile(c.contact); }
  }
  function channelsOf(conv) {
    const ids = ((conv.contact && conv.contact.identities) || []).filter((i) => i.reachable).map((i) => i.channel);
    return (conv.reply_channel || conv.channel) + "|" + ids.sort().join(",");
  }

  async function loadCanned() {
    try {
      const out = await api("GET", "/canned");
      S.canned = out.items || [];
    } catch (e) { S.canned = []; }
    const sel = $("canned");
    clear(sel);
    sel.append(h("option", { value: "", text: S.canned.length ? "—" : "(none)" }));
    for (const c of S.canned) sel.append(h("option", { value: c.id, text: "/" + c.shortcode + (c.title ? " " + c.title : "") }));
  }

  async function useCanned() {
    const sel = $("canned");
    const id = sel.value;
    sel.value = "";
    if (!id || !S.open) return;
    try {
      const out = await api("GET", "/canned/" + encodeURIComponent(id) + "/render?conversation_id=" + encodeURIComponent(S.open.id));
      const box = $("reply");
      box.value = box.value ? box.value.replace(/\s*$/, " ") + out.text : out.text;
      const hint = $("canned-missing");
      hint.textContent = out.missing && out.missing.length ? "No value for " + out.missing.join(", ") + ": fill it in." : "";
      show(hint, Boolean(out.missing && out.missing.length));
      box.focus();
      typed();
    } catch (e) { convError(e); }
  }

  async function transfer(e) {
    e.preventDefault();
    const agentId = $("transfer-agent").value;
    const team = $("transfer-team").value.trim();
    if (!agentId && !team) { convError(new Error("Choose an agent or type a team.")); return; }
    const conv = await act("/transfer", agentId ? { agent_id: agentId } : { team });
    if (conv) {
      $("transfer").open = false;
      $("transfer-team").value = "";
      $("transfer-agent").value = "";
      toast("Transferred", "info");
    }
  }

  // --------------------------------------------------------------- labels
  function isStaff() { return Boolean(S.me) && (S.me.role === "agent" || S.me.role === "admin"); }
  function isAdmin() { return Boolean(S.me) && S.me.role === "admin"; }

  // The labels (GET /api/v1/labels). Loaded at sign-in and on every (re)connect; again
  // when a conversation names a label not known here (an admin added it meanwhile), at
  // most every 2 s, and when a picker or filter is opened.
  function loadLabels(force) {
    if (!isStaff()) return Promise.resolve();
    if (S.labelsLoad) return S.labelsLoad;
    if (!force && Date.now() - S.labelsAt < 2000) return Promise.resolve();
    S.labelsLoad = (async () => {
      try {
        const out = await api("GET", "/labels");
        S.labels = new Map((out.items || []).map((l) => [l.id, l]));
        S.labelsAt = Date.now();
        labelsChanged();
      } catch (e) {
        S.labelsAt = Date.now();
        if (e.status !== 401 && e.status !== 0) toast("Could not load the labels: " + e.message, "error");  // 0: offline, said already
      } finally {
        S.labelsLoad = null;
      }
    })();
    return S.labelsLoad;
  }
  function unknownLabel(ids) {
    const missing = ids.filter((id) => !S.labels.has(id) && !S.labelsGone.has(id));
    if (!missing.length || S.labelsRetry) return;
    const wait = Math.max(0, 2000 - (Date.now() - S.labelsAt));
    S.labelsRetry = setTimeout(async () => {
      if (S.labelsLoad) await S.labelsLoad;  // begun before the label was named: may not have it
      if (missing.some((id) => !S.labels.has(id))) await loadLabels(true);
      S.labelsRetry = null;
      for (const id of missing) if (!S.labels.has(id)) S.labelsGone.add(id);  // deleted: not asked again
    }, wait);
  }
  function labelsChanged() {
    renderLabelSelect($("search-label"), "Any");
    const queueSel = $("queue-label");
    if (S.queueLabel && !S.labels.has(S.queueLabel)) {  // deleted: the whole queue again
      S.queueLabel = "";
      reloadLists();
    }
    renderLabelSelect(queueSel, "All labels");
    queueSel.value = S.queueLabel;
    show(queueSel, isStaff() && (S.labels.size > 0 || Boolean(S.queueLabel)));
    renderLists();
    renderResults();
    renderConvLabels();
    renderManage();
  }
  function renderLabelSelect(sel, none) {
    const current = sel.value;
    const key = [...S.labels.values()].map((l) => l.id + "\u0000" + l.name).join("\u0001");
    if (sel.dataset.key === key) return;  // unchanged: an open drop-down stays as it is
    sel.dataset.key = key;
    clear(sel);
    sel.append(h("option", { value: "", text: none }));
    for (const l of S.labels.values()) sel.append(h("option", { value: l.id, text: l.name }));
    sel.value = S.labels.has(current) ? current : "";
  }

  // Black or white, whichever contrasts more with the colour (WCAG relative luminance).
  function textOn(color) {
    const m = /^#([0-9a-f]{6})$/i.exec(String(color));
    if (!m) return "#fff";
    const n = parseInt(m[1], 16);
    const lin = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    const lum = 0.2126 * lin((n >> 16) & 255) + 0.7152 * lin((n >> 8) & 255) + 0.0722 * lin(n & 255);
    return (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) ? "#000" : "#fff";
  }
  function labelChip(label) {
    const chip = h("span", { class: "c-label", "data-c": "label-chip", "data-label": label.id,
      title: label.name, text: label.name });
    if (/^#[0-9a-f]{6}$/i.test(label.color)) {  // the CSSOM, not a style attribute (CSP)
      chip.style.backgroundColor = label.color;
      chip.style.color = textOn(label.color);
    }
    return chip;
  }
  // The chips of a conversation's labels, in the labels' order (by name); null for none.
  function labelChips(ids) {
    ids = ids || [];
    if (!ids.length) return null;
    unknownLabel(ids);
    const known = [...S.labels.values()].filter((l) => ids.includes(l.id));
    if (!known.length) return null;
    return h("span", { class: "c-row-labels", "data-c": "labels" }, ...known.map((l) => labelChip(l)));
  }

  // The open conversation's chips, and the picker's boxes (ticked in place, so the
  // keyboard stays where it is when a live frame changes them).
  function renderConvLabels() {
    const open = S.open;
    const list = $("conv-labels");
    clear(list);
    if (!open || !open.conv) return;
    const ids = open.conv.labels || [];
    unknownLabel(ids);
    const ticked = open.labelsBusy ? open.labelsNext : ids;  // while saving: as the agent ticked them
    for (const l of S.labels.values()) if (ids.includes(l.id)) list.append(h("li", {}, labelChip(l)));
    const picker = $("label-picker");
    picker.dataset.busy = String(Boolean(open.labelsBusy));
    const choices = $("label-choices");
    const key = [...S.labels.values()].map((l) => l.id + "\u0000" + l.name + "\u0000" + l.color).join("\u0001");
    if (choices.dataset.key !== key || !choices.firstChild) {
      choices.dataset.key = key;
      clear(choices);
      if (!S.labels.size) {
        choices.append(h("p", { class: "c-muted", "data-c": "no-labels",
          text: isAdmin() ? "No labels yet: add them under Manage labels." : "No labels yet: an admin adds them." }));
      }
      for (const l of S.labels.values()) {
        choices.append(h("label", { class: "c-label-choice" },
          h("input", { type: "checkbox", value: l.id, "data-c": "label-option", "data-label": l.id,
            onchange: (e) => setLabel(l.id, e.target.checked) }),
          labelChip(l)));
      }
    }
    for (const box of choices.querySelectorAll('[data-c="label-option"]')) {
      box.checked = ticked.includes(box.value);
      box.disabled = Boolean(open.labelsBusy);
    }
  }

  // Add or take off one label: the whole list is sent (PUT), the answer is the
  // conversation. Two agents at once: the last one's list holds, and both see it live.
  async function setLabel(id, on) {
    const open = S.open;
    if (!open || !open.conv || open.labelsBusy) return;
    const current = (open.conv.labels || []).filter((x) => S.labels.has(x));  // none deleted meanwhile
    const next = on ? [...current.filter((x) => x !== id), id] : current.filter((x) => x !== id);
    open.labelsBusy = true;
    open.labelsNext = next;
    convError(null);
    renderConvLabels();
    try {
      const conv = await api("PUT", "/conversations/" + encodeURIComponent(open.id) + "/labels", { labels: next });
      if (conv && conv.id) newerConversation(open, conv);
    } catch (e) {
      if (S.open === open) convError(e);
      if (e.status === 400) loadLabels(true);  // one was deleted
    } finally {
      open.labelsBusy = false;
      if (S.open === open) renderConvLabels();
      const box = [...$("label-choices").querySelectorAll('[data-c="label-option"]')].find((b) => b.value === id);
      if (box && S.open === open && document.activeElement === document.body) box.focus();
    }
  }

  // ------------------------------------------------------- label management
  // Admins: add, rename, recolour, delete (POST/PATCH/DELETE /api/v1/labels).
  function manageError(err) {
    const el = $("manage-error");
    el.textContent = err ? err.message || String(err) : "";
    show(el, Boolean(err));
  }
  function renderManage() {
    if (!isAdmin()) return;
    const list = $("manage-list");
    const key = [...S.labels.values()].map((l) => l.id + "\u0000" + l.name + "\u0000" + l.color).join("\u0001");
    if (list.dataset.key === key) return;  // unchanged: leave what is being typed alone
    list.dataset.key = key;
    clear(list);
    for (const l of S.labels.values()) {
      const name = h("input", { type: "text", value: l.name, maxlength: 60, "data-c": "label-name",
        "aria-label": "Name of the label " + l.name });
      const color = h("input", { type: "color", value: l.color, "data-c": "label-color",
        "aria-label": "Colour of the label " + l.name });
      const save = async () => {
        const changes = {};
        if (name.value.trim() !== l.name) changes.name = name.value.trim();
        if (color.value.toLowerCase() !== l.color.toLowerCase()) changes.color = color.value;
        if (!Object.keys(changes).length) return;
        manageError(null);
        try {
          await api("PATCH", "/labels/" + encodeURIComponent(l.id), changes);
          toast("Label saved", "info");
        } catch (e) { manageError(e); }
        loadLabels(true);
      };
      list.append(h("li", { class: "c-manage-row", "data-c": "manage-label", "data-label": l.id },
        h("span", { class: "c-manage-chip" }, labelChip(l)), name, color,
        h("button", { type: "button", "data-c": "label-save", text: "Save", onclick: save }),
        deleteButton(l)));
      name.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); save(); } });
    }
    if (!S.labels.size) list.append(h("li", { class: "c-muted", text: "None yet." }));
  }
  // Delete asks once more, in place: a second click within 5 s deletes.
  function deleteButton(l) {
    let armed = null;
    const button = h("button", { type: "button", "data-c": "label-delete", "aria-label": "Delete the label " + l.name, text: "Delete" });
    const disarm = () => { clearTimeout(armed); armed = null; button.textContent = "Delete"; delete button.dataset.armed; };
    button.addEventListener("blur", disarm);
    button.addEventListener("click", async () => {
      if (!armed) {
        button.textContent = "Delete: sure?";
        button.dataset.armed = "true";
        armed = setTimeout(disarm, 5000);
        manageError(new Error("Deleting " + l.name + " takes it off every conversation. Click again to delete it."));
        return;
      }
      disarm();
      manageError(null);
      try { await api("DELETE", "/labels/" + encodeURIComponent(l.id)); toast("Label deleted", "info"); } catch (e) { manageError(e); }
      loadLabels(true);
    });
    return button;
  }
  async function addLabel(e) {
    e.preventDefault();
    const name = $("label-new-name");
    if (!name.value.trim()) { manageError(new Error("Give the label a name.")); name.focus(); return; }
    manageError(null);
    try {
      await api("POST", "/labels", { name: name.value.trim(), color: $("label-new-color").value });
      name.value = "";
    } catch (err) { manageError(err); }
    await loadLabels(true);
    name.focus();
  }

  // --------------------------------------------------------------- search
  // Folded as the server folds (gateway/store/search.py: NFKD, marks dropped, lower case),
  // so the words it matched can be found and marked in the text.
  const WORD = /[\p{L}\p{N}_]+/gu;
  function fold(text) {
    return String(text).normalize("NFKD").replace(/\p{M}/gu, "").toLowerCase()
      .replace(/\u00df/g, "ss").replace(/\u03c2/g, "\u03c3").replace(/\p{M}/gu, "");
  }
  // The query's words (2 to 40 characters), and the prefix its last word also matches
  // as (3 characters or more, not a number): the server's rule for search as you type.
  function queryWords(q) {
    const words = [...new Set((fold(q).match(WORD) || []).filter((w) => w.length >= 2 && w.length <= 40))].slice(0, 8);
    const last = words[words.length - 1];
    const prefix = last && last.length >= 3 && !/^\d+$/.test(last) ? last : null;
    return { words, prefix };
  }
  // The ranges [start, end) of `text` (UTF-16 offsets) that are one of the words, or
  // begin with the prefix. The text is folded a character at a time, each folded
  // character remembering where it came from.
  function matches(text, words, prefix) {
    if (!text || (!words.length && !prefix)) return [];
    let folded = "";
    const from = [], to = [];
    let at = 0;
    for (const ch of text) {
      const f = fold(ch);
      const end = at + ch.length;
      if (!f.length && to.length) to[to.length - 1] = end;  // a combining mark: with the letter before
      for (let k = 0; k < f.length; k++) { from.push(at); to.push(end); }
      folded += f;
      at = end;
    }
    const set = new Set(words), found = [];
    for (const m of folded.matchAll(WORD)) {
      const w = m[0];
      if (set.has(w) || (prefix && w.startsWith(prefix))) found.push([from[m.index], to[m.index + w.length - 1]]);
    }
    return found;
  }
  // A snippet of `text` around its first match, the matches in <mark> elements (text
  // nodes inside, never markup from the text).
  const SNIPPET = 180, BEFORE = 50;
  function snippet(text, words, prefix) {
    text = String(text || "").slice(0, 20000);
    const found = matches(text, words, prefix);
    let start = 0;
    if (found.length && found[0][0] > BEFORE) {
      start = found[0][0] - BEFORE;
      const space = text.slice(start, found[0][0]).search(/\s/);
      if (space >= 0 && space < 20) start += space + 1;
    }
    let end = Math.min(text.length, start + SNIPPET);
    if (/[\udc00-\udfff]/.test(text.charAt(start))) start -= 1;  // never half a character
    if (/[\ud800-\udbff]/.test(text.charAt(end - 1))) end += 1;
    const el = h("span", { class: "c-snippet", "data-c": "snippet" });
    if (start > 0) el.append("…");
    let at = start;
    for (const [s, e] of found) {
      if (e <= start || s >= end) continue;
      const a = Math.max(s, start), b = Math.min(e, end);
      if (a > at) el.append(document.createTextNode(text.slice(at, a)));
      el.append(h("mark", { text: text.slice(a, b) }));
      at = b;
    }
    if (at < end) el.append(document.createTextNode(text.slice(at, end)));
    if (end < text.length) el.append("…");
    return { el, found: found.length > 0 };
  }
  // What of the message matched: its text, else an email's subject, a file's name or the
  // customer's name (the server finds messages by those too).
  function hitSnippet(msg, words, prefix) {
    const data = msg.channel_data || {};
    const texts = [msg.text, typeof data.subject === "string" ? data.subject : null,
      ...(msg.attachments || []).map((a) => a && a.name), msg.sender && msg.sender.name]
      .filter((t) => typeof t === "string" && t);
    for (const t of texts) {
      const s = snippet(t, words, prefix);
      if (s.found) return s.el;
    }
    return snippet(texts[0] || (msg.attachments && msg.attachments.length ? "(attachment)" : ""), words, prefix).el;
  }

  function searchParams() {
    const q = $("search-q").value.trim();
    const params = new URLSearchParams();
    if (q) params.set("q", q);
    const channel = $("search-channel").value, owner = $("search-owner").value, label = $("search-label").value;
    if (channel) params.set("channel", channel);
    if (owner) params.set("owner", owner);
    if (label) params.set("label", label);
    const since = $("search-since").value, until = $("search-until").value;
    // the agent's own days: from the first day's midnight to the last day's end, here
    if (since) params.set("since", localMidnight(since, 0));
    if (until) params.set("until", localMidnight(until, 1));
    const filters = [channel, owner, label, since, until].filter(Boolean).length;
    const count = $("search-filter-count");
    count.textContent = String(filters);
    show(count, filters > 0);
    if (!q && !filters) return null;
    if (since && until && until < since) return { error: "The To date is before the From date." };
    params.set("limit", String(SEARCH_LIMIT));
    return { params, q };
  }
  function localMidnight(date, plusDays) {
    const [y, m, d] = date.split("-").map(Number);
    return new Date(y, m - 1, d + plusDays).toISOString();
  }

  function scheduleSearch() {
    clearTimeout(S.search.timer);
    S.search.timer = setTimeout(runSearch, SEARCH_DEBOUNCE_MS);
  }
  async function runSearch() {
    clearTimeout(S.search.timer);
    const seq = ++S.search.seq;
    const want = searchParams();
    if (!want) { showSearch(false); return; }
    showSearch(true);
    const status = $("search-status");
    if (want.error) {
      S.search.hits = []; S.search.partial = false;
      renderResults();
      status.textContent = want.error;
      status.dataset.state = "error";
      return;
    }
    status.textContent = "Searching…";
    status.dataset.state = "loading";
    $("search-box").setAttribute("aria-busy", "true");
    try {
      const out = await api("GET", "/search/conversations?" + want.params.toString());
      if (seq !== S.search.seq) return;  // a newer search answers
      const { words, prefix } = queryWords(want.q || "");
      S.search.hits = (out.items || []).map((hit) => ({ ...hit, conversation: { ...hit.conversation, _at: Date.now() } }));
      S.search.partial = Boolean(out.partial);
      S.search.words = words; S.search.prefix = prefix;
      renderResults();
      const n = S.search.hits.length;
      status.textContent = n ? n + (n === 1 ? " conversation" : " conversations") + (n >= SEARCH_LIMIT ? " (the newest " + SEARCH_LIMIT + ")" : "")
        : "No conversations found.";
      status.dataset.state = n ? "done" : "empty";
    } catch (e) {
      if (seq !== S.search.seq) return;
      S.search.hits = []; S.search.partial = false;
      renderResults();
      status.textContent = "Search failed: " + e.message;
      status.dataset.state = "error";
    } finally {
      if (seq === S.search.seq) $("search-box").removeAttribute("aria-busy");
    }
  }
  function showSearch(on) {
    S.search.active = on;
    show($("search-box"), on);
    show($("lists"), !on);
    if (!on) { S.search.hits = []; S.search.partial = false; clear($("search-results")); $("search-status").textContent = ""; }
  }
  function resetSearch() {
    clearTimeout(S.search.timer);
    S.search.seq++;
    $("search-q").value = "";
    resetFilters();
    showSearch(false);
  }
  function resetFilters() {
    for (const name of ["search-channel", "search-owner", "search-label", "search-since", "search-until"]) $(name).value = "";
    searchParams();  // the filter count
  }

  function hitRow(hit) {
    const conv = hit.conversation, msg = hit.message;
    const owner = conv.owner === "agent" ? (S.me && conv.assignee_id === S.me.id ? "yours" : agentName(conv.assignee_id))
      : OWNER_TEXT[conv.owner] || String(conv.owner);
    const at = msg ? msg.created_at : conv.last_activity_at || conv.created_at;
    const button = h("button", {
      type: "button", class: "c-row c-hit" + (S.open && S.open.id === conv.id ? " c-row-open" : ""),
      "data-c": "search-hit", "data-id": conv.id, "data-owner": conv.owner,
      onclick: () => openConversation(conv.id),
    },
    h("span", { class: "c-row-top" },
      channelBadge(msg ? msg.channel : conv.reply_channel || conv.channel),
      h("span", { class: "c-row-name", "data-c": "hit-name", text: contactName(conv) }),
      h("time", { class: "c-hit-time", datetime: at, text: when(at) })),
    h("span", { class: "c-row-meta" },
      h("span", { class: "c-hit-state", "data-c": "hit-state", "data-owner": conv.owner, text: owner })),
    labelChips(conv.labels),
    msg ? hitSnippet(msg, S.search.words, S.search.prefix) : null);
    return h("li", {}, button);
  }
  function renderResults() {
    if (!S.search.active) return;
    const list = $("search-results");
    const focused = focusedRow();
    clear(list);
    for (const hit of S.search.hits) list.append(hitRow(hit));
    $("search-count").textContent = String(S.search.hits.length);
    show($("search-partial"), S.search.partial);
    refocus(focused);
  }
  // A conversation changed (live or by our hand): its hit shows it.
  function updateHit(conv) {
    if (!S.search.active) return;
    let changed = false;
    for (const hit of S.search.hits) if (hit.conversation.id === conv.id) { hit.conversation = conv; changed = true; }
    if (changed) renderResults();
  }

  // ---------------------------------------------------------------- wiring
  function wire() {
    $("login-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", signOut);
    $("presence").addEventListener("change", changePresence);
    $("notify-perm").addEventListener("click", async () => {
      try { await Notification.requestPermission(); } catch (e) { /* ignore */ }
      show($("notify-perm"), Notification.permission === "default");
    });
    $("close-conv").addEventListener("click", () => {
      if (S.open) send({ type: "unsubscribe", conversation_id: S.open.id });
      stopTyping();
      S.open = null;
      closeConversationView();
      renderLists();
      renderResults();
    });
    window.addEventListener("hashchange", openFromAddress);
    $("search-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
    $("search-q").addEventListener("input", scheduleSearch);
    $("search-q").addEventListener("keydown", (e) => {
      if (e.key === "Escape" && ($("search-q").value || S.search.active)) { e.preventDefault(); resetSearch(); }
    });
    for (const name of ["search-channel", "search-owner", "search-label", "search-since", "search-until"]) {
      $(name).addEventListener("change", runSearch);
    }
    $("search-label").addEventListener("focus", () => loadLabels(false));
    $("search-reset").addEventListener("click", () => { resetFilters(); runSearch(); });
    $("search-clear").addEventListener("click", () => { resetSearch(); $("search-q").focus(); });
    $("queue-label").addEventListener("focus", () => loadLabels(false));
    $("queue-label").addEventListener("change", () => {
      S.queueLabel = $("queue-label").value;
      S.queue.clear();
      renderLists();
      reloadLists();
    });
    const picker = $("label-picker");
    picker.addEventListener("toggle", () => { if (picker.open) loadLabels(false); });
    picker.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && picker.open) { e.preventDefault(); picker.open = false; $("label-picker-toggle").focus(); }
    });
    $("label-new").addEventListener("submit", addLabel);
    $("claim").addEventListener("click", () => act("/claim"));
    $("composer-action").addEventListener("click", () => {
      if ($("composer-action").dataset.action === "claim") { act("/claim"); return; }
      $("note-toggle").checked = true;
      updateComposer();
      $("reply").focus();
    });
    $("resolve").addEventListener("click", () => act("/resolve"));
    $("handback").addEventListener("click", () => act("/handback"));
    $("transfer-form").addEventListener("submit", transfer);
    $("composer").addEventListener("submit", submitReply);
    $("note-toggle").addEventListener("change", () => { stopTyping(); updateComposer(); });
    $("canned").addEventListener("change", useCanned);
    $("attach").addEventListener("click", () => $("file-input").click());
    $("file-input").addEventListener("change", () => { addFiles($("file-input").files); $("file-input").value = ""; });
    const view = $("conversation");
    for (const type of ["dragenter", "dragover"]) {
      view.addEventListener(type, (e) => {
        if (!carriesFiles(e.dataTransfer)) return;
        e.preventDefault();
        e.dataTransfer.dropEffect = "copy";
        view.dataset.drop = "true";
      });
    }
    view.addEventListener("dragleave", (e) => { if (!e.relatedTarget || !view.contains(e.relatedTarget)) delete view.dataset.drop; });
    view.addEventListener("drop", (e) => {
      delete view.dataset.drop;
      if (!carriesFiles(e.dataTransfer)) return;
      e.preventDefault();
      addFiles(e.dataTransfer.files);
      $("reply").focus();
    });
    // a file dropped anywhere else must not replace the console with the file
    for (const type of ["dragover", "drop"]) {
      document.addEventListener(type, (e) => { if (carriesFiles(e.dataTransfer)) e.preventDefault(); });
    }
    const reply = $("reply");
    reply.addEventListener("paste", (e) => {
      const data = e.clipboardData;
      if (!data || !data.files || !data.files.length) return;
      addFiles(data.files);
      if (!data.types.includes("text/plain")) e.preventDefault();
    });
    reply.addEventListener("input", typed);
    reply.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
    });
    timelineBox().addEventListener("scroll", () => { if (timelineBox().scrollTop < 60) loadOlder(); });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && S.open) { S.unread.delete(S.open.id); renderLists(); }
    });
    setInterval(() => {  // waiting times and SLA timers move on (in place: no re-render)
      if (!S.me) return;
      tickLists();
      if (Date.now() - S.labelsAt > LABELS_EVERY_MS) loadLabels(true);  // renamed or recoloured meanwhile
      if (S.open && S.open.conv) {
        const el = $("conv-sla");
        if (el) { const s = slaText(S.open.conv); el.textContent = s.text; el.dataset.state = s.state; }
      }
    }, 1000);
  }

  async function boot() {
    wire();
    try {
      const session = await api("GET", "/session");
      if (session.via === "session") { start(session); return; }
    } catch (e) { /* not signed in */ }
    showLogin("");
  }

  boot();
})();
