/* MSFlow operator console: the shared core. Plain browser JavaScript: no build step, no
 * dependencies, and no request leaves this origin. The API key is kept in sessionStorage (this
 * tab only) and sent as X-API-Key. Every text from the server or a file name goes through
 * textContent, never innerHTML.
 *
 * This file holds what every view shares: the element builder, the API client, the error
 * box, the key, view switching, the model list (refreshed and polled while models are being
 * built) and the photo frame of the Inspect and Review overlays. It exposes them as
 * window.msflowConsole; each view is a file of its own, loaded after this one (index.html):
 * inspect.js, review.js, models-view.js, admin.js (and admin-versions.js). They hear of changes by events on document:
 * msflow:view (detail: the view shown), msflow:models (detail: the categories loaded) and
 * msflow:refresh (the operator or the poll asked for fresh data; detail: the view shown). */
"use strict";

(() => {
  const KEY_STORAGE = "msflow.apiKey";
  const state = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    models: [],
    failed: {},
    view: "inspect",
    pollTimer: null,
  };
  const POLL_MS = 5000; // while models are being built or loaded: the list refreshes itself

  // ------------------------------------------------------------------ helpers
  const $ = (sel, root = document) => root.querySelector(sel);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else if (k in node) node[k] = v;
      else node.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const fmt = (x, digits = 4) => (typeof x === "number" && Number.isFinite(x) ? Number(x.toPrecision(digits)).toString() : "–");
  const ms = (x) => (typeof x === "number" ? `${x.toFixed(x < 10 ? 1 : 0)} ms` : "–");
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

  class ApiError extends Error {
    constructor(status, code, message, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details;
    }
  }

  async function api(path, { method = "GET", body, json, raw = false } = {}) {
    // X-Requested-With: admin routes refuse requests no cross-site form could make without it
    const headers = { Accept: "application/json", "X-Requested-With": "msflow-console" };
    if (state.key) headers["X-API-Key"] = state.key;
    let payload = body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(json);
    }
    let r;
    try {
      r = await fetch(path, { method, headers, body: payload, cache: "no-store", credentials: "omit" });
    } catch (e) {
      throw new ApiError(0, "network_error", `cannot reach the service (${e.message})`);
    }
    if (!r.ok) {
      let code = `http_${r.status}`;
      let message = r.statusText || "request failed";
      let details;
      try {
        const b = await r.json();
        if (b && b.error) ({ code, message, details } = b.error);
      } catch (_) { /* not JSON: keep the status line */ }
      throw new ApiError(r.status, code, message, details);
    }
    return raw ? r : r.json();
  }

  function describe(e) {
    if (!(e instanceof ApiError)) return String((e && e.message) || e);
    switch (e.code) {
      case "missing_api_key":
        return "This service needs an API key: type it in the API key field above and press \u201cUse key\u201d.";
      case "invalid_api_key":
        return "The API key was rejected (invalid_api_key). Check it and type it again.";
      // The server says which key the route needs (an admin key, or a reviewer's on the
      // Review page): a fixed "needs an admin API key" sent reviewers asking for the wrong key.
      case "forbidden":
        return `This key may not do this (forbidden): ${e.message}.`;
      case "admin_disabled":
      case "review_disabled":
        return `${e.message} (${e.code})`;
      default:
        return `${e.message} (${e.code}${e.status ? `, HTTP ${e.status}` : ""})`;
    }
  }

  function showError(e) {
    $("#error-text").textContent = typeof e === "string" ? e : describe(e);
    $("#error").hidden = false;
    if (e instanceof ApiError && e.status === 401) setKeyStatus(state.key ? "key rejected" : "key needed", "bad");
  }
  function clearError() {
    $("#error").hidden = true;
    $("#error-text").textContent = "";
  }

  function setKeyStatus(text, kind = "") {
    const s = $("#key-status");
    s.textContent = text;
    s.className = `key-status ${kind}`;
  }

  // ------------------------------------------------------------------ key, views
  function initKey() {
    if (state.key) setKeyStatus(`key \u2026${state.key.slice(-4)}`);
    $("#key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("#api-key").value.trim();
      state.key = value;
      if (value) sessionStorage.setItem(KEY_STORAGE, value);
      else sessionStorage.removeItem(KEY_STORAGE);
      $("#api-key").value = "";
      setKeyStatus(value ? `key \u2026${value.slice(-4)}` : "no key");
      refresh();
    });
    $("#key-forget").addEventListener("click", () => {
      state.key = "";
      sessionStorage.removeItem(KEY_STORAGE);
      setKeyStatus("no key");
      refresh();
    });
    $("#error-close").addEventListener("click", clearError);
  }

  function initViews() {
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => showView(tab.dataset.view));
    }
  }

  function showView(view) {
    state.view = view;
    for (const tab of document.querySelectorAll(".tab")) {
      const active = tab.dataset.view === view;
      tab.classList.toggle("active", active);
      if (active) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
    for (const section of document.querySelectorAll("main > .view")) section.hidden = section.id !== `view-${view}`;
    document.dispatchEvent(new CustomEvent("msflow:view", { detail: view })); // the view shown loads itself
  }

  // The key changed, the poll came round or a view's Refresh was pressed: the model list
  // again (msflow:models), then the view shown reloads what it shows.
  async function refresh() {
    await loadModels();
    document.dispatchEvent(new CustomEvent("msflow:refresh", { detail: state.view }));
  }

  // ------------------------------------------------------------------ models list
  function fillSelect(select, categories) {
    const previous = select.value;
    select.replaceChildren(...categories.map((c) => el("option", { value: c, text: c })));
    if (categories.includes(previous)) select.value = previous;
    select.disabled = categories.length === 0;
  }

  async function loadModels() {
    try {
      const list = await api("/v1/models");
      state.models = list.models;
      state.failed = list.failed || {}; // categories with no version that loads: why (the Models page)
      clearError();
      if (state.key) setKeyStatus(`key \u2026${state.key.slice(-4)} \u2713`, "ok");
      const failed = Object.entries(list.failed || {});
      const building = list.building && list.building.state === "running";
      showBuild(list.building);
      if (failed.length) showError(`Not loaded: ${failed.map(([c, why]) => `${c}: ${why}`).join("; ")}`);
      if (!state.models.length && !building) showError("No model is loaded yet (the service may still be warming up).");
      schedulePoll(building || !state.models.length);
    } catch (e) {
      state.models = [];
      state.failed = {};
      // Unreachable or failing (a deploy, a restart, a crash): asked again until it answers, or
      // the page stayed without categories until the key was typed again or the page reloaded.
      const again = e instanceof ApiError && (e.status === 0 || e.status >= 500);
      showError(again ? `${describe(e)}; trying again every ${POLL_MS / 1000} s.` : e);
      schedulePoll(again);
    }
    const cats = state.models.map((m) => m.category);
    fillSelect($("#category"), cats);
    fillSelect($("#admin-category"), cats);
    document.body.dataset.models = String(cats.length);
    document.dispatchEvent(new CustomEvent("msflow:models", { detail: cats }));
  }

  // A build writing into the model store (scripts/build-demo.sh): what each category is doing.
  function showBuild(progress) {
    const box = $("#build");
    if (!progress || !Object.keys(progress.categories || {}).length) {
      box.hidden = true;
      return;
    }
    const steps = Object.entries(progress.categories).map(([category, { stages }]) => {
      const parts = Object.entries(stages).map(([stage, step]) => {
        const at = new Date(step.at).toLocaleTimeString();
        return `${stage}: ${step.state}${step.detail ? ` (${step.detail})` : ""} since ${at}`;
      });
      const failed = Object.values(stages).some((step) => step.state === "failed");
      return el("li", { class: failed ? "failed" : "", "data-category": category, text: `${category} \u2014 ${parts.join("; ")}` });
    });
    const titles = { running: "Models are being built", done: "Model build finished", failed: "Model build failed",
                     stopped: "Model build stopped (scripts/demo.sh goes on where it stopped)" };
    $("#build-title").textContent = titles[progress.state] || progress.state;
    $("#build-steps").replaceChildren(...steps);
    box.dataset.state = progress.state;
    box.hidden = progress.state === "done" && state.models.length > 0 && steps.every((li) => !li.classList.contains("failed"));
  }

  function schedulePoll(again) {
    clearTimeout(state.pollTimer);
    state.pollTimer = again ? setTimeout(refresh, POLL_MS) : null;
  }

  const modelOf = (category) => state.models.find((m) => m.category === category);

  // ------------------------------------------------------------------ photo frames (Inspect and Review)
  // A photo the browser cannot show (TIFF: the service reads it, Chromium does not) left a
  // 16-pixel strip with the heatmap and boxes squashed into it. The frame takes the image's
  // proportions from the answer instead, and the overlay is drawn over black.
  function undisplayable(photo, viz, onFailure) {
    photo.addEventListener("error", () => {
      if (!photo.getAttribute("src")) return;
      photo.hidden = true;
      viz.dataset.photo = "undisplayable";
      onFailure();
    });
  }

  function fitViz(viz, width, height) {
    viz.style.aspectRatio = `${width} / ${height}`; // CSSOM, not a style attribute: the policy allows it
    viz.style.setProperty("--aspect", String(width / height)); // console.css: how wide the frame may be
  }


  function noteUndisplayable(info) {
    if (info.querySelector(".no-photo")) return;
    info.append(el("p", { class: "muted no-photo", text: "This browser cannot display the image itself (TIFF?): " +
      "the heatmap and the boxes are drawn over black, in the image's proportions." }));
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("cannot decode the heatmap"));
      img.src = src;
    });
  }

  // ------------------------------------------------------------------ what the views share
  window.msflowConsole = { $, el, fmt, ms, when, api, describe, showError, clearError, loadImage, state, ApiError,
    undisplayable, fitViz, noteUndisplayable, loadModels, modelOf, refresh };

  // ------------------------------------------------------------------ start
  window.addEventListener("error", (ev) => showError(`Console error: ${ev.message}`));
  window.addEventListener("unhandledrejection", (ev) => showError(`Console error: ${describe(ev.reason)}`));
  // The views' scripts (deferred, after this one) add their own DOMContentLoaded listeners;
  // they run before the model list comes back, which is what tells them the categories.
  document.addEventListener("DOMContentLoaded", () => {
    initKey();
    initViews();
    loadModels().then(() => { document.body.dataset.ready = "1"; });
  });
})();
