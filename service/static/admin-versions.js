/* MSFlow console: the Admin page's version control (admin key): roll a category back or forward
 * (POST /v1/models/{category}/reload?version=N, an operator's pin: the store watch leaves it
 * there) or back to the newest (the same without version: the pin ends). The versions come from
 * the model list (GET /v1/models: available_versions, failed_versions); a reload is sent only
 * once the operator confirms what it does. Shares the key, the API client, the error box and
 * the model list with console.js (window.msflowConsole); every text from the server goes
 * through textContent. */
"use strict";

(() => {
  const { $, el, describe, api, showError, clearError, loadModels, modelOf, refresh } = window.msflowConsole;
  const NEWEST = ""; // the select's value for "the newest version, no pin"
  let busy = false;

  function init() {
    $("#admin-category").addEventListener("change", () => { say(""); cancel(); fill(); });
    $("#version-reload").addEventListener("click", ask);
    $("#version-confirm-yes").addEventListener("click", reload);
    $("#version-confirm-no").addEventListener("click", cancel);
    $("#version-select").addEventListener("change", cancel);
  }

  // The category's versions, newest first, each marked serving, pinned or failed (with why).
  function fill() {
    const category = $("#admin-category").value;
    const m = modelOf(category);
    const select = $("#version-select");
    const previous = select.dataset.category === category ? select.value : null;
    if (!m) {
      select.replaceChildren();
      select.disabled = $("#version-reload").disabled = true;
      return;
    }
    const failed = m.failed_versions || {};
    const newest = m.available_versions[m.available_versions.length - 1];
    const options = [el("option", { value: NEWEST, text: `newest (v${newest}), not pinned${newest in failed ? ": failed to load" : ""}` })];
    for (const v of [...m.available_versions].reverse()) {
      const notes = [v === m.version ? (m.pinned ? "serving, pinned" : "serving") : null,
        v in failed ? `failed: ${failed[v]}` : null].filter(Boolean);
      options.push(el("option", { value: v, text: `v${v}${notes.length ? ` (${notes.join("; ")})` : ""}`,
        "data-failed": v in failed ? "true" : null }));
    }
    select.replaceChildren(...options);
    select.dataset.category = category;
    select.value = previous !== null && [...select.options].some((o) => o.value === previous) ? previous : m.version;
    select.disabled = busy;
    $("#version-reload").disabled = busy;
  }

  // What the reload will do, said before it is sent: a pin holds against newer exports, the
  // newest ends it; a threshold override belongs to one version and does not follow.
  function ask() {
    const category = $("#admin-category").value;
    const m = modelOf(category);
    if (!category || !m || busy) return;
    const v = $("#version-select").value;
    const failed = m.failed_versions || {};
    const newest = m.available_versions[m.available_versions.length - 1];
    const target = v === NEWEST ? newest : v;
    const what = v === NEWEST
      ? `Serve the newest version of ${category}, v${newest}, not pinned: the store watch moves it on to newer exports.`
      : `Serve ${category} v${v}, pinned: it stays there, whatever is exported, until a reload to the newest.`;
    const failure = target in failed ? ` v${target} failed to load before (${failed[target]}); it is tried again.` : "";
    const override = m.threshold_override && target !== m.version
      ? ` The threshold override of v${m.version} does not follow: v${target} starts at its own thresholds.` : "";
    $("#version-confirm-text").textContent = `${what}${failure}${override} v${m.version} serves until the new one ` +
      "is loaded and warm; if it cannot be, v" + m.version + " keeps serving.";
    $("#version-confirm").hidden = false;
    $("#version-confirm").dataset.version = v;
  }

  function cancel() {
    $("#version-confirm").hidden = true;
    delete $("#version-confirm").dataset.version;
  }

  async function reload() {
    const category = $("#admin-category").value;
    const v = $("#version-confirm").dataset.version;
    if (!category || v === undefined || busy) return;
    cancel();
    setBusy(true);
    const before = modelOf(category);
    say(`Reloading ${category} to ${v === NEWEST ? "the newest version" : `v${v}`}\u2026 (v${before ? before.version : "?"} serves meanwhile)`);
    const query = v === NEWEST ? "" : `?version=${encodeURIComponent(v)}`;
    try {
      const r = await api(`/v1/models/${encodeURIComponent(category)}/reload${query}`, { method: "POST" });
      clearError();
      say(`${category} serves v${r.version} now, ${r.pinned ? "pinned: the store watch leaves it there until a reload " +
        "to the newest" : "not pinned: the store watch moves it on to newer exports"}.`, "", { version: r.version, pinned: String(r.pinned) });
      setBusy(false);
      // Another version's thresholds: the fields are filled again with the new one's.
      delete $("#threshold-input").dataset.category;
      delete $("#ng-input").dataset.category;
      await refresh(); // the model list and the page: the version served and its thresholds
    } catch (e) {
      setBusy(false);
      await loadModels(); // what serves now (the previous version, unless the failure says otherwise)
      const now = modelOf(category);
      const serving = now ? ` ${category} serves v${now.version}${now.pinned ? ", pinned" : ""}.` : "";
      const why = e.status === 401 || e.status === 403
        ? `Not reloaded: this needs an admin API key. ${describe(e)}` : `Not reloaded: ${describe(e)}`;
      say(`${why}${serving}`, "failure", { error: e.code || "error" });
      showError(why);
    }
  }

  function setBusy(on) {
    busy = on;
    $("#version-select").disabled = on;
    $("#version-reload").disabled = on;
  }

  // The result line: its data attributes say what the last reload did (tests and the curious).
  function say(text, kind = "", data = {}) {
    const status = $("#version-status");
    status.textContent = text;
    status.className = `status ${kind}`.trim();
    for (const k of ["version", "pinned", "error"]) {
      if (k in data) status.dataset[k] = data[k];
      else delete status.dataset[k];
    }
  }

  document.addEventListener("DOMContentLoaded", init);
  document.addEventListener("msflow:models", fill);
  document.addEventListener("msflow:view", (ev) => { if (ev.detail === "admin") fill(); });
})();
