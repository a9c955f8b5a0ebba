/* MSFlow console: the Admin page (admin key). The serving version's thresholds, the recent
 * scores of this replica on a chart and in a table with how each would be classified at the
 * threshold typed (previewed as it is typed), and Apply / Set it anyway / Reset to calibrated
 * (PUT and DELETE /v1/models/{category}/threshold), for the ok threshold and the NG bound. Shares the key, the API client, the error
 * box and the model list with console.js (window.msflowConsole); every text from the server
 * goes through textContent. */
"use strict";

(() => {
  const { $, el, fmt, when, api, describe, showError, clearError, loadModels, modelOf, refresh } = window.msflowConsole;
  const admin = {
    timer: null, // the preview waiting for typing to pause
    seq: 0, // the newest preview: older answers are dropped
    recent: null, // the last /recent answer: the version whose scores the operator was shown
    outOfRange: null, // a PUT refused as threshold_out_of_range: what "Set it anyway" sends again, forced
  };

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
    $("#ng-input").addEventListener("input", ngSummary);
    $("#ng-apply").addEventListener("click", applyNg);
    $("#ng-reset").addEventListener("click", resetNg);
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
        el("dt", { text: "NG bound" }), el("dd", { id: "admin-ng", text: m ? `${fmt(m.ng_threshold, 6)} ${bound(m.ng_threshold,
          m.calibrated_ng_threshold)}; review between the two bounds, ng at or above this one` : "\u2013" }),
        el("dt", { text: "Override" }), el("dd", { text: recent.threshold !== recent.calibrated_threshold || override
          ? `yes${override ? `, since ${when(override.set_at)}` : ""}` : "no (calibrated)" }),
        el("dt", { text: "Recent images" }), el("dd", { text: `${recent.scores.length} kept on this replica (capacity ${recent.capacity})${partialNote(recent)}` })));
      admin.recent = recent;
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
      const ng = $("#ng-input");
      if (m && (ng.value === "" || ng.dataset.category !== category)) {
        ng.value = m.ng_threshold === null || m.ng_threshold === undefined ? "" : String(m.ng_threshold);
        ng.dataset.category = category;
      }
      ngSummary();
      clearError();
      await preview();
    } catch (e) {
      clearAdmin();
      info.replaceChildren(el("p", { class: "failure", text: describe(e) }));
      showError(e);
    }
  }

  // Whether a bound is the manifest's: an override equal to it reads as calibrated, which it is.
  const bound = (value, calibrated) => (value === calibrated ? "(calibrated)" : "(override)");

  // How many of the recent images of the version shown the NG bound typed would call ng.
  function ngSummary() {
    const out = $("#ng-summary");
    const x = Number($("#ng-input").value);
    const recent = admin.recent;
    const m = recent && modelOf(recent.category);
    if (!recent || !m || recent.category !== $("#admin-category").value || $("#ng-input").value === "" || !Number.isFinite(x)) {
      out.textContent = "";
      return;
    }
    const raws = recent.scores.filter((s) => s.model_version === recent.version).map((s) => s.raw_score);
    const at = (b) => raws.filter((r) => r >= b).length;
    out.textContent = raws.length ? `${at(x)} of the last ${raws.length} image(s) ng at it (now ${at(m.ng_threshold)})` : "";
  }

  // A multi-process server whose front ends did not all answer: fewer images than it holds.
  function partialNote(recent) {
    const f = recent.front_ends;
    return recent.partial && f ? ` Partial: ${f.answered} of ${f.of} front ends answered.` : "";
  }

  function clearAdmin() {
    admin.seq += 1; // drop previews in flight
    const summary = $("#recent-summary");
    summary.textContent = "";
    delete summary.dataset.changed;
    delete summary.dataset.images;
    $("#recent-table tbody").replaceChildren();
    const c = $("#recent-chart");
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  }

  function schedulePreview() {
    clearTimeout(admin.timer);
    admin.timer = setTimeout(preview, 150);
  }

  async function preview() {
    const category = $("#admin-category").value;
    const x = Number($("#threshold-input").value);
    if (!category || $("#threshold-input").value === "" || !Number.isFinite(x)) return;
    const seq = ++admin.seq;
    let recent;
    try {
      recent = await api(`/v1/models/${encodeURIComponent(category)}/recent?limit=200&threshold=${encodeURIComponent(x)}`);
    } catch (e) { showError(e); return; }
    if (seq !== admin.seq) return; // a newer preview is on its way
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

  // One bound of the override from its field (the other bound is left as it is).
  async function applyBound(input, field, what) {
    const category = $("#admin-category").value;
    const x = Number($(input).value);
    if (!category || !Number.isFinite(x) || $(input).value === "") {
      showError(`Type a raw ${what} (a number) first.`);
      return;
    }
    await changeThreshold(category, "PUT", { [field]: x, version: shownVersion(category) });
  }

  function applyThreshold() { return applyBound("#threshold-input", "threshold", "threshold"); }

  // A threshold outside what the calibration and the recent images support (422
  // threshold_out_of_range: one far above every good part passes real defects) is set only
  // when the operator confirms it, as the API's "force" asks.
  async function forceThreshold() {
    const pending = admin.outOfRange;
    if (pending) await changeThreshold(pending.category, "PUT", { ...pending.json, force: true });
  }

  function applyNg() { return applyBound("#ng-input", "ng_threshold", "NG bound"); }

  // The NG bound alone goes back to the manifest's by a PUT of ng_threshold null, the ok
  // threshold kept (re-sending the calibrated NG bound was refused as inverted once the ok
  // bound had moved above it); with the ok threshold calibrated, the DELETE.
  async function resetNg() {
    const category = $("#admin-category").value;
    const m = modelOf(category);
    if (!category || !m) return;
    const o = m.threshold_override;
    if (!o || o.threshold === m.calibrated_threshold) await changeThreshold(category, "DELETE");
    else await changeThreshold(category, "PUT", { ng_threshold: null, version: shownVersion(category) });
  }

  async function resetThreshold() {
    const category = $("#admin-category").value;
    if (category) await changeThreshold(category, "DELETE");
  }

  // The version whose scores the operator was shown: the server refuses the change (409
  // version_changed) if another version is served by now, rather than apply n's threshold to n+1.
  function shownVersion(category) {
    return admin.recent && admin.recent.category === category ? admin.recent.version : undefined;
  }

  async function changeThreshold(category, method, json) {
    const status = $("#admin-status");
    status.textContent = "";
    admin.outOfRange = null;
    $("#threshold-force").hidden = true;
    const version = shownVersion(category);
    const query = method === "DELETE" && version !== undefined ? `?version=${encodeURIComponent(version)}` : "";
    try {
      const r = await api(`/v1/models/${encodeURIComponent(category)}/threshold${query}`, { method, json });
      status.textContent = `${category} v${r.version}: threshold ${fmt(r.threshold, 6)} ` +
        `${bound(r.threshold, r.calibrated_threshold)}, NG bound ${fmt(r.ng_threshold, 6)} ` +
        `${bound(r.ng_threshold, r.calibrated_ng_threshold)}; stored in ${r.persisted.join(" and ") || "memory"}.`;
      status.dataset.threshold = String(r.threshold);
      status.dataset.ng = String(r.ng_threshold);
      $("#threshold-input").value = String(r.threshold);
      $("#ng-input").value = r.ng_threshold === null ? "" : String(r.ng_threshold);
      clearError();
      await loadModels();
      await loadAdmin();
    } catch (e) {
      if (e.code === "version_changed") { // show the version served now, and its scores (clears the error box)
        await loadModels();
        await loadAdmin();
      }
      if (e.code === "threshold_out_of_range" && method === "PUT") {
        admin.outOfRange = { category, json };
        $("#threshold-force").hidden = false;
        showError(outOfRange(e));
        return;
      }
      showError(e);
    }
  }

  // The API's refusal says 'send "force": true', a body field the operator never sees: said
  // here in the console's terms, with the range and what a bound beyond it does.
  function outOfRange(e) {
    const d = e.details || {};
    const which = d.field === "ng_threshold" ? "NG bound" : "Threshold"; // the bound the server refused
    const range = Number.isFinite(d.sane_min) && Number.isFinite(d.sane_max)
      ? `${fmt(d.sane_min, 6)} \u2013 ${fmt(d.sane_max, 6)}` : "the range the scores support";
    return `${which} ${fmt(d.threshold, 6)} lies outside ${range}, the scores of the calibration and of the recent ` +
      "images, widened: a bound there may pass real defects or flag every good part. Type another value, or press " +
      `\u201cSet it anyway\u201d to apply it all the same (${e.code}).`;
  }

  document.addEventListener("DOMContentLoaded", initAdmin);
  document.addEventListener("msflow:view", (ev) => { if (ev.detail === "admin") loadAdmin(); });
  document.addEventListener("msflow:refresh", (ev) => { if (ev.detail === "admin") loadAdmin(); });
})();
