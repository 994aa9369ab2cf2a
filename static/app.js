// Small behaviours shared by every page.

// Buttons are disabled while their htmx request is in flight (no double submits).
document.addEventListener("htmx:beforeRequest", (event) => {
  const el = event.detail.elt;
  const button = el.matches("button") ? el : el.querySelector?.("button[type=submit], button:not([type])");
  if (button) { button.disabled = true; button.setAttribute("aria-busy", "true"); }
});
document.addEventListener("htmx:afterRequest", (event) => {
  const el = event.detail.elt;
  const button = el.matches("button") ? el : el.querySelector?.("button[type=submit], button:not([type])");
  if (button) { button.disabled = false; button.removeAttribute("aria-busy"); }
});
// Plain forms too: one submit only; a destructive one (data-confirm) asks first, as hx-confirm does.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) { event.preventDefault(); return; }
  if (form.hasAttribute("hx-post") || form.hasAttribute("hx-put") || form.hasAttribute("data-no-lock")) return;
  form.querySelectorAll("button[type=submit], button:not([type])").forEach((b) => { b.disabled = true; b.setAttribute("aria-busy", "true"); });
});

// Times in the user's locale: <time datetime="ISO">…</time>.
function localizeTimes(root) {
  root.querySelectorAll("time[datetime]").forEach((t) => {
    const d = new Date(t.getAttribute("datetime"));
    if (!isNaN(d)) { t.textContent = d.toLocaleString(); t.title = t.getAttribute("datetime"); }
  });
}
document.addEventListener("DOMContentLoaded", () => localizeTimes(document));
// The whole document: after an outerHTML swap, event.detail.target is the element swapped out.
document.addEventListener("htmx:afterSettle", () => localizeTimes(document));

// Copy buttons: <button data-copy="#id">.
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  navigator.clipboard?.writeText(source.value ?? source.textContent);
  button.textContent = "Copied";
});

// A page or a form fragment that comes back with refused fields puts the cursor in the first one.
const FIRST_REFUSED = "[aria-invalid='true'], [data-autofocus]";
document.addEventListener("DOMContentLoaded", () => document.querySelector(`main :is(${FIRST_REFUSED})`)?.focus());
document.addEventListener("htmx:afterSettle", (event) => event.detail.elt?.querySelector?.(FIRST_REFUSED)?.focus());

// A refusal answered to htmx names where it goes (HX-Retarget, the page's flash region): show it
// there; htmx would otherwise drop every 4xx/5xx body.
document.addEventListener("htmx:beforeSwap", (event) => {
  const xhr = event.detail.xhr;
  if (xhr.status >= 400 && xhr.getResponseHeader("HX-Retarget")) { event.detail.shouldSwap = true; event.detail.isError = false; }
});
