/* MSFlow operator console. Plain browser JavaScript: no build step, no dependencies, and no
 * request leaves this origin. The API key is kept in sessionStorage (this tab only) and sent
 * as X-API-Key. Every text from the server or a file name goes through textContent, never
 * innerHTML. */
"use strict";

(() => {
  const KEY_STORAGE = "msflow.apiKey";
  const CONCURRENCY = 4;
  const MAX_CANVAS = 1600; // overlay canvas resolution cap (long side, pixels)
  const state = {
    key: sessionStorage.getItem(KEY_STORAGE) || "",
    models: [],
    view: "inspect",
    cards: [],
    adminTimer: null,
    adminSeq: 0,
    pollTimer: null,
    outOfRange: null, // a PUT refused as threshold_out_of_range: what "Set it anyway" sends again, forced
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
    if (view === "models") renderModels();
    if (view === "admin") loadAdmin();
    document.dispatchEvent(new CustomEvent("msflow:view", { detail: view })); // review.js listens
  }

  async function refresh() {
    await loadModels();
    if (state.view === "models") renderModels();
    if (state.view === "admin") loadAdmin();
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
      showError(e);
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

  // ------------------------------------------------------------------ inspect
  function initInspect() {
    const drop = $("#drop");
    const input = $("#files");
    input.addEventListener("change", () => {
      inspectFiles([...input.files]);
      input.value = "";
    });
    for (const ev of ["dragenter", "dragover"]) {
      drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
    }
    for (const ev of ["dragleave", "drop"]) {
      drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
    }
    drop.addEventListener("drop", (e) => inspectFiles([...e.dataTransfer.files]));
    $("#clear-results").addEventListener("click", () => {
      for (const c of state.cards) URL.revokeObjectURL(c.photoUrl);
      state.cards = [];
      $("#results").replaceChildren();
    });
    for (const id of ["#show-heatmap", "#show-boxes", "#opacity"]) {
      $(id).addEventListener("input", () => state.cards.forEach(draw));
    }
  }

  async function inspectFiles(files) {
    files = files.filter((f) => f && f.size >= 0);
    if (!files.length) return;
    const category = $("#category").value;
    if (!category) {
      showError(state.models.length ? "Choose a category first." : "No category to inspect with: load the models " +
        "first (is the API key right?).");
      return;
    }
    const jobs = files.map((file) => {
      const card = createCard(file, category);
      return () => inspectOne(card, file, category);
    });
    let next = 0;
    const worker = async () => { while (next < jobs.length) await jobs[next++](); };
    await Promise.all(Array.from({ length: Math.min(CONCURRENCY, jobs.length) }, worker));
  }

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
  }

  function createCard(file, category) {
    const photoUrl = URL.createObjectURL(file);
    const photo = el("img", { alt: file.name, src: photoUrl });
    const canvas = el("canvas", { width: 1, height: 1 });
    const info = el("div", { class: "info" }, el("h3", { text: file.name }),
      el("p", { class: "pending", text: `Inspecting with ${category}\u2026` }));
    state.seq = (state.seq || 0) + 1;
    const viz = el("div", { class: "viz" }, photo, canvas);
    const node = el("article", { class: "card", "data-state": "pending", "data-filename": file.name,
      "data-seq": String(state.seq) }, viz, info);
    $("#results").prepend(node);
    const card = { node, photo, photoUrl, canvas, info, file, viz, result: null, heat: null };
    undisplayable(photo, viz, () => { if (card.result) noteUndisplayable(card.info); });
    state.cards.push(card);
    return card;
  }

  async function inspectOne(card, file, category) {
    const form = new FormData();
    form.append("file", file, file.name);
    const t0 = performance.now();
    try {
      const body = await api(`/v1/inspect/${encodeURIComponent(category)}?heatmap=inline&heatmap_size=model`,
        { method: "POST", body: form });
      await fillCard(card, body, performance.now() - t0);
    } catch (e) {
      card.node.dataset.state = "error";
      card.viz.hidden = true; // nothing to overlay: a broken photo strip said nothing more
      card.info.replaceChildren(el("h3", { text: file.name }), el("p", { class: "failure", text: describe(e) }));
      if (e instanceof ApiError && (e.status === 401 || e.status === 403 || e.status === 0)) showError(e);
    }
  }

  async function fillCard(card, body, roundTripMs) {
    const r = body.results[0];
    card.result = r;
    const verdict = r.is_anomalous ? "anomalous" : "normal";
    const n = card.node;
    n.dataset.verdict = verdict;
    n.dataset.rawScore = String(r.raw_score);
    n.dataset.threshold = String(r.threshold);
    n.dataset.decision = r.verdict; // the three-way verdict: ok, review, ng
    n.dataset.score = String(r.score);
    n.dataset.regions = String(r.regions.length);
    n.dataset.regionsJson = JSON.stringify(r.regions);
    n.dataset.imageSize = `${r.image_size.width}x${r.image_size.height}`;
    const t = r.timings_ms;
    const regionRows = r.regions.map((g, i) => el("tr", {},
      el("td", { text: String(i + 1) }), el("td", { text: `${g.x},${g.y}` }),
      el("td", { text: `${g.width}\u00d7${g.height}` }), el("td", { text: String(g.area) }),
      el("td", { text: fmt(g.peak, 3) }), el("td", { text: fmt(g.mean, 3) })));
    card.info.replaceChildren(
      el("h3", { text: r.filename || card.file.name }),
      el("span", { class: `verdict ${verdict}`, text: r.is_anomalous ? "ANOMALOUS" : "NORMAL" }), " ",
      el("span", { class: `decision ${r.verdict}`, text: r.verdict.toUpperCase() }),
      el("div", { class: "score" }, r.score.toFixed(3), el("small", { text: " score (0.5 = threshold)" })),
      el("dl", { class: "facts" },
        el("dt", { text: "Raw score" }), el("dd", { text: `${fmt(r.raw_score, 6)} (threshold ${fmt(r.threshold, 6)}, ng from ${fmt(r.ng_threshold, 6)})` }),
        el("dt", { text: "Model" }), el("dd", { text: `${body.category} v${r.model_version} \u00b7 ${body.engine}` }),
        el("dt", { text: "Image" }), el("dd", { text: `${r.image_size.width}\u00d7${r.image_size.height}${r.cached ? " \u00b7 cached" : ""}` }),
        el("dt", { text: "Regions" }), el("dd", { class: "regions-count", text: String(r.regions.length) }),
        el("dt", { text: "Timings" }), el("dd", {
          class: "timings",
          text: `decode ${ms(t.decode)} \u00b7 queue ${ms(t.queue)} \u00b7 engine ${ms(t.engine)} \u00b7 ` +
            `render ${ms(t.render)} \u00b7 server ${ms(t.total)} \u00b7 round trip ${ms(roundTripMs)}`,
        })),
      r.regions.length ? el("table", { class: "regions" },
        el("thead", {}, el("tr", {}, ...["#", "x,y", "w\u00d7h", "area", "peak", "mean"].map((h) => el("th", { text: h })))),
        el("tbody", {}, ...regionRows)) : el("p", { class: "muted", text: "No defect region above the pixel threshold." }));
    if (r.heatmap && r.heatmap.data) {
      card.heat = await loadImage(`data:image/png;base64,${r.heatmap.data}`);
    }
    fitViz(card.viz, r.image_size.width, r.image_size.height);
    if (!card.photo.complete) await new Promise((res) => { card.photo.onload = card.photo.onerror = res; });
    if (card.viz.dataset.photo === "undisplayable") noteUndisplayable(card.info);
    draw(card);
    n.dataset.state = "done";
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

  function draw(card) {
    const r = card.result;
    if (!r) return;
    const W = r.image_size.width;
    const H = r.image_size.height;
    const s = Math.min(1, MAX_CANVAS / Math.max(W, H));
    const cw = Math.max(1, Math.round(W * s));
    const ch = Math.max(1, Math.round(H * s));
    const c = card.canvas;
    if (c.width !== cw || c.height !== ch) { c.width = cw; c.height = ch; }
    const ctx = c.getContext("2d");
    ctx.clearRect(0, 0, cw, ch);
    let heat = false;
    if (card.heat && $("#show-heatmap").checked) {
      ctx.globalAlpha = Number($("#opacity").value) / 100;
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(card.heat, 0, 0, cw, ch); // the map is a stretch of the upright image: same geometry
      ctx.globalAlpha = 1;
      heat = true;
    }
    let boxes = 0;
    if ($("#show-boxes").checked) {
      const lw = Math.max(2, Math.round(Math.max(cw, ch) / 160));
      ctx.lineWidth = lw;
      ctx.font = `bold ${Math.max(11, lw * 6)}px system-ui, sans-serif`;
      ctx.textBaseline = "top";
      r.regions.forEach((g, i) => {
        const x = g.x * s, y = g.y * s, w = g.width * s, h = g.height * s;
        ctx.strokeStyle = "rgba(0,0,0,.75)";
        ctx.strokeRect(x - lw / 2, y - lw / 2, w + lw, h + lw);
        ctx.strokeStyle = "#00e5ff";
        ctx.strokeRect(x, y, w, h);
        const label = String(i + 1);
        const tw = ctx.measureText(label).width + lw * 2;
        ctx.fillStyle = "#00e5ff";
        ctx.fillRect(x, Math.max(0, y - lw * 7), tw, lw * 7);
        ctx.fillStyle = "#000";
        ctx.fillText(label, x + lw, Math.max(0, y - lw * 7) + lw * 0.5);
        boxes += 1;
      });
    }
    card.node.dataset.heatmapDrawn = String(heat);
    card.node.dataset.boxesDrawn = String(boxes);
  }

  // ------------------------------------------------------------------ models page
  async function renderModels() {
    const root = $("#models");
    await loadModels();
    if (!state.models.length) {
      root.replaceChildren(el("p", { class: "muted", text: "No models to show." }));
      return;
    }
    root.replaceChildren(...state.models.map(modelCard));
  }

  function modelCard(m) {
    const cal = m.calibration || {};
    const override = m.threshold_override;
    const facts = [
      ["Version", `${m.version}${m.pinned ? " (pinned)" : ""} \u00b7 available ${m.available_versions.join(", ")}`],
      ["Engine", m.engine], ["Backbone", `${m.backbone} \u00b7 input ${m.input_size}\u00d7${m.input_size}`],
      ["Threshold", null], ["Calibrated threshold", `${fmt(m.calibrated_threshold ?? cal.threshold, 6)} (${cal.method || "?"})`],
      ["Pixel threshold", fmt(cal.pixel_threshold, 6)], ["Heatmap range", `${fmt(cal.map_low, 4)} \u2013 ${fmt(cal.map_high, 4)}`],
      ["Created", when(m.created_at)], ["Loaded", `${when(m.loaded_at)} \u00b7 warm-up ${ms(m.warmup_ms)}`],
    ];
    const dl = el("dl", { class: "facts" });
    for (const [k, v] of facts) {
      dl.append(el("dt", { text: k }));
      if (k === "Threshold") {
        dl.append(el("dd", { class: "effective-threshold" }, fmt(m.threshold, 6), " ",
          override ? el("span", { class: "badge", text: `override since ${when(override.set_at)}` })
            : el("span", { class: "muted", text: "(calibrated)" })));
      } else dl.append(el("dd", { text: v }));
    }
    const metrics = m.metrics || {};
    const rows = [];
    for (const [k, v] of Object.entries(metrics)) {
      if (typeof v === "number") rows.push(el("tr", {}, el("th", { text: k }), el("td", { text: fmt(v, 4) })));
      else if (v && typeof v === "object") {
        for (const [k2, v2] of Object.entries(v)) {
          if (typeof v2 === "number") rows.push(el("tr", {}, el("th", { text: `${k}.${k2}` }), el("td", { text: fmt(v2, 4) })));
        }
      }
    }
    const evaluation = rows.length ? el("table", { class: "metrics" }, el("tbody", {}, ...rows))
      : el("p", { class: "muted", text: "No evaluation in this version (run `msflow eval` before `msflow export`)." });
    const figures = el("div", { class: "cols figures" });
    const assets = m.assets || [];
    for (const name of assets.filter((a) => a.endsWith(".png"))) {
      const fig = el("figure", {}, el("figcaption", { text: name }));
      figures.append(fig);
      loadAsset(m.category, name).then((url) => fig.prepend(el("img", { src: url, alt: `${m.category} ${name}` })))
        .catch((e) => fig.append(el("p", { class: "failure", text: describe(e) })));
    }
    let report = null;
    if (assets.includes("report.json")) {
      const pre = el("pre", { class: "report", text: "loading\u2026" });
      report = el("details", {}, el("summary", { text: "report.json" }), pre);
      report.addEventListener("toggle", async () => {
        if (!report.open || pre.dataset.loaded) return;
        try {
          const r = await api(`/v1/models/${encodeURIComponent(m.category)}/assets/report.json`);
          pre.textContent = JSON.stringify(r, null, 2);
          pre.dataset.loaded = "1";
        } catch (e) { pre.textContent = describe(e); }
      });
    }
    return el("article", { class: "model", "data-category": m.category },
      el("h3", { text: m.category }),
      el("div", { class: "cols" }, dl, el("div", {}, el("h4", { text: "Evaluation" }), evaluation)),
      figures, report);
  }

  async function loadAsset(category, name) {
    const r = await api(`/v1/models/${encodeURIComponent(category)}/assets/${encodeURIComponent(name)}`, { raw: true });
    return URL.createObjectURL(await r.blob());
  }

  // ------------------------------------------------------------------ admin
  function initAdmin() {
    $("#admin-category").addEventListener("change", loadAdmin);
    $("#admin-refresh").addEventListener("click", refresh);
    const input = $("#threshold-input");
    const range = $("#threshold-range");
    input.addEventListener("input", () => { range.value = input.value; schedulePreview(); });
    range.addEventListener("input", () => { input.value = range.value; schedulePreview(); });
    $("#threshold-apply").addEventListener("click", applyThreshold);
    $("#threshold-force").addEventListener("click", forceThreshold);
    $("#threshold-reset").addEventListener("click", resetThreshold);
  }

  async function loadAdmin() {
    const category = $("#admin-category").value;
    const info = $("#admin-info");
    if (!category) {
      clearAdmin();
      info.replaceChildren(el("p", { class: "muted", text: "No category loaded (type a key above)." }));
      return;
    }
    const m = modelOf(category);
    try {
      const recent = await api(`/v1/models/${encodeURIComponent(category)}/recent?limit=500`);
      const override = m && m.threshold_override;
      info.replaceChildren(el("dl", { class: "facts" },
        el("dt", { text: "Serving" }), el("dd", { text: `${category} v${recent.version}` }),
        el("dt", { text: "Calibrated threshold" }), el("dd", { text: fmt(recent.calibrated_threshold, 6) }),
        el("dt", { text: "Effective threshold" }), el("dd", { id: "admin-effective", text: fmt(recent.threshold, 6) }),
        el("dt", { text: "NG bound" }), el("dd", { id: "admin-ng", text: m ? `${fmt(m.ng_threshold, 6)} (review between; PUT ng_threshold to move it)` : "\u2013" }),
        el("dt", { text: "Override" }), el("dd", { text: recent.threshold !== recent.calibrated_threshold || override
          ? `yes${override ? `, since ${when(override.set_at)}` : ""}` : "no (calibrated)" }),
        el("dt", { text: "Recent images" }), el("dd", { text: `${recent.scores.length} kept on this replica (capacity ${recent.capacity})${partialNote(recent)}` })));
      state.recent = recent;
      const raws = recent.scores.filter((s) => s.model_version === recent.version).map((s) => s.raw_score);
      const cal = (m && m.calibration) || {};
      let lo = Math.min(cal.score_min ?? recent.threshold, recent.threshold, ...raws);
      let hi = Math.max(cal.score_max ?? recent.threshold, recent.threshold, ...raws);
      const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.1 || 1;
      lo -= pad; hi += pad;
      const range = $("#threshold-range");
      range.min = String(lo); range.max = String(hi); range.step = String((hi - lo) / 1000);
      const input = $("#threshold-input");
      if (input.value === "" || input.dataset.category !== category) {
        input.value = String(recent.threshold);
        input.dataset.category = category;
      }
      range.value = input.value;
      clearError();
      await preview();
    } catch (e) {
      clearAdmin();
      info.replaceChildren(el("p", { class: "failure", text: describe(e) }));
      showError(e);
    }
  }

  // A multi-process server whose front ends did not all answer: fewer images than it holds.
  function partialNote(recent) {
    const f = recent.front_ends;
    return recent.partial && f ? ` Partial: ${f.answered} of ${f.of} front ends answered.` : "";
  }

  function clearAdmin() {
    state.adminSeq += 1; // drop previews in flight
    const summary = $("#recent-summary");
    summary.textContent = "";
    delete summary.dataset.changed;
    delete summary.dataset.images;
    $("#recent-table tbody").replaceChildren();
    const c = $("#recent-chart");
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  }

  function schedulePreview() {
    clearTimeout(state.adminTimer);
    state.adminTimer = setTimeout(preview, 150);
  }

  async function preview() {
    const category = $("#admin-category").value;
    const x = Number($("#threshold-input").value);
    if (!category || $("#threshold-input").value === "" || !Number.isFinite(x)) return;
    const seq = ++state.adminSeq;
    let recent;
    try {
      recent = await api(`/v1/models/${encodeURIComponent(category)}/recent?limit=200&threshold=${encodeURIComponent(x)}`);
    } catch (e) { showError(e); return; }
    if (seq !== state.adminSeq) return; // a newer preview is on its way
    const s = recent.summary;
    const summary = $("#recent-summary");
    summary.dataset.changed = String(s.changed);
    summary.dataset.images = String(s.images);
    summary.textContent = (s.images
      ? `Of the last ${s.images} image(s) of version ${recent.version} on this replica: ${s.anomalous} anomalous at ` +
        `${fmt(x, 6)} (now ${s.anomalous_now} at ${fmt(recent.threshold, 6)}); ${s.changed} verdict(s) would change.`
      : `No recent image of version ${recent.version} on this replica yet: inspect some to preview the effect.`) +
      partialNote(recent);
    $("#recent-table tbody").replaceChildren(...recent.scores.map((r) => {
      const now = r.is_anomalous ? "anomalous" : "normal";
      const then = r.would_be_anomalous ? "anomalous" : "normal";
      return el("tr", { class: now !== then ? "changed" : "" },
        el("td", { text: new Date(r.at).toLocaleTimeString() }), el("td", { text: r.filename || "\u2013" }),
        el("td", { text: r.model_version }), el("td", { text: fmt(r.raw_score, 6) }),
        el("td", { text: now }), el("td", { text: then }));
    }));
    drawChart(recent, x);
  }

  function drawChart(recent, candidate) {
    const c = $("#recent-chart");
    const ctx = c.getContext("2d");
    const W = c.width, H = c.height;
    ctx.clearRect(0, 0, W, H);
    const range = $("#threshold-range");
    const lo = Number(range.min), hi = Number(range.max);
    const X = (v) => 10 + ((v - lo) / (hi - lo || 1)) * (W - 20);
    ctx.fillStyle = "#5d6773";
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(fmt(lo, 4), 10, H - 6);
    const hiText = fmt(hi, 4);
    ctx.fillText(hiText, W - 10 - ctx.measureText(hiText).width, H - 6);
    let i = 0;
    for (const r of recent.scores) {
      if (r.model_version !== recent.version) continue;
      ctx.fillStyle = r.raw_score >= candidate ? "rgba(198,40,40,.8)" : "rgba(26,127,55,.8)";
      ctx.fillRect(X(r.raw_score) - 1, 18 + ((i++ * 13) % 50), 3, 14);
    }
    const line = (v, color, dash, label) => {
      ctx.strokeStyle = color; ctx.setLineDash(dash); ctx.lineWidth = 2;
      ctx.beginPath(); ctx.moveTo(X(v), 4); ctx.lineTo(X(v), H - 20); ctx.stroke(); ctx.setLineDash([]);
      ctx.fillStyle = color; ctx.fillText(label, Math.min(X(v) + 4, W - 90), 14);
    };
    line(recent.threshold, "#5d6773", [5, 4], "now");
    line(candidate, "#c62828", [], "new");
  }

  async function applyThreshold() {
    const category = $("#admin-category").value;
    const x = Number($("#threshold-input").value);
    if (!category || !Number.isFinite(x) || $("#threshold-input").value === "") {
      showError("Type a raw threshold (a number) first.");
      return;
    }
    await changeThreshold(category, "PUT", { threshold: x, version: shownVersion(category) });
  }

  // A threshold outside what the calibration and the recent images support (422
  // threshold_out_of_range: one far above every good part passes real defects) is set only
  // when the operator confirms it, as the API's "force" asks.
  async function forceThreshold() {
    const pending = state.outOfRange;
    if (pending) await changeThreshold(pending.category, "PUT", { ...pending.json, force: true });
  }

  async function resetThreshold() {
    const category = $("#admin-category").value;
    if (category) await changeThreshold(category, "DELETE");
  }

  // The version whose scores the operator was shown: the server refuses the change (409
  // version_changed) if another version is served by now, rather than apply n's threshold to n+1.
  function shownVersion(category) {
    return state.recent && state.recent.category === category ? state.recent.version : undefined;
  }

  async function changeThreshold(category, method, json) {
    const status = $("#admin-status");
    status.textContent = "";
    state.outOfRange = null;
    $("#threshold-force").hidden = true;
    const version = shownVersion(category);
    const query = method === "DELETE" && version !== undefined ? `?version=${encodeURIComponent(version)}` : "";
    try {
      const r = await api(`/v1/models/${encodeURIComponent(category)}/threshold${query}`, { method, json });
      status.textContent = `${category} v${r.version}: threshold ${fmt(r.threshold, 6)} ` +
        `${r.override ? "(override)" : "(calibrated)"}; stored in ${r.persisted.join(" and ") || "memory"}.`;
      status.dataset.threshold = String(r.threshold);
      $("#threshold-input").value = String(r.threshold);
      clearError();
      await loadModels();
      await loadAdmin();
    } catch (e) {
      if (e.code === "version_changed") { // show the version served now, and its scores (clears the error box)
        await loadModels();
        await loadAdmin();
      }
      if (e.code === "threshold_out_of_range" && method === "PUT") {
        state.outOfRange = { category, json };
        $("#threshold-force").hidden = false;
      }
      showError(e);
    }
  }

  // What review.js (the Review page) shares with this file: one key, one error box, one API client.
  window.msflowConsole = { $, el, fmt, when, api, describe, showError, clearError, loadImage, state, ApiError,
    undisplayable, fitViz, noteUndisplayable };

  // ------------------------------------------------------------------ start
  window.addEventListener("error", (ev) => showError(`Console error: ${ev.message}`));
  window.addEventListener("unhandledrejection", (ev) => showError(`Console error: ${describe(ev.reason)}`));
  document.addEventListener("DOMContentLoaded", () => {
    initKey();
    initViews();
    initInspect();
    initAdmin();
    loadModels().then(() => { document.body.dataset.ready = "1"; });
  });
})();
