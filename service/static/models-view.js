/* MSFlow console: the Models page. One card per category served: its version (and the
 * others available), engine, thresholds, calibration, the evaluation metrics and figures
 * exported with the version (roc.png, examples.png; report.json on demand). Shares the key,
 * the API client and the model list with console.js (window.msflowConsole); every text from
 * the server goes through textContent. */
"use strict";

(() => {
  const { $, el, fmt, ms, when, api, describe, state, loadModels } = window.msflowConsole;

  async function renderModels() {
    const root = $("#models");
    await loadModels();
    // A category none of whose versions loads is not in the list served: a card of its own
    // says so and why, or the page left it out as if it had never been in the store.
    const failed = Object.entries(state.failed || {}).filter(([category]) => !state.models.some((m) => m.category === category));
    if (!state.models.length && !failed.length) {
      root.replaceChildren(el("p", { class: "muted", text: "No models to show." }));
      return;
    }
    root.replaceChildren(...state.models.map(modelCard), ...failed.map(([category, why]) => failedCard(category, why)));
  }

  function failedCard(category, why) {
    return el("article", { class: "model failed", "data-category": category },
      el("h3", { text: category }),
      el("p", { class: "failure", text: `Not loaded: no version of ${category} could be served. ${why}` }));
  }

  // Versions in the store that did not load (the service serves an older one): "available 1, 2"
  // read as if 2 were fine while the newest was broken and 1 went on serving.
  function failedVersions(m) {
    const entries = Object.entries(m.failed_versions || {});
    if (!entries.length) return null;
    return el("div", { class: "failed-versions" }, el("h4", { text: "Versions that failed to load" }),
      el("ul", {}, ...entries.map(([version, why]) => el("li", { class: "failure", text: `v${version}: ${why}` }))));
  }

  function modelCard(m) {
    const cal = m.calibration || {};
    const override = m.threshold_override;
    const facts = [
      ["Version", `${m.version}${m.pinned ? " (pinned)" : ""} \u00b7 available ${m.available_versions.map((v) =>
        (m.failed_versions && v in m.failed_versions ? `${v} (failed)` : v)).join(", ")}`],
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
    const failed = Object.keys(m.failed_versions || {});
    return el("article", { class: "model", "data-category": m.category, "data-failed-versions": failed.join(",") || null },
      el("h3", { text: m.category }),
      el("div", { class: "cols" }, dl, el("div", {}, el("h4", { text: "Evaluation" }), evaluation)),
      failedVersions(m), figures, report);
  }

  async function loadAsset(category, name) {
    const r = await api(`/v1/models/${encodeURIComponent(category)}/assets/${encodeURIComponent(name)}`, { raw: true });
    return URL.createObjectURL(await r.blob());
  }

  // Shown, or refreshed while shown: the list is fetched again, so the page is never stale.
  document.addEventListener("msflow:view", (ev) => { if (ev.detail === "models") renderModels(); });
  document.addEventListener("msflow:refresh", (ev) => { if (ev.detail === "models") renderModels(); });
})();
