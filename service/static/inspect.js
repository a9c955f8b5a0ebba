/* MSFlow console: the Inspect page. Images dropped or chosen are sent to
 * POST /v1/inspect/{category} (a few at a time); each answer becomes a card: the photo with
 * the heatmap and the defect regions drawn over it on a canvas, the verdict, the scores and
 * the timings. Shares the key, the API client and the error box with console.js
 * (window.msflowConsole); every text from the server or a file name goes through textContent. */
"use strict";

(() => {
  const { $, el, fmt, ms, api, describe, showError, loadImage, state, ApiError, undisplayable, fitViz,
    noteUndisplayable } = window.msflowConsole;
  const CONCURRENCY = 4;
  const MAX_CANVAS = 1600; // overlay canvas resolution cap (long side, pixels)
  const inspect = {
    cards: [], // { node, photo, photoUrl, canvas, info, file, viz, result, heat }
    seq: 0, // numbers the cards (data-seq), newest highest
  };

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
      for (const c of inspect.cards) URL.revokeObjectURL(c.photoUrl);
      inspect.cards = [];
      $("#results").replaceChildren();
    });
    for (const id of ["#show-heatmap", "#show-boxes", "#opacity"]) {
      $(id).addEventListener("input", () => inspect.cards.forEach(draw));
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

  function createCard(file, category) {
    const photoUrl = URL.createObjectURL(file);
    const photo = el("img", { alt: file.name, src: photoUrl });
    const canvas = el("canvas", { width: 1, height: 1 });
    const info = el("div", { class: "info" }, el("h3", { text: file.name }),
      el("p", { class: "pending", text: `Inspecting with ${category}\u2026` }));
    inspect.seq += 1;
    const viz = el("div", { class: "viz" }, photo, canvas);
    const node = el("article", { class: "card", "data-state": "pending", "data-filename": file.name,
      "data-seq": String(inspect.seq) }, viz, info);
    $("#results").prepend(node);
    const card = { node, photo, photoUrl, canvas, info, file, viz, result: null, heat: null };
    undisplayable(photo, viz, () => { if (card.result) noteUndisplayable(card.info); });
    inspect.cards.push(card);
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

  document.addEventListener("DOMContentLoaded", initInspect);
})();
