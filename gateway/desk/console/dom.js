/* The console pages' DOM helpers, one copy for all of them (console, contacts, audit,
 * analytics): loaded before each page's own script. Text only ever goes in as text
 * (textContent); attributes as strings; "on..." attributes become listeners (the CSP
 * forbids inline handlers). */
(() => {
  "use strict";
  const $ = (name) => document.querySelector('[data-c="' + name + '"]');
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = String(v);
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
    return el;
  }
  function show(el, on) { el.hidden = !on; }
  function clear(el) { while (el.firstChild) el.firstChild.remove(); }
  window.OmnigateDom = Object.freeze({ $, h, show, clear });
})();
