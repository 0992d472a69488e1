// Postroom console: the little script there is. Every page works without it; with it,
// parts of a page refresh themselves (charts, the event tail, a running doctor),
// "select all" works, and destructive buttons ask first.
"use strict";

function refresh(el) {
  const every = parseInt(el.dataset.every || "5000", 10);
  let timer = null;
  let last = null;
  async function tick() {
    if (el.dataset.paused === "1") { timer = setTimeout(tick, every); return; }
    try {
      const r = await fetch(el.dataset.refresh, { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (r.status === 401) { location.reload(); return; }
      if (r.status === 404) { return; }                    // gone (an old doctor run)
      if (r.ok) {
        // replaced only when the server's answer changed, so that focus and a text
        // selection survive the refreshes that change nothing
        const html = await r.text();
        if (html !== last) { el.innerHTML = html; last = html; }
        if (el.querySelector("[data-done]")) { return; }   // finished: stop polling
      }
    } catch (e) { /* the server restarts: try again */ }
    timer = setTimeout(tick, every);
  }
  timer = setTimeout(tick, every);
  return () => clearTimeout(timer);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-refresh]").forEach(refresh);

  document.querySelectorAll("[data-pause]").forEach((btn) => {
    btn.addEventListener("click", () => {
      const target = document.getElementById(btn.dataset.pause);
      const paused = target.dataset.paused === "1";
      target.dataset.paused = paused ? "0" : "1";
      btn.setAttribute("aria-pressed", paused ? "false" : "true");
      btn.textContent = paused ? "Pause live tail" : "Resume live tail";
    });
  });

  document.querySelectorAll("[data-select-all]").forEach((box) => {
    box.addEventListener("change", () => {
      const form = box.closest("form");
      form.querySelectorAll(`input[type=checkbox][name="${box.dataset.selectAll}"]`)
        .forEach((b) => { b.checked = box.checked; });
    });
  });

  // forms (or single buttons) that ask before doing something that cannot be undone
  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    const button = ev.submitter;
    const question = (button && button.dataset.confirm) || form.dataset.confirm;
    if (question && !window.confirm(question)) { ev.preventDefault(); }
  });
});
