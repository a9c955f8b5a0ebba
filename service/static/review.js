/* MSFlow console: the Review page. The pending items of a category (verdict review, or the
 * audit sample of ok / ng), each with its heatmap overlay and region boxes; the operator
 * labels them OK or NG with the buttons or the keyboard (O, N; J/K move; J past the last item
 * listed fetches the next page), can change the last label given (a relabel), and the running
 * model-operator agreement comes back from the server with every label. Shares the key, the
 * API client and the error box with console.js (window.msflowConsole); like it, every text
 * from the server goes through textContent. */
"use strict";

(() => {
  const PAGE = 20;
  // The server's pattern for a defect type (ReviewLabelRequest): checked here so the operator
  // reads what to type, not a 422 quoting a regular expression.
  const DEFECT_TYPE = /^[a-z0-9][a-z0-9_-]{0,63}$/;
  const view = {
    items: [], // { entry, node, canvas, photo, heat, urls }
    current: 0,
    seq: 0,
    active: false,
    cursor: null, // the next page's (next_cursor): only the first 20 items were ever reachable
    more: null, // the page being fetched, when one is
    stats: null,
  };

  function c() { return window.msflowConsole; }

  function categoryOf() { return c().$("#review-category").value; }

  function fillCategories(categories) {
    const select = c().$("#review-category");
    const previous = select.value;
    select.replaceChildren(...categories.map((name) => c().el("option", { value: name, text: name })));
    if (categories.includes(previous)) select.value = previous;
    select.disabled = categories.length === 0;
  }

  async function blobUrl(path) {
    const r = await c().api(path, { raw: true });
    return URL.createObjectURL(await r.blob());
  }

  function clearItems() {
    for (const it of view.items) for (const u of it.urls) URL.revokeObjectURL(u);
    view.items = [];
    view.cursor = null;
    view.more = null; // a page of the list before, on its way: moot, the new list asks for its own
    c().$("#review-items").replaceChildren();
  }

  async function load() {
    const { $, api, showError, clearError, el, describe } = c();
    const category = categoryOf();
    const seq = ++view.seq;
    clearItems();
    if (!category) {
      $("#review-stats").textContent = "No category loaded (type a key above).";
      return;
    }
    let page;
    try {
      [page] = await Promise.all([api(pageUrl(category, null)), loadStats(category, seq)]);
    } catch (e) {
      if (seq === view.seq) {
        $("#review-items").replaceChildren(el("p", { class: "failure", text: describe(e) }));
        showError(e);
      }
      return;
    }
    if (seq !== view.seq) return; // the filter changed meanwhile
    clearError();
    $("#review-empty").hidden = page.items.length > 0;
    view.items = page.items.map((entry) => card(entry));
    $("#review-items").replaceChildren(...view.items.map((it) => it.node));
    view.cursor = page.next_cursor;
    select(0);
    shown();
    await Promise.all(view.items.map((it) => paint(it)));
  }

  function pageUrl(category, after) {
    const verdict = c().$("#review-verdict").value;
    return `/v1/review/${encodeURIComponent(category)}/items?limit=${PAGE}` +
      `${verdict ? `&verdict=${encodeURIComponent(verdict)}` : ""}${after ? `&after=${encodeURIComponent(after)}` : ""}`;
  }

  // The next page after the cursor, appended: items skipped (left for later) no longer hide
  // the rest of the queue. Returns whether items were added.
  function loadMore() {
    if (!view.cursor) return Promise.resolve(false);
    if (!view.more) {
      const more = fetchMore().finally(() => { if (view.more === more) view.more = null; });
      view.more = more;
    }
    return view.more;
  }

  async function fetchMore() {
    const { $, api, showError } = c();
    const seq = view.seq;
    let page;
    try {
      page = await api(pageUrl(categoryOf(), view.cursor));
    } catch (e) {
      if (seq === view.seq) showError(e);
      return false;
    }
    if (seq !== view.seq) return false; // reloaded meanwhile
    const known = new Set(view.items.map((it) => it.entry.item.id));
    const fresh = page.items.filter((e) => !known.has(e.item.id)).map((entry) => card(entry));
    view.items.push(...fresh);
    $("#review-items").append(...fresh.map((it) => it.node));
    view.cursor = page.next_cursor;
    $("#review-empty").hidden = view.items.length > 0;
    shown();
    // Listed now, painted as their photos come: the selection waited for all 20 of them.
    for (const it of fresh) paint(it);
    return fresh.length > 0;
  }

  // How many of the pending items are listed, and the way to the others.
  function shown() {
    const { $ } = c();
    const list = $("#review-items");
    list.dataset.loaded = String(view.items.length);
    const s = view.stats;
    const verdict = $("#review-verdict").value;
    const pending = s ? (verdict ? s.pending[verdict] || 0 : s.pending.review + s.pending.ok + s.pending.ng) : null;
    $("#review-shown").textContent = view.items.length && pending !== null
      ? `Showing ${view.items.length} of ${Math.max(pending, view.items.length)} pending` : "";
    $("#review-more").hidden = !view.cursor;
  }

  async function loadStats(category, seq) {
    const stats = await c().api(`/v1/review/${encodeURIComponent(category)}/stats`);
    if (seq === undefined || seq === view.seq) { view.stats = stats; showStats(stats); }
    return stats;
  }

  function showStats(s) {
    const p = c().$("#review-stats");
    const labelled = s.labelled.ok + s.labelled.ng;
    let fp = 0, fn = 0;
    for (const d of Object.values(s.disagreements)) { fp += d.false_positive; fn += d.false_negative; }
    const pct = labelled ? ` (${Math.round((100 * s.agree) / labelled)}%)` : "";
    p.textContent = `Pending: ${s.pending.review} review \u00b7 ${s.pending.ok} ok \u00b7 ${s.pending.ng} ng. ` +
      `Labelled: ${labelled} (${s.labelled.ok} OK, ${s.labelled.ng} NG). ` +
      `Model\u2013operator agreement: ${s.agree} of ${labelled}${pct}; false positives ${fp}, false negatives ${fn}.`;
    Object.assign(p.dataset, { labelled: String(labelled), agree: String(s.agree), fp: String(fp), fn: String(fn),
      pending: String(s.pending.review + s.pending.ok + s.pending.ng) });
  }

  function card(entry) {
    const { el, fmt, when, undisplayable, fitViz, noteUndisplayable } = c();
    const item = entry.item;
    const photo = el("img", { alt: item.filename || item.id });
    const canvas = el("canvas", { width: 1, height: 1 });
    const viz = el("div", { class: "viz" }, photo, canvas);
    fitViz(viz, item.image.width, item.image.height); // a TIFF the browser cannot show keeps its shape
    const info = el("div", { class: "info" });
    undisplayable(photo, viz, () => noteUndisplayable(info));
    const note = el("input", { type: "text", class: "note", maxLength: 500, placeholder: "note (optional)",
      "aria-label": "note" });
    const it = { entry, photo, canvas, note, heat: null, urls: [], node: null };
    const ok = el("button", { type: "button", class: "ok", text: "OK (O)" });
    const ng = el("button", { type: "button", class: "ng", text: "NG (N)" });
    ok.addEventListener("click", () => label(it, "ok"));
    ng.addEventListener("click", () => label(it, "ng"));
    it.node = el("article", { class: "review-item", "data-id": item.id, "data-verdict": item.verdict,
      "data-raw-score": String(item.raw_score) },
      viz,
      info);
    info.append(
        el("h3", { text: item.filename || item.id }),
        el("span", { class: `decision ${item.verdict}`, text: item.verdict.toUpperCase() }), " ",
        el("span", { class: "muted", text: item.reason === "audit" ? "audit sample" : "uncertain" }),
        el("div", { class: "score" }, item.score.toFixed(3), el("small", { text: " score (0.5 = threshold)" })),
        el("dl", { class: "facts" },
          el("dt", { text: "Raw score" }), el("dd", { text: `${fmt(item.raw_score, 6)} (ok < ${fmt(item.threshold, 6)}, ng \u2265 ${fmt(item.ng_threshold, 6)})` }),
          el("dt", { text: "Model" }), el("dd", { text: `v${item.model_version}${item.engine ? ` \u00b7 ${item.engine}` : ""}` }),
          el("dt", { text: "Captured" }), el("dd", { text: when(item.captured_at) }),
          el("dt", { text: "Regions" }), el("dd", { class: "regions-count", text: String(item.regions.length) })),
        el("div", { class: "actions" }, ok, ng, note));
    it.node.addEventListener("click", (ev) => {
      if (ev.target.tagName !== "BUTTON" && ev.target.tagName !== "INPUT") select(view.items.indexOf(it));
    });
    return it;
  }

  async function paint(it) {
    const { loadImage, describe, el } = c();
    try {
      const [photoUrl, heatUrl] = await Promise.all([
        blobUrl(it.entry.image_url), it.entry.heatmap_url ? blobUrl(it.entry.heatmap_url) : null]);
      it.urls.push(photoUrl);
      it.photo.src = photoUrl;
      if (heatUrl) {
        it.urls.push(heatUrl);
        it.heat = await loadImage(heatUrl);
      }
      if (!it.photo.complete) await new Promise((res) => { it.photo.onload = it.photo.onerror = res; });
      draw(it);
    } catch (e) {
      it.node.querySelector(".info").append(el("p", { class: "failure", text: describe(e) }));
    }
  }

  function draw(it) {
    const item = it.entry.item;
    const W = item.image.width, H = item.image.height;
    const s = Math.min(1, 1200 / Math.max(W, H));
    const cw = Math.max(1, Math.round(W * s)), ch = Math.max(1, Math.round(H * s));
    const cv = it.canvas;
    cv.width = cw; cv.height = ch;
    const ctx = cv.getContext("2d");
    ctx.clearRect(0, 0, cw, ch);
    if (it.heat) {
      ctx.globalAlpha = Number(c().$("#opacity").value) / 100;
      ctx.drawImage(it.heat, 0, 0, cw, ch);
      ctx.globalAlpha = 1;
    }
    const lw = Math.max(2, Math.round(Math.max(cw, ch) / 160));
    ctx.lineWidth = lw;
    for (const g of item.regions) {
      ctx.strokeStyle = "rgba(0,0,0,.75)";
      ctx.strokeRect(g.x * s - lw / 2, g.y * s - lw / 2, g.width * s + lw, g.height * s + lw);
      ctx.strokeStyle = "#00e5ff";
      ctx.strokeRect(g.x * s, g.y * s, g.width * s, g.height * s);
    }
    it.node.dataset.heatmapDrawn = String(Boolean(it.heat));
    it.node.dataset.boxesDrawn = String(item.regions.length);
  }

  function select(index) {
    if (!view.items.length) { view.current = 0; return; }
    view.current = Math.max(0, Math.min(index, view.items.length - 1));
    view.items.forEach((it, i) => it.node.classList.toggle("current", i === view.current));
    const node = view.items[view.current].node;
    if (node.scrollIntoView) node.scrollIntoView({ block: "nearest" });
  }

  // The defect type typed above, for an NG label; undefined when it is not one the server takes.
  function defectType(outcome) {
    const { $, showError } = c();
    const defect = $("#review-defect").value.trim().toLowerCase();
    if (outcome !== "ng" || !defect) return null;
    if (DEFECT_TYPE.test(defect)) return defect;
    showError(`Defect type \u201c${defect}\u201d: use lower-case letters, digits, _ and - only, up to 64 ` +
      `(e.g. ${defect.replace(/[^a-z0-9_-]+/g, "-").replace(/^[-_]+|-+$/g, "") || "scratch"}); nothing was labelled.`);
    $("#review-defect").focus();
    return undefined;
  }

  function putLabel(category, id, json) {
    return c().api(`/v1/review/${encodeURIComponent(category)}/items/${encodeURIComponent(id)}/label`,
      { method: "PUT", json });
  }

  async function label(it, outcome) {
    const { $, showError, clearError } = c();
    if (it.node.dataset.state === "sending") return;
    const category = categoryOf();
    const defect = defectType(outcome);
    if (defect === undefined) return;
    const json = { label: outcome };
    if (defect) json.defect_type = defect;
    if (it.note.value.trim()) json.note = it.note.value.trim();
    it.node.dataset.state = "sending";
    try {
      const r = await putLabel(category, it.entry.item.id, json);
      clearError();
      view.stats = r.stats;
      showStats(r.stats);
      showLast(category, it.entry, r.label, r.previous, null); // pending on this page: nobody's label expected
      const index = view.items.indexOf(it);
      view.items.splice(index, 1);
      for (const u of it.urls) URL.revokeObjectURL(u);
      it.node.remove();
      $("#review-empty").hidden = view.items.length > 0;
      select(index);
      shown();
      const list = $("#review-items");
      list.dataset.labelledHere = String(Number(list.dataset.labelledHere || 0) + 1);
      if (!view.items.length) {
        if (view.cursor) loadMore().then(() => select(0));
        else if (r.stats.pending.review + r.stats.pending.ok + r.stats.pending.ng > 0) load(); // from the oldest again
      }
    } catch (e) {
      delete it.node.dataset.state;
      showError(e);
    }
  }

  // The label just given, with the other one a click away: a slip of the finger (O for N)
  // took the item out of the list, and the console had no way to correct it.
  // `previous`: the label this one replaced (the server's answer); `known`: the one this page
  // knew of. Another operator's label on an item still pending here was replaced without a word.
  function showLast(category, entry, lab, previous, known) {
    const { $, el, describe, when } = c();
    const other = lab.label === "ok" ? "ng" : "ok";
    const button = el("button", { type: "button", class: "secondary relabel", "data-to": other,
      text: `Change to ${other.toUpperCase()}${other === "ng" ? " (defect type above)" : ""}` });
    const box = $("#review-last");
    box.dataset.id = entry.item.id;
    box.dataset.label = lab.label;
    const unseen = previous && !(known && previous.by === known.by && previous.at === known.at);
    const replaced = unseen ? el("strong", { class: "failure replaced", text: `This replaced the ` +
      `${previous.label.toUpperCase()}${previous.defect_type ? ` (${previous.defect_type})` : ""} label ` +
      `${previous.by} gave at ${when(previous.at)}. ` }) : null;
    box.replaceChildren(`Labelled ${entry.item.filename || entry.item.id} ${lab.label.toUpperCase()}` +
      `${lab.defect_type ? ` (${lab.defect_type})` : ""} as ${lab.by}. `, replaced, button);
    box.hidden = false;
    button.addEventListener("click", async () => {
      const defect = defectType(other);
      if (defect === undefined) return;
      button.disabled = true;
      try {
        const json = { label: other };
        if (defect) json.defect_type = defect;
        if (lab.note) json.note = lab.note; // a relabel replaces the whole label: keep the note
        const r = await putLabel(category, entry.item.id, json);
        c().clearError();
        view.stats = r.stats;
        showStats(r.stats);
        shown();
        showLast(category, entry, r.label, r.previous, lab);
      } catch (e) {
        button.disabled = false;
        c().showError(e);
        box.append(el("span", { class: "failure", text: ` ${describe(e)}` }));
      }
    });
  }

  function onKey(ev) {
    if (!view.active || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const tag = (ev.target && ev.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return; // typing a note or a defect type
    const it = view.items[view.current];
    const key = ev.key.toLowerCase();
    if (key === "o" && it) { ev.preventDefault(); label(it, "ok"); }
    else if (key === "n" && it) { ev.preventDefault(); label(it, "ng"); }
    else if (key === "j" || key === "arrowdown") {
      ev.preventDefault();
      if (view.current + 1 >= view.items.length && view.cursor) { // past the last one listed: the next page
        // One step from where J was pressed, and only if the operator is still there: J
        // pressed again while the page comes (one fetch) is the same step, and a K or a
        // label meanwhile is not undone when it arrives.
        const from = view.items[view.current];
        loadMore().then((added) => {
          if (added && view.items[view.current] === from) select(view.items.indexOf(from) + 1);
        });
      } else select(view.current + 1);
    }
    else if (key === "k" || key === "arrowup") { ev.preventDefault(); select(view.current - 1); }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const { $ } = c();
    document.addEventListener("msflow:models", (ev) => {
      fillCategories(ev.detail);
      if (view.active) load();
    });
    document.addEventListener("msflow:view", (ev) => {
      view.active = ev.detail === "review";
      if (view.active) load();
    });
    document.addEventListener("keydown", onKey);
    $("#review-category").addEventListener("change", load);
    $("#review-verdict").addEventListener("change", load);
    $("#review-refresh").addEventListener("click", load);
    $("#review-more").addEventListener("click", () => loadMore());
    $("#opacity").addEventListener("input", () => view.items.forEach(draw));
  });
})();
