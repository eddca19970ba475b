/*
 * Omnigate web chat widget.
 *
 * Embed with one tag:
 *   <script src="https://gateway.example/webchat/widget.js" defer></script>
 * Optional attributes: data-title, data-open="true", data-storage-key,
 * data-links="false" (no "Continue on Telegram" / "Link your email").
 * Theme: set `--og-accent` on `#omnigate-webchat` from the host page.
 *
 * Speaks protocol version 1 (docs/webchat-protocol.md). Vanilla ES2020, no
 * dependencies, CSP-safe: DOM is built with createElement/textContent only,
 * styles come from widget.css loaded inside an open Shadow DOM.
 *
 * Files: the paperclip, drag and drop onto the chat, or paste put files in a tray
 * above the text box; sending uploads them with the text over HTTP (POST
 * /webchat/upload, "Files" in the protocol doc). Image previews are drawn on a
 * canvas (no blob: or data: URL, so the host page's img-src does not matter); the
 * files in the chat load from the gateway's origin, which the host page's img-src
 * must allow for inline images.
 */
(function () {
  "use strict";

  // Must be captured synchronously: currentScript is null once we go async.
  const SCRIPT = document.currentScript || document.querySelector('script[src*="/webchat/widget.js"]');
  if (!SCRIPT || window.OmnigateWebchat) return; // not loadable as a module; no double init

  const BASE = new URL(".", SCRIPT.src); // .../webchat/
  const WS_URL = (BASE.protocol === "https:" ? "wss:" : "ws:") + "//" + BASE.host + "/webchat/ws";
  const CSS_URL = BASE.origin + "/webchat/widget.css";
  const UPLOAD_URL = BASE.origin + "/webchat/upload";
  const TITLE = SCRIPT.dataset.title || "Chat with us";
  const PREFIX = SCRIPT.dataset.storageKey || "omnigate";
  const START_OPEN = SCRIPT.dataset.open === "true";
  const LINKS = SCRIPT.dataset.links !== "false";
  let linkable = ["email", "telegram"]; // until the server's welcome says which it runs
  // A link from another channel (Telegram, Slack, a mail) that continues the customer's
  // conversation here: #omnigate-link=link_... in the page URL. Taken out of the address
  // bar at once (single use; not bookmarked), sent with the next hello only.
  let arrivalLink = (() => {
    const m = /(?:^#|&)omnigate-link=(link_[A-Za-z0-9_-]{1,59})(?:&|$)/.exec(location.hash || "");
    if (!m) return null;
    try { history.replaceState(null, "", location.pathname + location.search); } catch (e) { /* ignore */ }
    return m[1];
  })();

  const PING_MS = 25000;          // keep-alive while open
  const STALE_MS = 70000;         // nothing heard for this long: the socket is dead
  const HANDSHAKE_MS = 20000;     // from opening the socket to `synced`
  const BACKOFF_MIN = 500, BACKOFF_MAX = 15000;
  const TYPING_EVERY_MS = 2000;   // repeat `typing on` at most this often while typing
  const TYPING_IDLE_MS = 4000;    // no key for this long: `typing off`
  const AGENT_TYPING_MS = 6000;   // the agent's indicator goes away without a new `on`
  const LINK_REFRESH_MS = 60000;  // ask for a new deep link this long before it expires
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAX_FILES = 10;           // files in one message (the server's limit too)
  const LINK_FRESH_MS = 55 * 60000; // file links work for an hour from when they came
  const UPLOAD_TRIES = 5;         // network errors in a row before an upload is given up
  const THUMB_PX = 96;            // preview canvases (shown at half that: sharp on HiDPI)
  const ERROR_TEXT = {
    text_too_long: "Too long, not sent",
    bad_frame: "Not sent",
    too_large: "Too long, not sent",
  };

  // ---------------------------------------------------------------- storage
  // localStorage can throw (privacy modes, quota); the widget must still work.
  const store = {
    get(key) { try { return localStorage.getItem(PREFIX + "." + key); } catch (e) { return null; } },
    set(key, value) {
      try {
        if (value === null) localStorage.removeItem(PREFIX + "." + key);
        else localStorage.setItem(PREFIX + "." + key, value);
      } catch (e) { /* ignore */ }
    },
  };

  // Unacked outgoing frames, persisted so a reload does not lose them. Every
  // change re-reads storage first so two tabs do not overwrite each other.
  const outbox = {
    read() {
      try {
        const list = JSON.parse(store.get("queue") || "[]");
        return Array.isArray(list) ? list.filter((f) => f && typeof f.client_id === "string") : [];
      } catch (e) { return []; }
    },
    add(frame) { const list = outbox.read(); list.push(frame); store.set("queue", JSON.stringify(list)); },
    remove(clientId) {
      const list = outbox.read().filter((f) => f.client_id !== clientId);
      store.set("queue", list.length ? JSON.stringify(list) : null);
    },
  };

  // ------------------------------------------------------------------ state
  let ws = null;
  let state = "offline";       // offline | connecting | online
  let watermark = null;        // highest seq rendered in this page (memory only)
  let lowestSeq = null;        // oldest seq rendered, for "Load earlier"
  let attempt = 0;             // reconnect attempts since last sync
  let reconnectTimer = null, pingTimer = null, retryTimer = null, retryDelay = 2000;
  let handshakeTimer = null;   // gives up on a socket that never reaches `synced`
  let lastHeard = 0;
  let resetPending = false;    // invalid token seen: start over on close
  let helloWait = null;        // ms the server asked us to wait before the next hello (4429)
  let historyBusy = false;
  let helloWatermark = null;   // the watermark the current hello asked from
  let isOpen = false;
  let unread = 0;
  let buttonsRow = null;       // { el, seq } suggested actions currently shown
  const pending = new Map();   // client_id -> { frame, el } for every send of this page
  let hasConversation = false; // the visitor has a conversation (deep links continue it)
  let typingOn = false, typingSentAt = 0, typingIdleTimer = null;
  let agentTypingTimer = null;
  let requests = [];           // kinds of frames awaiting their one answer, in order
  let linkTimer = null;        // refreshes the Telegram link before it expires
  let linkExpires = 0;
  const seenClientIds = new Set(); // client_ids of customer items already rendered
  let draft = [];              // files chosen for the next message: { file, el }
  const uploads = new Map();   // client_id -> { client_id, text, files, busy, timer, ... }
  let fileAsks = [];           // attachment ids of `file` frames awaiting their answer, in order
  const fileWaiters = new Map(); // attachment id -> [{ resolve, reject }]

  // ------------------------------------------------------------------- DOM
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c) el.append(c);
    return el;
  }

  // Small inline icons, built node by node (no innerHTML).
  function icon(paths, cls) {
    const svg = document.createElementNS(SVG_NS, "svg");
    if (cls) svg.setAttribute("class", cls);
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    for (const d of paths) {
      const p = document.createElementNS(SVG_NS, "path");
      p.setAttribute("d", d);
      svg.append(p);
    }
    return svg;
  }
  const ICON_CHAT = ["M4 5.5A2.5 2.5 0 0 1 6.5 3h11A2.5 2.5 0 0 1 20 5.5v8a2.5 2.5 0 0 1-2.5 2.5H10l-4.2 3.6A.5.5 0 0 1 5 19.2V16a2.5 2.5 0 0 1-1-2v-8.5Z"];
  const ICON_CLOSE = ["M6 6l12 12M18 6L6 18"];
  const ICON_SEND = ["M4 12l16-8-6 16-2.5-6.5L4 12Z"];
  const ICON_CLIP = ["M20.5 11.5l-8.3 8.3a5.3 5.3 0 0 1-7.5-7.5l8.6-8.6a3.5 3.5 0 0 1 5 5l-8.6 8.6a1.8 1.8 0 0 1-2.5-2.5l7.9-7.9"];
  const ICON_FILE = ["M7 3h7l5 5v13H7z", "M14 3v5h5"];

  const host = h("div", { id: "omnigate-webchat" });
  const shadow = host.attachShadow({ mode: "open" });
  // Stay hidden until the stylesheet arrives so nothing flashes unstyled.
  const root = h("div", { class: "og-root", hidden: true });
  const link = h("link", { rel: "stylesheet", href: CSS_URL });
  link.addEventListener("load", () => root.removeAttribute("hidden"));
  link.addEventListener("error", () => root.removeAttribute("hidden"));

  const badge = h("span", { class: "og-badge", hidden: true, "aria-hidden": "true" });
  const launcher = h("button", {
    type: "button", class: "og-launcher", "data-og": "launcher",
    "aria-label": "Open chat", "aria-expanded": "false", "aria-controls": "og-panel",
    onclick: () => (isOpen ? close() : open()),
  }, icon(ICON_CHAT, "og-i-chat"), icon(ICON_CLOSE, "og-i-close"), badge);

  const statusEl = h("span", { class: "og-status", "data-og": "status", "data-state": "offline", text: "offline" });
  const closeBtn = h("button", {
    type: "button", class: "og-icon-btn", "aria-label": "Close chat", onclick: () => close(),
  }, icon(ICON_CLOSE));
  const header = h("div", { class: "og-header" },
    h("div", { class: "og-heading" }, h("h2", { class: "og-title", text: TITLE }), statusEl),
    closeBtn);

  const moreBtn = h("button", {
    type: "button", class: "og-more", hidden: true, text: "Load earlier messages",
    "aria-label": "Load earlier messages", onclick: loadEarlier,
  });
  const list = h("div", {
    class: "og-messages", "data-og": "messages", role: "log", "aria-live": "polite",
    "aria-label": "Conversation",
  });
  const scroller = h("div", { class: "og-scroll" }, moreBtn, list);
  // What a link from another channel did (connected, expired, used, ...).
  const linkNote = h("div", {
    class: "og-linked", "data-og": "linked", role: "status", "aria-live": "polite", hidden: true,
  });

  // "Alice is typing…": outside the log, announced politely.
  const typingEl = h("div", {
    class: "og-typing", "data-og": "typing", role: "status", "aria-live": "polite", hidden: true,
  });

  // Continue on another channel: a Telegram deep link (shown only once the server gave
  // one) and linking an email address by a mailed code.
  const telegramBtn = h("a", {
    class: "og-tool og-telegram", "data-og": "telegram", target: "_blank", rel: "noopener noreferrer",
    hidden: true, text: "Continue on Telegram",
    onclick: () => setTimeout(() => requestLink(true), 0), // single use: have a fresh one ready
  });
  const emailToggle = h("button", {
    type: "button", class: "og-tool", "data-og": "email-toggle", "aria-expanded": "false",
    "aria-controls": "og-email", hidden: !LINKS, text: "Link your email",
    onclick: () => showEmail(emailBox.hidden),
  });
  const tools = h("div", { class: "og-tools" }, telegramBtn, emailToggle);

  const emailInput = h("input", {
    id: "og-email-address", class: "og-field", "data-og": "email-address", type: "email",
    autocomplete: "email", required: true, maxlength: "254", placeholder: "you@example.com",
  });
  const emailSend = h("button", { type: "submit", class: "og-small-btn", "data-og": "email-send", text: "Send code" });
  const emailForm = h("form", { class: "og-email-step", "data-og": "email-form" },
    h("label", { for: "og-email-address", text: "Your email address" }),
    h("div", { class: "og-row" }, emailInput, emailSend));
  emailForm.addEventListener("submit", (e) => { e.preventDefault(); askCode(); });

  const codeInput = h("input", {
    id: "og-email-code", class: "og-field", "data-og": "email-code", type: "text",
    inputmode: "numeric", autocomplete: "one-time-code", required: true, maxlength: "16",
    placeholder: "123456",
  });
  const codeSend = h("button", { type: "submit", class: "og-small-btn", "data-og": "email-verify", text: "Verify" });
  const codeHint = h("p", { class: "og-hint", "data-og": "email-sent-to" });
  const otherAddress = h("button", {
    type: "button", class: "og-linkish", text: "Use another address", onclick: () => emailStep("address"),
  });
  const codeForm = h("form", { class: "og-email-step", "data-og": "code-form", hidden: true },
    codeHint,
    h("label", { for: "og-email-code", text: "Code from the mail" }),
    h("div", { class: "og-row" }, codeInput, codeSend), otherAddress);
  codeForm.addEventListener("submit", (e) => { e.preventDefault(); verifyCode(); });

  const emailMsg = h("p", { class: "og-email-msg", "data-og": "email-msg", role: "status", "aria-live": "polite" });
  const emailBox = h("div", {
    id: "og-email", class: "og-email", "data-og": "email", role: "group",
    "aria-label": "Link your email address", hidden: true,
  }, emailForm, codeForm, emailMsg);

  const input = h("textarea", {
    class: "og-input", "data-og": "input", rows: "1", placeholder: "Type a message…",
    "aria-label": "Message", autocomplete: "off",
  });
  const sendBtn = h("button", {
    type: "submit", class: "og-send", "data-og": "send", "aria-label": "Send message",
  }, icon(ICON_SEND));

  // Files for the next message: the paperclip opens the picker; drop and paste add too.
  const fileInput = h("input", {
    type: "file", multiple: true, hidden: true, tabindex: "-1", "data-og": "file-input",
    "aria-label": "Files to send",
  });
  fileInput.addEventListener("change", () => { addFiles(fileInput.files); fileInput.value = ""; });
  const attachBtn = h("button", {
    type: "button", class: "og-attach", "data-og": "attach", "aria-label": "Attach files",
    title: "Attach files", onclick: () => fileInput.click(),
  }, icon(ICON_CLIP));
  const tray = h("ul", { class: "og-tray", "data-og": "tray", "aria-label": "Files to send", hidden: true });
  const composerMsg = h("p", {
    class: "og-composer-msg", "data-og": "composer-msg", role: "alert", hidden: true,
  });

  const form = h("form", { class: "og-composer" }, attachBtn, fileInput, input, sendBtn);
  form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  input.addEventListener("input", () => (input.value.trim() ? typing(true) : typing(false)));
  input.addEventListener("keydown", (e) => {
    // Enter sends, Shift+Enter is a newline; never interrupt an IME composition.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });

  const panel = h("div", {
    id: "og-panel", class: "og-panel", "data-og": "panel", role: "dialog",
    "aria-label": TITLE, hidden: true,
  }, header, linkNote, scroller, typingEl, tools, emailBox, composerMsg, tray, form);
  panel.addEventListener("keydown", (e) => { if (e.key === "Escape") { close(); launcher.focus(); } });

  // Drag files onto the chat, or paste them (a screenshot, files copied in a file manager).
  const carriesFiles = (dt) => Boolean(dt) && Array.from(dt.types || []).includes("Files");
  for (const type of ["dragenter", "dragover"]) {
    panel.addEventListener(type, (e) => {
      if (!carriesFiles(e.dataTransfer)) return;
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
      panel.dataset.drop = "true";
    });
  }
  panel.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget || !panel.contains(e.relatedTarget)) delete panel.dataset.drop;
  });
  panel.addEventListener("drop", (e) => {
    delete panel.dataset.drop;
    if (!carriesFiles(e.dataTransfer)) return;
    e.preventDefault();
    addFiles(e.dataTransfer.files);
    input.focus({ preventScroll: true });
  });
  panel.addEventListener("paste", (e) => {
    const data = e.clipboardData;
    if (!data || !data.files || !data.files.length) return;
    addFiles(data.files);
    if (!data.types.includes("text/plain")) e.preventDefault(); // nothing else to paste
  });
  // A click on a file whose link is old: ask for a fresh one first (`file` frame).
  list.addEventListener("click", openFile);

  root.append(panel, launcher);
  shadow.append(link, root);

  // ------------------------------------------------------------- rendering
  function nearBottom() { return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80; }
  function scrollToBottom() { scroller.scrollTop = scroller.scrollHeight; }

  // Text with http(s) links made clickable; everything else stays plain text.
  function richText(text) {
    const frag = document.createDocumentFragment();
    const re = /\bhttps?:\/\/[^\s<>"']+[^\s<>"'.,;:!?)\]]/g;
    let last = 0, m;
    while ((m = re.exec(text))) {
      frag.append(text.slice(last, m.index));
      frag.append(h("a", { href: m[0], target: "_blank", rel: "noopener noreferrer", text: m[0] }));
      last = m.index + m[0].length;
    }
    frag.append(text.slice(last));
    return frag;
  }

  function safeUrl(url) {
    try {
      const u = new URL(String(url), BASE);
      return u.protocol === "https:" || u.protocol === "http:" ? u.href : null;
    } catch (e) { return null; }
  }

  // A link button's target: http(s), or a mailto: (continue by email).
  function safeLink(url) {
    if (typeof url === "string" && /^mailto:[^\s"<>]+$/.test(url)) return url;
    return safeUrl(url);
  }

  function formatSize(n) {
    if (typeof n !== "number") return "";
    return n < 1024 ? n + " B" : n < 1048576 ? Math.round(n / 1024) + " KB" : (n / 1048576).toFixed(1) + " MB";
  }

  function formatTime(ts) {
    const d = new Date(ts);
    return isNaN(d) ? "" : d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
  }

  // Build one message/event element (not yet in the list).
  function buildItem(item) {
    const isEvent = item.type === "event";
    const role = isEvent ? "system" : (["customer", "bot", "agent", "system"].includes(item.role) ? item.role : "bot");
    const el = h("div", { class: "og-msg og-" + role, "data-og": "msg", "data-role": role });
    if (typeof item.seq === "number") el.dataset.seq = String(item.seq);
    if (typeof item.id === "string") el.dataset.id = item.id;
    if (isEvent && item.name) el.dataset.event = String(item.name);
    const text = typeof item.text === "string" ? item.text : "";
    if (role === "system") {
      el.append(h("div", { class: "og-note", text: text || String(item.name || "") }));
      return el;
    }
    if (role === "agent" && item.sender && item.sender.name) {
      el.append(h("div", { class: "og-sender", text: String(item.sender.name) }));
    }
    const bubble = h("div", { class: "og-bubble" });
    if (item.timestamp) bubble.title = formatTime(item.timestamp);
    if (text) bubble.append(richText(text));
    const files = buildFiles(item.attachments);
    if (files) bubble.append(files);
    el.append(bubble);
    return el;
  }

  // An item's files: images inline, other files as links with name and size, files
  // still on their way as "receiving…", refused ones with the reason.
  function buildFiles(attachments) {
    if (!Array.isArray(attachments) || !attachments.length) return null;
    const box = h("div", { class: "og-files" });
    for (const a of attachments) if (a && typeof a === "object") box.append(buildFile(a));
    return box;
  }

  function buildFile(a) {
    const name = typeof a.name === "string" && a.name ? a.name : "file";
    const size = typeof a.size === "number" ? formatSize(a.size) : "";
    const state = typeof a.state === "string" ? a.state : (a.url ? "stored" : "local");
    const el = h("div", { class: "og-file", "data-og": "attachment", "data-state": state, "data-name": name });
    if (state === "pending") {
      el.append(icon(ICON_FILE, "og-file-icon"), h("span", { class: "og-file-name", text: name }),
        h("span", { class: "og-file-note", text: "receiving…" }));
      return el;
    }
    if (state === "failed" || state === "too_large") {
      const reason = typeof a.error === "string" && a.error ? a.error
        : state === "too_large" ? "too large" : "could not be received";
      el.append(icon(ICON_FILE, "og-file-icon"), h("span", { class: "og-file-name", text: name }),
        h("span", { class: "og-file-note", "data-og": "file-error", text: "not received: " + reason }));
      return el;
    }
    const href = a.url ? safeUrl(a.url) : null;
    if (!href) { // being sent from this page, or kept without a link for us
      el.append(icon(ICON_FILE, "og-file-icon"), h("span", { class: "og-file-name", text: name }),
        size ? h("span", { class: "og-file-size", text: size }) : null);
      return el;
    }
    const link = h("a", { class: "og-file-link", href, rel: "noopener noreferrer", "data-og": "file-link" });
    link.dataset.at = String(Date.now()); // links work for an hour from when they came
    if (typeof a.id === "string") link.dataset.fileId = a.id;
    if (a.inline === true) { // an image the gateway serves inline: show it
      link.target = "_blank";
      link.setAttribute("aria-label", "Open image " + name + (size ? " (" + size + ")" : ""));
      const img = h("img", { class: "og-image", src: href, alt: name, "data-og": "image", decoding: "async" });
      img.addEventListener("load", () => {
        // keep the newest message in view as images above it grow
        if (scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight - img.offsetHeight < 120) scrollToBottom();
      });
      img.addEventListener("error", () => renewImage(img, link), { once: true });
      link.append(img);
    } else { // a download (the gateway sends it as one)
      link.setAttribute("download", name);
      if (!a.id) link.target = "_blank"; // a link a channel gave (older items): not ours
      link.append(icon(ICON_FILE, "og-file-icon"), h("span", { class: "og-file-name", text: name }),
        size ? h("span", { class: "og-file-size", text: size }) : null);
    }
    el.append(link);
    return el;
  }

  // ------------------------------------------------------- opening files
  // Links in item frames expire an hour after they were made. A click on an old one
  // asks for a fresh link (`file` frame) and then opens that one.
  function openFile(e) {
    const link = e.target instanceof Element ? e.target.closest("a[data-file-id]") : null;
    if (!link) return;
    if (link.dataset.renewed === "true") { delete link.dataset.renewed; return; } // the fresh one
    if (Date.now() - Number(link.dataset.at || 0) < LINK_FRESH_MS) return;
    e.preventDefault();
    renewFile(link.dataset.fileId).then(() => {
      link.dataset.renewed = "true";
      link.click();
    }, () => {
      setMeta(link.closest("[data-og='msg']"), "This file cannot be opened right now. Try again later.");
    });
  }

  // A shown image that did not load (its link expired): load it by a fresh link, once.
  function renewImage(img, link) {
    if (!link.dataset.fileId) return;
    renewFile(link.dataset.fileId).catch(() => { img.alt = img.alt + " (cannot be shown)"; });
  }

  // Ask for a fresh link to a file; every link and image of it gets the new one.
  function renewFile(id) {
    return new Promise((resolve, reject) => {
      if (fileWaiters.has(id)) { fileWaiters.get(id).push({ resolve, reject }); return; }
      if (!request("file", { type: "file", id })) { reject(new Error("offline")); return; }
      fileAsks.push(id);
      fileWaiters.set(id, [{ resolve, reject }]);
    });
  }

  function gotFile(f) {
    answered("file");
    const i = fileAsks.indexOf(f.id);
    if (i >= 0) fileAsks.splice(i, 1);
    const href = safeUrl(f.url);
    if (href) {
      for (const link of list.querySelectorAll("a[data-file-id]")) {
        if (link.dataset.fileId !== f.id) continue;
        link.href = href;
        link.dataset.at = String(Date.now());
        const img = link.querySelector("img");
        if (img) img.src = href;
      }
    }
    settleFile(f.id, href ? null : new Error("no link"));
  }

  function settleFile(id, err) {
    const waiters = fileWaiters.get(id) || [];
    fileWaiters.delete(id);
    for (const w of waiters) if (err) w.reject(err); else w.resolve();
  }

  // Where a sequenced item goes: before any unsequenced pending send (those
  // float at the bottom) and before any item with a higher seq.
  function insertSequenced(el, seq) {
    let before = null;
    for (let c = list.lastElementChild; c; c = c.previousElementSibling) {
      if (c === el) continue;
      const cs = c.dataset.seq ? Number(c.dataset.seq) : null;
      if ((cs === null && c.dataset.pending === "true") || (cs !== null && cs > seq)) before = c;
      else break; // a lower seq, or a failed send that stays where it is
    }
    if (el.parentNode === list && el.nextElementSibling === before) return; // already in place
    list.insertBefore(el, before);
  }

  // Has the customer already said something below this element (e.g. a pending send)?
  function customerAfter(el) {
    for (let c = el.nextElementSibling; c; c = c.nextElementSibling) if (c.dataset.role === "customer") return true;
    return false;
  }

  function hideButtons() {
    if (buttonsRow) { buttonsRow.el.remove(); buttonsRow = null; }
  }

  function showButtons(msgEl, seq, buttons) {
    hideButtons();
    const row = h("div", { class: "og-buttons", role: "group", "aria-label": "Suggested replies" });
    for (const b of buttons) {
      if (!b || typeof b.title !== "string" || typeof b.value !== "string") continue;
      if (b.url !== undefined && b.url !== null) { // a link (to continue elsewhere): opens it
        const href = safeLink(b.url);
        if (href) row.append(h("a", { class: "og-button", "data-og": "link-button", href, text: b.title,
          target: "_blank", rel: "noopener noreferrer" }));
        continue;
      }
      row.append(h("button", {
        type: "button", class: "og-button", "data-og": "button", text: b.title,
        "aria-label": b.title, onclick: () => sendAction(b.value, b.title),
      }));
    }
    msgEl.append(row);
    buttonsRow = { el: row, seq };
  }

  // A live or replayed item. Ignores anything already shown (seq <= watermark).
  function handleItem(item) {
    if (typeof item.seq !== "number") return;
    if (watermark !== null && item.seq <= watermark) { refreshFiles(item); return; }
    watermark = item.seq;
    if (lowestSeq === null) lowestSeq = item.seq;
    if (item.type === "message" && item.role === "agent") showAgentTyping(null);
    if (!hasConversation) { hasConversation = true; requestLink(false); }
    const stick = nearBottom();
    if (item.client_id) seenClientIds.add(item.client_id);

    // Our own send echoed back: attach the seq to the bubble already shown.
    const mine = item.type === "message" && item.role === "customer" && item.client_id && pending.get(item.client_id);
    if (mine && mine.el.isConnected) {
      mine.el.dataset.seq = String(item.seq);
      delivered(item.client_id, mine);
      if (mine.upload) { // sent with files: show them as the gateway keeps them now
        uploadDone(item.client_id);
        const el = buildItem(item);
        mine.el.replaceWith(el);
        mine.el = el;
      }
      insertSequenced(mine.el, item.seq); // moves it into seq order
    } else {
      const el = buildItem(item);
      insertSequenced(el, item.seq);
      if (item.type === "message" && item.role !== "customer" && Array.isArray(item.buttons) && item.buttons.length
          && !customerAfter(el)) {
        showButtons(el, item.seq, item.buttons);
      }
      if (!isOpen && item.type === "message" && item.role !== "customer" && state === "online") {
        unread += 1;
        renderBadge();
      }
    }
    if (item.type === "message" && item.role === "customer" && buttonsRow && item.seq > buttonsRow.seq) hideButtons();
    if (stick || (item.role === "customer")) scrollToBottom();
  }

  // An item shown already, sent again: its files changed (one that was on its way
  // arrived, or could not be fetched). Show them as they are now.
  function refreshFiles(item) {
    if (item.type !== "message" || !Array.isArray(item.attachments) || !item.attachments.length) return;
    const el = list.querySelector('[data-og="msg"][data-seq="' + item.seq + '"]');
    if (!el || el.dataset.id !== item.id) return;
    const bubble = el.querySelector(".og-bubble");
    const old = bubble && bubble.querySelector(".og-files");
    const files = buildFiles(item.attachments);
    if (!bubble || !files) return;
    if (old) old.replaceWith(files); else bubble.append(files);
  }

  // synced.truncated: more than 1000 items were missed, so there is a hole
  // after `seq`. Drop everything up to it; "Load earlier" fills in from the top.
  function dropBefore(seq) {
    for (const el of list.querySelectorAll("[data-seq]")) if (Number(el.dataset.seq) <= seq) el.remove();
    if (buttonsRow && buttonsRow.seq <= seq) hideButtons();
    const first = list.querySelector("[data-seq]");
    lowestSeq = first ? Number(first.dataset.seq) : null;
    moreBtn.hidden = lowestSeq === null;
  }

  // Older items from `history` go above everything shown.
  function prependHistory(items) {
    const anchor = scroller.scrollHeight - scroller.scrollTop;
    const older = items.filter((i) => typeof i.seq === "number" && (lowestSeq === null || i.seq < lowestSeq));
    const frag = document.createDocumentFragment();
    for (const item of older) frag.append(buildItem(item));
    list.insertBefore(frag, list.firstChild);
    if (older.length) lowestSeq = older[0].seq;
    scroller.scrollTop = scroller.scrollHeight - anchor; // keep the view where it was
  }

  function renderBadge() {
    badge.textContent = unread > 9 ? "9+" : String(unread);
    badge.hidden = unread === 0;
    launcher.setAttribute("aria-label", unread ? "Open chat (" + unread + " new)" : (isOpen ? "Close chat" : "Open chat"));
  }

  function setState(next) {
    state = next;
    statusEl.textContent = next;
    statusEl.dataset.state = next;
    panel.dataset.state = next;
  }

  // Forget the whole conversation (invalid token): keep only unsent messages.
  function resetConversation() {
    store.set("token", null);
    watermark = null;
    lowestSeq = null;
    hideButtons();
    list.replaceChildren();
    moreBtn.hidden = true;
    pending.clear();
    seenClientIds.clear();
    hasConversation = false;
    hideLink();
    emailStep("address");
    emailNote("");
    emailToggle.textContent = "Link your email";
    for (const frame of outbox.read()) renderPending(frame);
    for (const upload of uploads.values()) renderUpload(upload); // still to be sent
  }

  // ---------------------------------------------------------------- sending
  function newClientId() {
    const bytes = new Uint8Array(12);
    crypto.getRandomValues(bytes);
    return "c-" + Array.from(bytes, (b) => b.toString(36).padStart(2, "0")).join("");
  }

  function renderPending(frame) {
    const text = frame.type === "action" ? frame.title : frame.text;
    const el = buildItem({ type: "message", role: "customer", text });
    el.dataset.pending = "true";
    el.append(h("div", { class: "og-meta", text: "Sending…" }));
    list.append(el);
    pending.set(frame.client_id, { frame, el });
    hideButtons();
    scrollToBottom();
  }

  function queueFrame(frame) {
    outbox.add(frame);
    renderPending(frame);
    if (state === "online") transmit(frame);
  }

  // The composer's send: with files an upload, else a text message.
  function send() {
    if (draft.length) sendFiles(input.value);
    else sendText(input.value);
  }

  function sendText(raw) {
    const text = String(raw || "").trim();
    if (!text) return false;
    input.value = "";
    typing(false);
    queueFrame({ type: "message", client_id: newClientId(), text });
    input.focus();
    return true;
  }

  // ------------------------------------------------------------- files
  function composerNote(text) {
    composerMsg.textContent = text || "";
    composerMsg.hidden = !text;
  }

  // Files picked, dropped or pasted go to the tray, at most MAX_FILES.
  function addFiles(fileList) {
    const files = Array.from(fileList || []).filter((f) => f instanceof File);
    if (!files.length) return;
    composerNote("");
    for (const file of files) {
      if (draft.length >= MAX_FILES) { composerNote("At most " + MAX_FILES + " files in one message."); break; }
      addToTray(file);
    }
    tray.hidden = !draft.length;
  }

  function addToTray(file) {
    const entry = { file, el: null };
    const thumb = h("span", { class: "og-thumb", "aria-hidden": "true" }, icon(ICON_FILE, "og-file-icon"));
    const remove = h("button", {
      type: "button", class: "og-remove", "data-og": "remove-file", "aria-label": "Remove " + file.name,
      text: "×", onclick: () => removeFromTray(entry, true),
    });
    entry.el = h("li", { class: "og-chip", "data-og": "draft-file", "data-name": file.name },
      thumb,
      h("span", { class: "og-chip-text" },
        h("span", { class: "og-chip-name", text: file.name || "file" }),
        h("span", { class: "og-chip-size", text: formatSize(file.size) })),
      remove);
    draft.push(entry);
    tray.append(entry.el);
    preview(file, thumb);
  }

  function removeFromTray(entry, focus) {
    const at = draft.indexOf(entry);
    if (at < 0) return;
    draft.splice(at, 1);
    entry.el.remove();
    tray.hidden = !draft.length;
    composerNote("");
    if (focus) { // to the next file's remove button, or back to the text box
      const next = tray.querySelectorAll(".og-remove")[Math.min(at, draft.length - 1)];
      (next || input).focus();
    }
  }

  // An image's preview, drawn on a canvas from the file itself (no URL, so no CSP needed).
  function preview(file, thumb) {
    if (!/^image\//.test(file.type) || typeof createImageBitmap !== "function") return;
    createImageBitmap(file).then((bitmap) => {
      const canvas = h("canvas", { class: "og-thumb-img", width: THUMB_PX, height: THUMB_PX, "data-og": "thumb" });
      const scale = Math.max(THUMB_PX / bitmap.width, THUMB_PX / bitmap.height); // cover
      const w = bitmap.width * scale, ht = bitmap.height * scale;
      canvas.getContext("2d").drawImage(bitmap, (THUMB_PX - w) / 2, (THUMB_PX - ht) / 2, w, ht);
      bitmap.close();
      thumb.replaceChildren(canvas);
    }, () => { /* not an image the browser can draw: the file icon stays */ });
  }

  // Send the tray's files with the text: shown at once as pending, uploaded over HTTP.
  function sendFiles(raw) {
    const upload = {
      client_id: newClientId(), text: String(raw || "").trim(), files: draft.map((d) => d.file),
      busy: false, waiting: false, timer: null, tries: 0, delay: 2000,
    };
    for (const entry of draft.slice()) removeFromTray(entry, false);
    input.value = "";
    typing(false);
    composerNote("");
    uploads.set(upload.client_id, upload);
    renderUpload(upload);
    startUpload(upload);
    input.focus();
  }

  function renderUpload(upload) {
    const el = buildItem({
      type: "message", role: "customer", text: upload.text,
      attachments: upload.files.map((f) => ({ name: f.name, size: f.size, state: "local" })),
    });
    el.dataset.pending = "true";
    el.append(h("div", { class: "og-meta", text: "Sending…" }));
    list.append(el);
    pending.set(upload.client_id, { frame: { type: "upload", client_id: upload.client_id }, el, upload: true });
    hideButtons();
    scrollToBottom();
  }

  // POST /webchat/upload with the visitor's token; retried (same client_id) when the
  // gateway says 503 or 429, or cannot be reached. Waits for the socket's `synced`
  // when there is no token or connection yet.
  async function startUpload(u) {
    if (u.busy || !uploads.has(u.client_id)) return;
    const token = store.get("token");
    if (!token || state !== "online") { u.waiting = true; return; }
    u.waiting = false;
    u.busy = true;
    const body = new FormData();
    body.append("client_id", u.client_id);
    if (u.text) body.append("text", u.text);
    for (const f of u.files) body.append("file", f, f.name);
    let res = null, data = null;
    try {
      res = await fetch(UPLOAD_URL, {
        method: "POST", body, mode: "cors", credentials: "omit", cache: "no-store",
        headers: { Authorization: "Bearer " + token },
      });
      try { data = await res.json(); } catch (e) { data = null; }
    } catch (e) { res = null; }
    u.busy = false;
    if (!uploads.has(u.client_id)) return; // its echo came first over the socket
    if (res && res.ok && data && data.type === "ack") { uploadAcked(u, data); return; }
    const status = res ? res.status : 0;
    if (status === 429) {
      const after = Number(res.headers.get("Retry-After"));
      retryUpload(u, retryAfterMs({ retry_after: after > 0 ? after : 1 }));
    } else if (status === 503) {
      retryUpload(u, u.delay);
      u.delay = Math.min(u.delay * 2, 30000);
    } else if ((status === 0 || status >= 500) && ++u.tries < UPLOAD_TRIES) {
      retryUpload(u, u.delay);
      u.delay = Math.min(u.delay * 2, 30000);
    } else {
      const message = data && typeof data.message === "string" && data.message ? data.message
        : status ? "The files were not sent (HTTP " + status + ")." : "The files could not be sent: no connection.";
      uploadRefused(u, message);
    }
  }

  function retryUpload(u, ms) {
    clearTimeout(u.timer);
    u.timer = setTimeout(() => { u.timer = null; startUpload(u); }, ms);
  }

  // After `synced`: uploads that waited for the connection go now.
  function flushUploads() {
    for (const u of uploads.values()) if (u.waiting) startUpload(u);
  }

  function uploadDone(clientId) {
    const u = uploads.get(clientId);
    if (u) clearTimeout(u.timer);
    uploads.delete(clientId);
  }

  function uploadAcked(u, ack) {
    uploadDone(u.client_id);
    const entry = pending.get(u.client_id);
    if (entry && typeof ack.seq === "number" && !entry.el.dataset.seq) entry.el.dataset.seq = String(ack.seq);
    delivered(u.client_id, entry);
    if (!hasConversation) { hasConversation = true; requestLink(false); }
  }

  // Refused (too large, bad token, ...): nothing was stored. The message leaves the
  // chat and goes back into the composer, files and text, with the gateway's reason.
  function uploadRefused(u, message) {
    uploadDone(u.client_id);
    const entry = pending.get(u.client_id);
    if (entry) entry.el.remove();
    pending.delete(u.client_id);
    const kept = draft.map((d) => d.file);
    for (const entry2 of draft.slice()) removeFromTray(entry2, false);
    addFiles(u.files.concat(kept));
    if (u.text) input.value = input.value.trim() ? u.text + "\n" + input.value : u.text;
    composerNote(message);
  }

  function sendAction(value, title) {
    queueFrame({ type: "action", client_id: newClientId(), value, title });
  }

  function transmit(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(frame));
  }

  // After `synced`: resend every unacked frame with the same client_id.
  function flushOutbox() {
    for (const frame of outbox.read()) {
      if (seenClientIds.has(frame.client_id) && !pending.has(frame.client_id)) {
        outbox.remove(frame.client_id); // another tab's send, already stored and shown
        continue;
      }
      if (!pending.has(frame.client_id)) renderPending(frame); // queued by another tab or before reload
      transmit(frame);
    }
  }

  // The small status line under a customer bubble ("Sending…", errors).
  function setMeta(el, text) {
    let meta = el.querySelector(".og-meta");
    if (!text) { if (meta) meta.remove(); return; }
    if (!meta) { meta = h("div", { class: "og-meta" }); el.append(meta); }
    meta.textContent = text;
  }

  function delivered(clientId, entry) {
    outbox.remove(clientId);
    if (!entry || entry.el.dataset.pending !== "true") return;
    delete entry.el.dataset.pending;
    setMeta(entry.el, "");
    retryDelay = 2000;
  }

  function failed(clientId, code) {
    outbox.remove(clientId);
    const entry = pending.get(clientId);
    if (!entry) return;
    delete entry.el.dataset.pending;
    entry.el.dataset.failed = "true";
    setMeta(entry.el, ERROR_TEXT[code] || "Not sent");
  }

  // The store was unreachable (or the server said `rate_limited`, with how long to
  // wait): try the queue again a little later, with the same client_ids.
  function scheduleRetry(waitMs) {
    if (retryTimer) return;
    retryTimer = setTimeout(() => {
      retryTimer = null;
      if (state === "online") flushOutbox();
    }, waitMs === undefined ? retryDelay : waitMs);
    if (waitMs === undefined) retryDelay = Math.min(retryDelay * 2, 30000);
  }

  // `retry_after` of a rate_limited error in ms (a little later, never before it).
  function retryAfterMs(f) {
    const s = typeof f.retry_after === "number" && f.retry_after > 0 ? f.retry_after : 1;
    return Math.min(s, 3600) * 1000 + 50 + Math.random() * 200;
  }

  // ----------------------------------------------------------------- typing
  // The visitor's typing goes to the agent: `on` at most every 2 s while keys are
  // pressed, `off` after a pause, when the box is cleared and when the text is sent.
  function typing(on) {
    clearTimeout(typingIdleTimer);
    typingIdleTimer = null;
    if (on) {
      typingIdleTimer = setTimeout(() => typing(false), TYPING_IDLE_MS);
      if (state !== "online" || (typingOn && Date.now() - typingSentAt < TYPING_EVERY_MS)) return;
      typingOn = true;
      typingSentAt = Date.now();
      transmit({ type: "typing", on: true });
    } else if (typingOn) {
      typingOn = false;
      transmit({ type: "typing", on: false });
    }
  }

  // The server's `typing` frame: an agent is (or stopped) typing.
  function showAgentTyping(f) {
    clearTimeout(agentTypingTimer);
    agentTypingTimer = null;
    if (!f || f.on !== true) {
      typingEl.hidden = true;
      typingEl.textContent = "";
      return;
    }
    const name = typeof f.name === "string" && f.name ? f.name : "An agent";
    typingEl.textContent = name + " is typing…";
    typingEl.hidden = false;
    agentTypingTimer = setTimeout(() => showAgentTyping(null), AGENT_TYPING_MS);
  }

  // ---------------------------------------------------- other channels
  // `link`, `email_link`, `email_verify`, `file` and `history` get exactly one answer each, in
  // order; errors carry no client_id, so `requests` says which frame one is about.
  function request(kind, frame) {
    if (state !== "online") return false;
    requests.push(kind);
    transmit(frame);
    return true;
  }

  function answered(kind) {
    const i = requests.indexOf(kind);
    if (i >= 0) requests.splice(i, 1);
  }

  const VERIFY_ERRORS = ["wrong_code", "code_expired", "too_many_attempts", "no_code", "already_linked"];
  function errorOwner(code) {
    if (code === "not_found") return "file";
    if (code === "invalid_address" || code === "rate_limited") return "email_link";
    if (VERIFY_ERRORS.includes(code)) return "email_verify";
    if (code === "link_unavailable") return requests.find((k) => k === "link" || k === "email_link") || null;
    if (code === "bad_frame" || code === "unavailable" || code === "internal") return requests[0] || null;
    return null;
  }

  // Telegram: ask for a deep link once there is a conversation to continue; the button
  // shows only while the server has given one.
  function requestLink(force) {
    if (!LINKS || !linkable.includes("telegram") || !hasConversation || state !== "online" ||
        requests.includes("link")) return;
    if (!force && !telegramBtn.hidden && Date.now() < linkExpires - LINK_REFRESH_MS) return;
    if (request("link", { type: "link", channel: "telegram" })) telegramBtn.dataset.offer = "asked";
  }

  function gotLink(f) {
    answered("link");
    const url = f.channel === "telegram" ? safeUrl(f.url) : null;
    if (!url) { hideLink(); return; }
    telegramBtn.href = url;
    telegramBtn.hidden = false;
    telegramBtn.dataset.offer = "ready";
    linkExpires = Date.parse(f.expires_at) || Date.now() + 15 * 60000;
    clearTimeout(linkTimer);
    linkTimer = setTimeout(() => { hideLink(); requestLink(true); },
      Math.max(1000, linkExpires - Date.now() - LINK_REFRESH_MS));
  }

  function hideLink() {
    telegramBtn.hidden = true;
    telegramBtn.dataset.offer = "none";
    telegramBtn.removeAttribute("href");
    clearTimeout(linkTimer);
    linkTimer = null;
    linkExpires = 0;
  }

  // Email: an address, then the code mailed there.
  function showEmail(show) {
    emailBox.hidden = !show;
    emailToggle.setAttribute("aria-expanded", String(show));
    if (show && !emailForm.hidden) emailInput.focus();
    else if (show && !codeForm.hidden) codeInput.focus();
  }

  function emailStep(step) { // address | code | done
    emailForm.hidden = step !== "address";
    codeForm.hidden = step !== "code";
    emailSend.disabled = codeSend.disabled = false;
    if (step === "address") codeInput.value = "";
    if (emailBox.hidden) return;
    if (step === "address") emailInput.focus();
    else if (step === "code") codeInput.focus();
  }

  function emailNote(text, kind) {
    emailMsg.textContent = text;
    emailMsg.dataset.kind = kind || "info";
  }

  function askCode() {
    const address = emailInput.value.trim();
    if (address.length < 3 || !emailInput.checkValidity()) { emailNote("Enter a valid email address.", "error"); return; }
    if (!request("email_link", { type: "email_link", address })) { emailNote("Not connected. Try again in a moment.", "error"); return; }
    emailSend.disabled = true;
    emailNote("Sending a code…");
  }

  function verifyCode() {
    const code = codeInput.value.trim();
    if (!/^[0-9][0-9 -]{4,14}[0-9]$/.test(code)) { emailNote("Enter the 6-digit code from the mail.", "error"); return; }
    if (!request("email_verify", { type: "email_verify", code })) { emailNote("Not connected. Try again in a moment.", "error"); return; }
    codeSend.disabled = true;
    emailNote("Checking the code…");
  }

  function codeSent(f) {
    answered("email_link");
    const until = new Date(f.expires_at);
    codeHint.textContent = "We mailed a code to " + String(f.address || "your address") + "."
      + (isNaN(until) ? "" : " It is valid until " + until.toLocaleTimeString([], { timeStyle: "short" }) + ".");
    emailStep("code");
    emailNote("");
  }

  function emailLinked(f) {
    answered("email_verify");
    emailStep("done");
    emailNote(typeof f.message === "string" && f.message ? f.message : "Your email address is linked.", "ok");
    emailToggle.textContent = "Email linked";
  }

  function emailRefused(kind, f) {
    answered(kind);
    emailSend.disabled = codeSend.disabled = false;
    const own = f.code !== "bad_frame" && f.code !== "unavailable" && f.code !== "internal";
    emailNote(own && typeof f.message === "string" && f.message ? f.message : "That did not work. Try again.", "error");
    if (f.code === "code_expired" || f.code === "too_many_attempts" || f.code === "no_code") {
      emailForm.hidden = false;  // a new code is needed
      codeForm.hidden = true;
      codeInput.value = "";
    }
  }

  // ----------------------------------------------------------- connection
  function connect() {
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    if (ws) return;
    setState("connecting");
    let sock;
    try { sock = new WebSocket(WS_URL); } catch (e) { scheduleReconnect(); return; }
    ws = sock;
    handshakeTimer = setTimeout(() => { drop(sock); scheduleReconnect(); }, HANDSHAKE_MS);
    sock.onopen = () => {
      lastHeard = Date.now();
      helloWatermark = watermark;
      const hello = { type: "hello", token: store.get("token"), watermark };
      if (arrivalLink) { hello.link = arrivalLink; hello.watermark = null; helloWatermark = null; }
      sock.send(JSON.stringify(hello));
      pingTimer = setInterval(() => {
        if (Date.now() - lastHeard > STALE_MS) { drop(sock); scheduleReconnect(); return; }
        transmit({ type: "ping" });
      }, PING_MS);
    };
    sock.onmessage = (e) => {
      lastHeard = Date.now();
      let frame;
      try { frame = JSON.parse(e.data); } catch (err) { return; }
      if (frame && typeof frame === "object") onFrame(frame);
    };
    sock.onclose = (e) => {
      if (ws !== sock) return; // already abandoned
      drop(sock);
      if (e.code === 4429) { // too many new chats from this address: wait as told
        const wait = helloWait === null ? undefined : helloWait;
        helloWait = null;
        scheduleReconnect(wait);
      } else if (e.code === 4401 || resetPending) {
        resetPending = false;
        resetConversation();
        attempt = 0;
        scheduleReconnect(100);
      } else if (e.code === 1001) {
        scheduleReconnect(250 + Math.random() * 750); // server restarting: come back soon
      } else {
        scheduleReconnect();
      }
    };
    sock.onerror = () => { /* onclose follows and handles it */ };
  }

  // Forget a socket without waiting for its closing handshake.
  function drop(sock) {
    clearInterval(pingTimer);
    clearTimeout(handshakeTimer);
    pingTimer = handshakeTimer = null;
    historyBusy = false;
    moreBtn.disabled = false;
    if (requests.some((k) => k === "email_link" || k === "email_verify")) {
      emailNote("Connection lost. Try again.", "error");
    }
    requests = [];
    fileAsks = [];
    for (const id of Array.from(fileWaiters.keys())) settleFile(id, new Error("connection lost"));
    emailSend.disabled = codeSend.disabled = false;
    typingOn = false;
    showAgentTyping(null);
    sock.onopen = sock.onmessage = sock.onclose = sock.onerror = null;
    try { sock.close(); } catch (e) { /* ignore */ }
    if (ws === sock) ws = null;
    setState("offline");
  }

  function scheduleReconnect(delay) {
    if (reconnectTimer) return;
    if (delay === undefined) {
      const base = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** attempt);
      delay = base / 2 + Math.random() * base / 2; // jitter: 50–100 %
      attempt += 1;
    }
    reconnectTimer = setTimeout(connect, delay);
  }

  function onFrame(f) {
    switch (f.type) {
      case "welcome":
        if (typeof f.token === "string") store.set("token", f.token);
        if (arrivalLink) { // answered: never sent again
          arrivalLink = null;
          if (f.linked && typeof f.linked.message === "string") {
            linkNote.textContent = f.linked.message;
            linkNote.dataset.state = String(f.linked.state || "");
            linkNote.hidden = false;
          }
        }
        if (f.conversation_id) hasConversation = true;
        if (Array.isArray(f.links)) { // what this gateway can link: offer only that
          linkable = f.links;
          emailToggle.hidden = !LINKS || !linkable.includes("email");
          if (emailToggle.hidden && !emailBox.hidden) showEmail(false);
        }
        break;
      case "message":
      case "event":
        handleItem(f);
        break;
      case "update": // an item shown already, again: its files changed (fetched, failed)
        if (f.item && typeof f.item.seq === "number") refreshFiles(f.item);
        break;
      case "skip": // a seq this visitor does not see (an agent's private note): move on
        if (typeof f.seq === "number" && (watermark === null || f.seq > watermark)) watermark = f.seq;
        break;
      case "synced":
        clearTimeout(handshakeTimer);
        attempt = 0;
        setState("online");
        if (f.truncated && helloWatermark !== null) dropBefore(helloWatermark);
        // has_more is about the initial replay; later syncs only fill the gap.
        if (helloWatermark === null) moreBtn.hidden = !(f.has_more && lowestSeq !== null && lowestSeq > 1);
        flushOutbox();
        flushUploads();
        requestLink(false);
        break;
      case "ack": {
        const entry = pending.get(f.client_id);
        if (entry && typeof f.seq === "number" && !entry.el.dataset.seq) entry.el.dataset.seq = String(f.seq);
        delivered(f.client_id, entry);
        if (!hasConversation) { hasConversation = true; requestLink(false); }
        break;
      }
      case "typing":
        if (f.role === "agent") showAgentTyping(f);
        break;
      case "link":
        gotLink(f);
        break;
      case "file":
        gotFile(f);
        break;
      case "email_code_sent":
        codeSent(f);
        break;
      case "email_linked":
        emailLinked(f);
        break;
      case "history":
        answered("history");
        historyBusy = false;
        prependHistory(Array.isArray(f.items) ? f.items : []);
        moreBtn.hidden = !f.has_more || lowestSeq === null || lowestSeq <= 1;
        moreBtn.disabled = false;
        break;
      case "error":
        onError(f);
        break;
      default: // pong and anything newer: nothing to do
    }
  }

  function onError(f) {
    if (f.code === "invalid_token") { resetPending = true; return; } // close 4401 follows
    if (f.code === "rate_limited" && state !== "online" && !f.client_id) {
      helloWait = retryAfterMs(f); // at hello; close 4429 follows
      return;
    }
    if (f.client_id && pending.has(f.client_id)) {
      if (f.code === "unavailable" || f.code === "internal") scheduleRetry(); // same client_id is safe
      else if (f.code === "rate_limited") scheduleRetry(retryAfterMs(f)); // not stored: resend later
      else failed(f.client_id, f.code);
      return;
    }
    const owner = errorOwner(f.code);
    if (owner === "history") {
      answered("history");
      historyBusy = false;
      moreBtn.disabled = false;
    } else if (owner === "link") {
      answered("link");
      hideLink(); // no Telegram here (or not now): no button
    } else if (owner === "email_link" || owner === "email_verify") {
      emailRefused(owner, f);
    } else if (owner === "file") {
      answered("file");
      const id = fileAsks.shift();
      if (id !== undefined) settleFile(id, new Error(f.code));
    }
  }

  function loadEarlier() {
    if (historyBusy || state !== "online" || lowestSeq === null) return;
    historyBusy = true;
    moreBtn.disabled = true;
    request("history", { type: "history", before: lowestSeq, limit: 50 });
  }

  // ------------------------------------------------------------ public API
  function open(focus = true) {
    isOpen = true;
    panel.hidden = false;
    root.classList.add("og-open");
    launcher.setAttribute("aria-expanded", "true");
    unread = 0;
    renderBadge();
    try { sessionStorage.setItem(PREFIX + ".open", "1"); } catch (e) { /* ignore */ }
    scrollToBottom();
    if (focus) input.focus({ preventScroll: true });
  }

  function close() {
    isOpen = false;
    panel.hidden = true;
    root.classList.remove("og-open");
    launcher.setAttribute("aria-expanded", "false");
    renderBadge();
    try { sessionStorage.removeItem(PREFIX + ".open"); } catch (e) { /* ignore */ }
  }

  window.OmnigateWebchat = Object.freeze({
    open: () => open(true),
    close: () => close(),
    send: (text) => sendText(text),
  });

  // ------------------------------------------------------------------ start
  function start() {
    document.body.append(host);
    for (const frame of outbox.read()) renderPending(frame); // unsent from last visit
    let reopen = false;
    try { reopen = sessionStorage.getItem(PREFIX + ".open") === "1"; } catch (e) { /* ignore */ }
    if (START_OPEN || reopen) open(false);
    connect();
    window.addEventListener("online", () => { if (!ws) { attempt = 0; connect(); } });
  }

  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start);
})();
